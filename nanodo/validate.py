"""Checks a config before any compile or write; errors name the key, value and what is valid."""

import importlib.util
import math
import os
import re

import ml_collections

from nanodo import data, model, optimizer, sharding, sources, tokenizer, workdir
from nanodo.configs import default

DTYPES = ('float32', 'bfloat16')
# Model keys that change only how the model computes, not its parameters.
_COMPUTE_ONLY = ('model.dtype', 'model.remat', 'model.remat_policy', 'model.attention')
# Besides the model's shape: the keys that fix the tokens and the order of the data.
_PINNED = (
  'ds_name',
  'train_split',
  'text_field',
  'text_documents',
  'bad_utf8',
  'packing',
  'vocab_path',
  'vocab_size',
  'seed',
  'batch_size',
  'opt.optimizer',
)


class ConfigError(ValueError):
  """A config value that cannot work."""


def _require(ok: bool, key: str, value: object, valid: str) -> None:
  if not ok:
    raise ConfigError(f'{key}={value!r} is not valid: {valid}.')


def _flat(tree: dict, prefix: str = '') -> dict[str, object]:
  """{'model.D': 128, ...} from nested dicts."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _check_types(flat: dict[str, object]) -> None:
  """Every key is one of default.py's, with the type of its default (ints pass as floats)."""
  declared = _flat(default.get_config().to_dict())
  for key in flat:
    _require(
      key in declared,
      key,
      flat[key],
      'not a config key; the keys are those of nanodo/configs/default.py',
    )
  for key, d in declared.items():
    _require(key in flat, key, None, 'missing; every key of nanodo/configs/default.py is needed')
    v = flat[key]
    if isinstance(d, bool):
      _require(isinstance(v, bool), key, v, 'must be True or False')
    elif isinstance(d, int):
      _require(isinstance(v, int) and not isinstance(v, bool), key, v, 'must be an integer')
    elif isinstance(d, float):
      _require(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
        key,
        v,
        'must be a finite number',
      )
    elif isinstance(d, str):
      _require(isinstance(v, str), key, v, 'must be a string')


def _check_paths(c: ml_collections.ConfigDict) -> None:
  """The workdir can be created; the tokenizer and the run to restore from exist."""
  _require(
    bool(c.workdir), 'workdir', c.workdir, 'give a directory, e.g. --config.workdir=/tmp/nanodo'
  )
  _require(
    not os.path.exists(c.workdir) or os.path.isdir(c.workdir),
    'workdir',
    c.workdir,
    'exists and is not a directory',
  )
  parent = os.path.abspath(c.workdir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  _require(os.access(parent, os.W_OK | os.X_OK), 'workdir', c.workdir, f'{parent} is not writable')
  if c.vocab_path:
    try:
      tokenizer.load(c.vocab_path)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if c.checkpoint_restore_dir:
    checkpoints = os.path.join(c.checkpoint_restore_dir, 'checkpoints')
    steps = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    _require(
      any(s.isdigit() for s in steps),
      'checkpoint_restore_dir',
      c.checkpoint_restore_dir,
      'a nanodo workdir with checkpoints (it has no checkpoints/<step>)',
    )


def check(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first bad value of c."""
  _check_types(_flat(c.to_dict()))
  _check_paths(c)
  for key in (
    'batch_size',
    'eval_batch_size',
    'vocab_size',
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
    'max_to_keep',
    'grad_accumulation_steps',
    'cross_entropy_block_size',
  ):
    _require(c[key] > 0, key, c[key], 'must be a positive integer')
  _require(0 <= c.seed < 2**32, 'seed', c.seed, 'must be in [0, 2**32)')
  for key in ('D', 'H', 'L', 'N', 'F'):
    _require(c.model[key] > 0, f'model.{key}', c.model[key], 'must be a positive integer')
  _require(c.model.L >= 2, 'model.L', c.model.L, 'must be at least 2')
  _require(
    c.model.D % c.model.H == 0, 'model.D', c.model.D, f'must be divisible by model.H={c.model.H}'
  )
  _require(c.model.dtype in DTYPES, 'model.dtype', c.model.dtype, f'one of {DTYPES}')
  m = c.model
  for key, valid in (
    ('positions', model.POSITIONS),
    ('norm', model.NORMS),
    ('mlp', model.MLPS),
    ('attention', model.ATTENTIONS),
    ('remat_policy', model.REMAT_POLICIES),
  ):
    _require(m[key] in valid, f'model.{key}', m[key], f'one of {valid}')
  _require(
    isinstance(m.KV, int) and m.KV >= 0 and (m.KV == 0 or m.H % m.KV == 0),
    'model.KV',
    m.KV,
    f'must divide model.H={m.H} (0: one key/value head per query head)',
  )
  _require(
    m.positions != 'rope' or (m.D // m.H) % 2 == 0,
    'model.positions',
    m.positions,
    f'rope needs an even head dimension, model.D // model.H = {m.D // m.H}',
  )
  _require(m.rope_base > 0, 'model.rope_base', m.rope_base, 'must be > 0')
  _require(0 <= c.label_smoothing < 1, 'label_smoothing', c.label_smoothing, 'must be in [0, 1)')
  _require(c.z_loss >= 0, 'z_loss', c.z_loss, 'must be >= 0')
  _require(
    c.peak_tflops >= 0, 'peak_tflops', c.peak_tflops, 'must be >= 0 (0: measure at start-up)'
  )
  _require(
    isinstance(c.profile_steps, int) and c.profile_steps >= 0,
    'profile_steps',
    c.profile_steps,
    'must be a non-negative integer (0: no trace)',
  )
  _require(
    not c.wandb_project or importlib.util.find_spec('wandb') is not None,
    'wandb_project',
    c.wandb_project,
    "needs the wandb package: pip install 'nanodo[wandb]'",
  )
  _require(
    c.batch_size % c.grad_accumulation_steps == 0,
    'batch_size',
    c.batch_size,
    f'must be divisible by grad_accumulation_steps={c.grad_accumulation_steps}',
  )
  for key in ('data', 'fsdp'):
    _require(
      isinstance(c.mesh[key], int) and (c.mesh[key] > 0 or c.mesh[key] == -1),
      f'mesh.{key}',
      c.mesh[key],
      'must be a positive integer or -1 (the remaining devices)',
    )
  _require(
    c.mesh.data != -1 or c.mesh.fsdp != -1,
    'mesh.data',
    c.mesh.data,
    'only one of mesh.data and mesh.fsdp can be -1',
  )
  _check_distributed(c.distributed)
  _require(c.packing in data.PACKINGS, 'packing', c.packing, f'one of {data.PACKINGS}')
  _require(
    c.text_documents in sources.TEXT_DOCUMENTS,
    'text_documents',
    c.text_documents,
    f'one of {sources.TEXT_DOCUMENTS}',
  )
  _require(c.bad_utf8 in sources.BAD_UTF8, 'bad_utf8', c.bad_utf8, f'one of {sources.BAD_UTF8}')
  _require(
    isinstance(c.tokenize_workers, int) and c.tokenize_workers > 0,
    'tokenize_workers',
    c.tokenize_workers,
    'must be a positive integer (1: tokenize in this process)',
  )
  try:
    sources.check(c)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _require(
    c.vocab_size > tokenizer.EOS_ID + 256,
    'vocab_size',
    c.vocab_size,
    f'must exceed {tokenizer.EOS_ID + 256} (special pieces and 256 byte pieces)',
  )
  o = c.opt
  _require(
    o.optimizer in optimizer.OPTIMIZERS,
    'opt.optimizer',
    o.optimizer,
    f'one of {optimizer.OPTIMIZERS}',
  )
  _require(
    o.decay_type in optimizer.SCHEDULES,
    'opt.decay_type',
    o.decay_type,
    f'one of {optimizer.SCHEDULES}',
  )
  _require(
    o.num_train_steps > 0, 'opt.num_train_steps', o.num_train_steps, 'must be a positive integer'
  )
  _require(
    o.warmup_steps >= 0, 'opt.warmup_steps', o.warmup_steps, 'must be a non-negative integer'
  )
  _require(o.peak_learning_rate > 0, 'opt.peak_learning_rate', o.peak_learning_rate, 'must be > 0')
  for key in (
    'init_learning_rate',
    'final_learning_rate',
    'weight_decay',
    'eps',
    'clip_by_global_norm',
  ):
    _require(o[key] >= 0, f'opt.{key}', o[key], 'must be >= 0')
  _require(
    0 <= o.wsd_decay_fraction <= 1,
    'opt.wsd_decay_fraction',
    o.wsd_decay_fraction,
    'must be in [0, 1]',
  )
  try:
    re.compile(o.weight_decay_exclude)
  except re.error as e:
    raise ConfigError(
      f'opt.weight_decay_exclude={o.weight_decay_exclude!r} is not valid: '
      f'not a regular expression ({e}).'
    ) from None
  try:
    [re.compile(pattern) for pattern, _ in optimizer.parse_multipliers(o.lr_multipliers)]
  except (ValueError, re.error):
    raise ConfigError(
      f'opt.lr_multipliers={o.lr_multipliers!r} is not valid: give '
      "'regex=number,...', e.g. 'embed=0.5,blocks/0/=2'."
    ) from None
  for key in ('b1', 'b2'):
    _require(0 <= o[key] < 1, f'opt.{key}', o[key], 'must be in [0, 1)')


def check_resume(c: ml_collections.ConfigDict) -> None:
  """Refuses to resume a workdir, or start from checkpoint_restore_dir, with a changed model
  shape, tokenizer or data: what the checkpoints and their data position were made with.
  """
  previous, source = workdir.read_config(c.workdir), f'workdir={c.workdir!r}'
  pinned = _PINNED
  if previous is None and c.checkpoint_restore_dir:
    # Another run's weights and tokenizer, on data of this run's choosing.
    previous = workdir.read_config(c.checkpoint_restore_dir)
    source = f'checkpoint_restore_dir={c.checkpoint_restore_dir!r}'
    pinned = ('vocab_path', 'vocab_size')
  if previous is None:
    return
  new, old = _flat(c.to_dict()), {**_flat(default.get_config().to_dict()), **_flat(previous)}
  keys = [k for k in new if k.startswith('model.') and k not in _COMPUTE_ONLY] + list(pinned)
  changed = [f'{k}: {old[k]!r} -> {new[k]!r}' for k in keys if old.get(k) != new[k]]
  if changed:
    raise ConfigError(
      f'{source} holds a run started with another config, and resuming may not '
      f'change the model shape, tokenizer or data: {"; ".join(changed)}. Set '
      'these back, or give a new workdir.'
    )


def _check_distributed(d: ml_collections.ConfigDict) -> None:
  address = d.coordinator_address
  host, _, port = address.rpartition(':')
  _require(
    not address or (host and port.isdigit() and 0 < int(port) < 65536),
    'distributed.coordinator_address',
    address,
    "'' or host:port, e.g. 10.0.0.1:1234",
  )
  _require(
    isinstance(d.num_processes, int) and d.num_processes >= 0,
    'distributed.num_processes',
    d.num_processes,
    'must be a positive integer (0: from the environment)',
  )
  _require(
    isinstance(d.process_id, int)
    and -1 <= d.process_id
    and (d.num_processes == 0 or d.process_id < d.num_processes),
    'distributed.process_id',
    d.process_id,
    f'must be in [0, distributed.num_processes={d.num_processes}) (-1: from the environment)',
  )
  if address and not sharding.launched_as_one_of_several():
    _require(
      d.num_processes > 0 and d.process_id >= 0,
      'distributed.num_processes',
      d.num_processes,
      'give distributed.num_processes and distributed.process_id with '
      'a coordinator_address (no cluster launcher sets them here)',
    )
  _require(
    isinstance(d.initialization_timeout, int) and d.initialization_timeout > 0,
    'distributed.initialization_timeout',
    d.initialization_timeout,
    'must be a positive number of seconds',
  )


def check_devices(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError if the mesh or the batches do not fit the devices of the run."""
  try:
    sharding.mesh_shape(c.mesh.data, c.mesh.fsdp, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  A = c.grad_accumulation_steps
  _require(
    c.batch_size % (A * num_devices) == 0,
    'batch_size',
    c.batch_size,
    f'each of the grad_accumulation_steps={A} micro-batches must be divisible by the '
    f'{num_devices} devices (data × fsdp): use a multiple of {A * num_devices}',
  )
  _require(
    c.eval_batch_size % num_devices == 0,
    'eval_batch_size',
    c.eval_batch_size,
    f'must be divisible by the {num_devices} devices (data × fsdp)',
  )
