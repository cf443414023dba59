"""A sweep: the product of value lists, grouped by program, each group trained as one stack.

`--config.sweep='opt.peak_learning_rate=1e-3,1e-2 model.qk_norm=False,True'` makes four
variants, numbered in product order (the last key varies fastest). Keys the step only computes
with (STACKED) vary inside a group: its variants are trained together, their states stacked
along a variant axis of one vmapped step. Every other key changes the program: each of its
values is a group of its own, trained one after another in the same process, in a workdir of
its own under the sweep's (groups/<g>).
"""

import copy
import dataclasses
import itertools
import json
import os

import ml_collections

from nanodo.configs import default
from nanodo.ground import files

# Values the step computes with, as arrays of the variant axis (the schedule's keys through each
# variant's table of learning rates). The seed is not one: it also orders the batches, and a
# stack trains on one stream of them; each seed is a group of its own.
STACKED = (
  'opt.peak_learning_rate',
  'opt.init_learning_rate',
  'opt.final_learning_rate',
  'opt.warmup_steps',
  'opt.decay_type',
  'opt.wsd_decay_fraction',
  'opt.weight_decay',
  'opt.b1',
  'opt.b2',
  'opt.eps',
  'label_smoothing',
  'z_loss',
)
# Keys of the run rather than of what it trains: one value for the whole sweep.
RUN_KEYS = (
  'workdir sweep checkpoint_restore_dir hf_init_dir train_minutes cache_dir tokenize_workers '
  'peak_tflops profile_steps wandb_project wandb_entity log_every_steps eval_every_steps '
  'checkpoint_every_steps max_to_keep sweep_vmap'
).split()
SWEEP_FILE = 'sweep.json'
GROUPS = 'groups'


@dataclasses.dataclass(frozen=True)
class Variant:
  """One point of the grid: its number, its values, its group and its place in the group."""

  id: int
  values: dict
  group: int
  index: int


def _value(key: str, text: str, kind: type) -> object:
  """text as a value of the type of the key's default."""
  if kind is bool:
    if text not in ('True', 'False'):
      valid = f'give True or False, e.g. {key}=False,True'
      raise ValueError(f'sweep: {key}={text!r} is not valid: {valid}.')
    return text == 'True'
  try:
    return kind(text)
  except ValueError:
    raise ValueError(f'sweep: {key}={text!r} is not valid: must be a {kind.__name__}.') from None


def parse(spec: str) -> list[tuple[str, list]]:
  """[(key, values)] of 'key=v1,v2 key=v1,...'; ValueError naming a bad key or list."""
  declared = default.get_config()
  pairs = []
  for item in spec.split():
    key, sep, values = item.partition('=')
    if not sep or not key:
      valid = "each item is key=v1,v2,..., e.g. 'seed=0,1'"
      raise ValueError(f'sweep={spec!r} is not valid: {item!r}: {valid}.')
    try:
      node = declared[key]  # ConfigDict reads dotted keys
    except (KeyError, AttributeError, TypeError):
      node = declared
    if isinstance(node, ml_collections.ConfigDict):  # not there, or not a value
      keys = 'the keys are those of nanodo/configs/default.py'
      raise ValueError(f'sweep: {key} is not a config key; {keys}.')
    if key.split('.')[0] in (*RUN_KEYS, 'mesh', 'distributed'):
      raise ValueError(f'sweep: {key} cannot be swept: it is a setting of the run, one per sweep.')
    texts = values.split(',')
    if not values or not all(texts):
      valid = f'give one value or more, e.g. {key}=1,2'
      raise ValueError(f'sweep: {key}={values!r} is not valid: {valid}.')
    if key in [k for k, _ in pairs]:
      raise ValueError(f'sweep: {key} is given twice; give all its values in one list.')
    pairs.append((key, [_value(key, t, type(node)) for t in texts]))
  return pairs


def with_values(c: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """A copy of c with the given values ({'opt.b1': 0.8, ...}) and no sweep."""
  new = copy.deepcopy(c)
  new.update_from_flattened_dict(values)
  new.sweep = ''
  return new


def variants(spec: str) -> list[Variant]:
  """Every variant of the sweep, in product order, with its program group."""
  pairs = parse(spec)
  keys = [k for k, _ in pairs]
  program = [k for k in keys if k not in STACKED]
  groups, found = {}, []
  for combination in itertools.product(*(v for _, v in pairs)):
    values = dict(zip(keys, combination, strict=True))
    g = groups.setdefault(tuple(values[k] for k in program), len(groups))
    index = sum(v.group == g for v in found)
    found.append(Variant(len(found), values, g, index))
  return found


def groups(found: list[Variant]) -> list[list[Variant]]:
  """The variants of each program group, groups in order."""
  return [[v for v in found if v.group == g] for g in sorted({v.group for v in found})]


def group_config(c: ml_collections.ConfigDict, group: list[Variant]) -> ml_collections.ConfigDict:
  """The run config of a group: its program's values, its first variant's others, its workdir."""
  g = with_values(c, group[0].values)
  g.workdir = os.path.join(c.workdir, GROUPS, str(group[0].group))
  g.cache_dir = c.cache_dir or os.path.join(c.workdir, 'token_cache')  # one for all groups
  stacked = sorted({k for v in group for k in v.values if k in STACKED})
  g.sweep = ' '.join(f'{k}=' + ','.join(str(v.values[k]) for v in group) for k in stacked)
  return g


def plan(c: ml_collections.ConfigDict) -> list[tuple[ml_collections.ConfigDict, list[Variant]]]:
  """Each group's run config and variants; [] without a sweep. ValueError for a bad sweep."""
  if not c.sweep:
    return []
  found = variants(c.sweep)
  for key in ('train_minutes', 'hf_init_dir', 'checkpoint_restore_dir'):
    if c[key]:
      raise ValueError(f'{key}={c[key]!r} is not valid with a sweep; give it to single runs only.')
  sizes = [len(g) for g in groups(found)]
  if c.sweep_vmap < 0 or any(k % c.sweep_vmap for k in sizes if c.sweep_vmap):
    raise ValueError(
      f'sweep_vmap={c.sweep_vmap} is not valid: 0, or a divisor of the variants of every group '
      f'({", ".join(map(str, sizes))}).'
    )
  return [(group_config(c, g), g) for g in groups(found)]


def start(c: ml_collections.ConfigDict) -> None:
  """Writes the sweep's variants into its workdir; ValueError if it holds another sweep."""
  file = os.path.join(c.workdir, SWEEP_FILE)
  found = variants(c.sweep)
  if (previous := read(c.workdir)) is not None:
    if previous != found:
      raise ValueError(
        f'{file} holds another sweep than sweep={c.sweep!r}; give its sweep to resume it, or '
        'another workdir.'
      )
    return
  rows = [dataclasses.asdict(v) for v in found]
  config = json.loads(c.to_json_best_effort())
  files.write_text(file, json.dumps({'sweep': c.sweep, 'config': config, 'variants': rows}))


def read(path: str) -> list[Variant] | None:
  """The variants of the sweep in the workdir at path; None if it holds no sweep."""
  file = os.path.join(path, SWEEP_FILE)
  if not os.path.exists(file):
    return None
  try:
    with open(file, encoding='utf-8') as f:
      return [Variant(**row) for row in json.load(f)['variants']]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{file} is unreadable ({e}); it lists the sweep of this workdir.') from None
