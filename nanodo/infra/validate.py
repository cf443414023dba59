"""Checks a config before any compile or write; errors name the key, value and what is valid."""

import importlib.util
import math
import os
import re
from collections.abc import Callable, Iterator

import ml_collections
from flax import traverse_util

from nanodo import data, model, ops, optimizer, sharding
from nanodo.configs import default
from nanodo.corpora import sources, tokenizer
from nanodo.ground import files
from nanodo.infra import workdir

DTYPES = ('float32', 'bfloat16')
# Model keys that change only how the model computes, not its parameters.
_COMPUTE_ONLY = ('model.dtype', 'model.remat', 'model.remat_policy', 'model.attention')
# Besides the model's shape: the keys that fix the tokens and the order of the data.
_PINNED = (
  'ds_name train_split text_field text_documents bad_utf8 packing vocab_path vocab_size seed '
  'batch_size opt.optimizer train_minutes'
).split()
_COUNTS = (
  'batch_size eval_batch_size vocab_size log_every_steps eval_every_steps checkpoint_every_steps '
  'max_to_keep grad_accumulation_steps cross_entropy_block_size'
).split()
_POSITIVE = 'must be a positive integer'
_number = lambda v: isinstance(v, int | float) and not isinstance(v, bool)
# Each value's test by the type of its default; bool first, as it is also an int.
_TYPES = (
  (bool, lambda v: isinstance(v, bool), 'must be True or False'),
  (int, lambda v: _number(v) and isinstance(v, int), 'must be an integer'),
  (float, lambda v: _number(v) and math.isfinite(v), 'must be a finite number'),
  (str, lambda v: isinstance(v, str), 'must be a string'),
)
_Check = tuple[str, object, str]  # key, whether its value is valid, what is valid


class ConfigError(ValueError):
  """A config value that cannot work."""


def _require(ok: object, key: str, value: object, valid: str) -> None:
  if not ok:
    raise ConfigError(f'{key}={value!r} is not valid: {valid}.')


def _reraise(check: Callable[..., object], *args: object) -> None:
  """check(*args), its ValueError a ConfigError: its message already names the key and value."""
  try:
    check(*args)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _flat(tree: dict) -> dict[str, object]:
  """{'model.D': 128, ...} from nested dicts."""
  return traverse_util.flatten_dict(tree, sep='.')


def _one_of(value: object, valid: tuple) -> tuple[bool, str]:
  return value in valid, f'one of {valid}'


def _rope_scaling(spec: str) -> tuple[bool, str]:
  """Whether spec parses, with Llama 3's factors in their ranges."""
  valid = "'' or llama3:factor,low_freq_factor,high_freq_factor,original_L, e.g. llama3:32,1,4,8192"
  try:
    factor, low, high, original_L = ops.llama3_scaling(spec)
  except ValueError:
    return False, valid
  return factor >= 1 and 0 < low < high and original_L > 0, valid + ' (factor >= 1, low < high)'


def _checks(c: ml_collections.ConfigDict, flat: dict[str, object]) -> Iterator[_Check]:
  """Every check of c in order, each made once those before it pass (model.H > 0, then D % H)."""
  w, restore, m, o, d = c.workdir, c.checkpoint_restore_dir, c.model, c.opt, c.distributed
  yield 'workdir', w, 'give a directory, e.g. --config.workdir=/tmp/nanodo'
  yield 'workdir', not os.path.exists(w) or os.path.isdir(w), 'exists and is not a directory'
  parent = files.existing_parent(w)
  yield 'workdir', os.access(parent, os.W_OK | os.X_OK), f'{parent} is not writable'
  if c.vocab_path:
    _reraise(tokenizer.load, c.vocab_path)
  if restore:
    checkpoints = os.path.join(restore, 'checkpoints')
    steps = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    valid = 'a nanodo workdir with checkpoints (it has no checkpoints/<step>)'
    yield 'checkpoint_restore_dir', any(s.isdigit() for s in steps), valid
    yield 'hf_init_dir', not c.hf_init_dir, 'give it or checkpoint_restore_dir, not both'
  for key in _COUNTS:
    yield key, flat[key] > 0, _POSITIVE
  yield 'seed', 0 <= c.seed < 2**32, 'must be in [0, 2**32)'
  for key in ('D', 'H', 'L', 'N', 'F'):
    yield f'model.{key}', m[key] > 0, _POSITIVE
  yield 'model.L', m.L >= 2, 'must be at least 2'
  yield 'model.K', m.K >= 0, 'must be a positive integer (0: model.D // model.H)'
  valid = f'must be divisible by model.H={m.H} (or give the head dimension, model.K)'
  yield 'model.D', m.K or m.D % m.H == 0, valid
  yield 'model.dtype', *_one_of(m.dtype, DTYPES)
  yield 'model.positions', *_one_of(m.positions, model.POSITIONS)
  yield 'model.norm', *_one_of(m.norm, model.NORMS)
  yield 'model.mlp', *_one_of(m.mlp, model.MLPS)
  yield 'model.attention', *_one_of(m.attention, model.ATTENTIONS)
  yield 'model.remat_policy', *_one_of(m.remat_policy, model.REMAT_POLICIES)
  yield 'model.bias', *_one_of(m.bias, model.BIASES)
  valid = f'must divide model.H={m.H} (0: one key/value head per query head)'
  yield 'model.KV', m.KV >= 0 and (m.KV == 0 or m.H % m.KV == 0), valid
  K = m.K or m.D // m.H
  valid = f'rope needs an even head dimension, {K}'
  yield 'model.positions', m.positions != 'rope' or K % 2 == 0, valid
  yield 'model.rope_base', m.rope_base > 0, 'must be > 0'
  if m.rope_scaling:
    yield 'model.rope_scaling', m.positions == 'rope', "scales RoPE: needs model.positions='rope'"
    yield 'model.rope_scaling', *_rope_scaling(m.rope_scaling)
  yield 'model.norm_eps', m.norm_eps > 0, 'must be > 0'
  yield 'model.logit_softcap', m.logit_softcap >= 0, 'must be >= 0 (0: uncapped)'
  valid = 'needs model.tied=False: a tied head is the input embedding, which cannot start at zero'
  yield 'model.zero_head', not (m.zero_head and m.tied), valid
  yield 'model.parameterization', *_one_of(m.parameterization, ops.PARAMETERIZATIONS)
  yield 'model.base_width', m.base_width >= 0, 'must be a positive width (0: none; sp needs none)'
  if (p := m.parameterization) != 'sp':
    valid = f'{p} needs the width it equals sp at, a positive integer, e.g. model.base_width=128'
    yield 'model.base_width', m.base_width > 0, valid
    valid = (
      f"must be 'adamw' or 'adam_atan2' with {p}, whose rules are Adam's (lion, muon: none "
      "published; adafactor's is not built here)"
    )
    yield 'opt.optimizer', o.optimizer in ('adamw', 'adam_atan2'), valid
    valid = f'must be sp with hf_init_dir: imported weights are trained without {p}'
    yield 'model.parameterization', not c.hf_init_dir, valid
    embedding, _, readout, _ = ops.EXPONENTS[p]
    valid = f'must be False with {p}: its head and embedding learn at different rates'
    yield 'model.tied', not m.tied or embedding[1:] == readout[1:], valid
  yield 'label_smoothing', 0 <= c.label_smoothing < 1, 'must be in [0, 1)'
  yield 'z_loss', c.z_loss >= 0, 'must be >= 0'
  yield 'peak_tflops', c.peak_tflops >= 0, 'must be >= 0 (0: looked up or measured)'
  yield 'profile_steps', c.profile_steps >= 0, 'must be a non-negative integer (0: no trace)'
  wandb = not c.wandb_project or importlib.util.find_spec('wandb') is not None
  yield 'wandb_project', wandb, "needs the wandb package: pip install 'nanodo[wandb]'"
  A = c.grad_accumulation_steps
  yield 'batch_size', c.batch_size % A == 0, f'must be divisible by grad_accumulation_steps={A}'
  valid = 'must be a positive integer or -1 (the remaining devices)'
  for key in ('data', 'fsdp'):
    yield f'mesh.{key}', c.mesh[key] > 0 or c.mesh[key] == -1, valid
  valid = 'only one of mesh.data and mesh.fsdp can be -1'
  yield 'mesh.data', c.mesh.data != -1 or c.mesh.fsdp != -1, valid
  host, _, port = d.coordinator_address.rpartition(':')
  ok = not d.coordinator_address or (host and port.isdigit() and 0 < int(port) < 65536)
  yield 'distributed.coordinator_address', ok, "'' or host:port, e.g. 10.0.0.1:1234"
  n, i = d.num_processes, d.process_id
  yield 'distributed.num_processes', n >= 0, 'must be a positive integer (0: from the environment)'
  valid = f'must be in [0, distributed.num_processes={n}) (-1: from the environment)'
  yield 'distributed.process_id', -1 <= i and (n == 0 or i < n), valid
  if d.coordinator_address and not sharding.launched_as_one_of_several():
    valid = 'give distributed.num_processes and distributed.process_id with a coordinator_address'
    valid += ' (no cluster launcher sets them here)'
    yield 'distributed.num_processes', n > 0 and i >= 0, valid
  valid = 'must be a positive number of seconds'
  yield 'distributed.initialization_timeout', d.initialization_timeout > 0, valid
  yield 'distributed.heartbeat_timeout', d.heartbeat_timeout > 0, valid
  yield 'packing', *_one_of(c.packing, data.PACKINGS)
  yield 'text_documents', *_one_of(c.text_documents, sources.TEXT_DOCUMENTS)
  yield 'bad_utf8', *_one_of(c.bad_utf8, sources.BAD_UTF8)
  valid = 'must be a positive integer (1: tokenize in this process)'
  yield 'tokenize_workers', c.tokenize_workers > 0, valid
  _reraise(sources.check, c)
  valid = f'must exceed {tokenizer.EOS_ID + 256} (special pieces and 256 byte pieces)'
  yield 'vocab_size', c.vocab_size > tokenizer.EOS_ID + 256, valid
  yield 'opt.optimizer', *_one_of(o.optimizer, optimizer.OPTIMIZERS)
  yield 'opt.decay_type', *_one_of(o.decay_type, optimizer.SCHEDULES)
  yield 'opt.num_train_steps', o.num_train_steps > 0, _POSITIVE
  yield 'train_minutes', c.train_minutes >= 0, 'must be >= 0 minutes (0: no time budget)'
  yield 'opt.warmup_steps', o.warmup_steps >= 0, 'must be a non-negative integer'
  yield 'opt.peak_learning_rate', o.peak_learning_rate > 0, 'must be > 0'
  for key in 'init_learning_rate final_learning_rate weight_decay eps clip_by_global_norm'.split():
    yield f'opt.{key}', o[key] >= 0, 'must be >= 0'
  yield 'opt.wsd_decay_fraction', 0 <= o.wsd_decay_fraction <= 1, 'must be in [0, 1]'
  yield 'opt.ema_decay', 0 <= o.ema_decay < 1, 'must be in [0, 1) (0: no average)'
  try:
    re.compile(o.weight_decay_exclude)
  except re.error as e:
    yield 'opt.weight_decay_exclude', False, f'not a regular expression ({e})'
  try:
    [re.compile(pattern) for pattern, _ in optimizer.parse_multipliers(o.lr_multipliers)]
  except (ValueError, re.error):
    yield 'opt.lr_multipliers', False, "give 'regex=number,...', e.g. 'embed=0.5,blocks/0/=2'"
  for key in ('b1', 'b2'):
    yield f'opt.{key}', 0 <= o[key] < 1, 'must be in [0, 1)'
  swept = [item.partition('=')[0] for item in c.sweep.split()]
  valid = f'opt.eps has no part in opt.optimizer={o.optimizer!r}: only adamw reads it'
  yield 'sweep', 'opt.eps' not in swept or o.optimizer == 'adamw', valid


def check(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first bad value of c."""
  flat, declared = _flat(c.to_dict()), _flat(default.get_config().to_dict())
  unknown = 'not a config key; the keys are those of nanodo/configs/default.py'
  for key in flat:
    _require(key in declared, key, flat[key], unknown)
  # Every key with the type of its default (ints pass as floats) before any value is compared.
  for key, d in declared.items():
    _require(key in flat, key, None, 'missing; every key of nanodo/configs/default.py is needed')
    test, valid = next((test, valid) for kind, test, valid in _TYPES if isinstance(d, kind))
    _require(test(flat[key]), key, flat[key], valid)
  for key, ok, valid in _checks(c, flat):
    _require(ok, key, flat[key], valid)


def check_resume(c: ml_collections.ConfigDict) -> None:
  """Refuses a resume that changes what the checkpoints and their data position were made with."""
  previous, source, pinned = workdir.read_config(c.workdir), f'workdir={c.workdir!r}', _PINNED
  if previous is None and c.checkpoint_restore_dir:
    # Another run's weights and tokenizer, on data of this run's choosing.
    previous = workdir.read_config(c.checkpoint_restore_dir)
    source = f'checkpoint_restore_dir={c.checkpoint_restore_dir!r}'
    pinned = ['vocab_path', 'vocab_size']
  if previous is None:
    return
  new, old = _flat(c.to_dict()), _flat(workdir.with_defaults(previous))
  keys = [k for k in new if k.startswith('model.') and k not in _COMPUTE_ONLY] + pinned
  changed = [f'{k}: {old[k]!r} -> {new[k]!r}' for k in keys if old.get(k) != new[k]]
  if bool(old.get('opt.ema_decay')) != bool(new['opt.ema_decay']):  # the checkpoints' layout
    changed.append(f'opt.ema_decay: {old.get("opt.ema_decay", 0.0)!r} -> {new["opt.ema_decay"]!r}')
  if changed:
    raise ConfigError(
      f'{source} holds a run started with another config, and resuming may not '
      f'change the model shape, tokenizer, data or weight average: {"; ".join(changed)}. Set '
      'these back, or give a new workdir.'
    )


def check_devices(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError if the mesh or the batches do not fit the devices of the run."""
  _reraise(sharding.mesh_shape, c.mesh.data, c.mesh.fsdp, num_devices)
  A = c.grad_accumulation_steps
  valid = f'each of the grad_accumulation_steps={A} micro-batches must be divisible by the '
  valid += f'{num_devices} devices (data × fsdp): use a multiple of {A * num_devices}'
  _require(c.batch_size % (A * num_devices) == 0, 'batch_size', c.batch_size, valid)
  valid = f'must be divisible by the {num_devices} devices (data × fsdp)'
  _require(c.eval_batch_size % num_devices == 0, 'eval_batch_size', c.eval_batch_size, valid)
