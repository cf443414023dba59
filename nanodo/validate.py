"""Checks a config before any compile or write; errors name the key, value and what is valid."""

import re

import ml_collections

from nanodo import data, model, optimizer, sharding, tokenizer

DTYPES = ('float32', 'bfloat16')


class ConfigError(ValueError):
  """A config value that cannot work."""


def _require(ok: bool, key: str, value: object, valid: str) -> None:
  if not ok:
    raise ConfigError(f'{key}={value!r} is not valid: {valid}.')


def check(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first bad value of c."""
  _require(bool(c.workdir), 'workdir', c.workdir, 'give a directory, e.g. --config.workdir=/tmp/nanodo')
  for key in ('batch_size', 'eval_batch_size', 'grad_accumulation_steps', 'vocab_size',
              'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'max_to_keep'):
    _require(isinstance(c[key], int) and c[key] > 0, key, c[key], 'must be a positive integer')
  for key in ('D', 'H', 'L', 'N', 'F'):
    _require(isinstance(c.model[key], int) and c.model[key] > 0, f'model.{key}', c.model[key],
             'must be a positive integer')
  _require(c.model.L >= 2, 'model.L', c.model.L, 'must be at least 2')
  _require(c.model.D % c.model.H == 0, 'model.D', c.model.D,
           f'must be divisible by model.H={c.model.H}')
  _require(c.model.dtype in DTYPES, 'model.dtype', c.model.dtype, f'one of {DTYPES}')
  m = c.model
  for key, valid in (('positions', model.POSITIONS), ('norm', model.NORMS), ('mlp', model.MLPS),
                     ('attention', model.ATTENTIONS), ('remat_policy', model.REMAT_POLICIES)):
    _require(m[key] in valid, f'model.{key}', m[key], f'one of {valid}')
  _require(isinstance(m.KV, int) and m.KV >= 0 and (m.KV == 0 or m.H % m.KV == 0), 'model.KV',
           m.KV, f'must divide model.H={m.H} (0: one key/value head per query head)')
  _require(m.positions != 'rope' or (m.D // m.H) % 2 == 0, 'model.positions', m.positions,
           f'rope needs an even head dimension, model.D // model.H = {m.D // m.H}')
  _require(m.rope_base > 0, 'model.rope_base', m.rope_base, 'must be > 0')
  _require(0 <= c.label_smoothing < 1, 'label_smoothing', c.label_smoothing, 'must be in [0, 1)')
  _require(c.z_loss >= 0, 'z_loss', c.z_loss, 'must be >= 0')
  _require(c.peak_tflops >= 0, 'peak_tflops', c.peak_tflops,
           'must be >= 0 (0: measure at start-up)')
  _require(c.batch_size % c.grad_accumulation_steps == 0, 'batch_size', c.batch_size,
           f'must be divisible by grad_accumulation_steps={c.grad_accumulation_steps}')
  for key in ('data', 'fsdp'):
    _require(isinstance(c.mesh[key], int) and (c.mesh[key] > 0 or c.mesh[key] == -1),
             f'mesh.{key}', c.mesh[key], 'must be a positive integer or -1 (the remaining devices)')
  _require(c.mesh.data != -1 or c.mesh.fsdp != -1, 'mesh.data', c.mesh.data,
           'only one of mesh.data and mesh.fsdp can be -1')
  _check_distributed(c.distributed)
  _require(c.ds_name in data.CORPORA, 'ds_name', c.ds_name, f'one of {sorted(data.CORPORA)}')
  _require(c.vocab_size > tokenizer.EOS_ID + 256, 'vocab_size', c.vocab_size,
           f'must exceed {tokenizer.EOS_ID + 256} (special pieces and 256 byte pieces)')
  if c.vocab_path:
    try:
      tokenizer.load(c.vocab_path)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  o = c.opt
  _require(o.optimizer in optimizer.OPTIMIZERS, 'opt.optimizer', o.optimizer,
           f'one of {optimizer.OPTIMIZERS}')
  _require(o.decay_type in optimizer.SCHEDULES, 'opt.decay_type', o.decay_type,
           f'one of {optimizer.SCHEDULES}')
  _require(isinstance(o.num_train_steps, int) and o.num_train_steps > 0, 'opt.num_train_steps',
           o.num_train_steps, 'must be a positive integer')
  _require(isinstance(o.warmup_steps, int) and 0 <= o.warmup_steps, 'opt.warmup_steps',
           o.warmup_steps, 'must be a non-negative integer')
  _require(o.peak_learning_rate > 0, 'opt.peak_learning_rate', o.peak_learning_rate, 'must be > 0')
  for key in ('init_learning_rate', 'final_learning_rate', 'weight_decay', 'eps'):
    _require(o[key] >= 0, f'opt.{key}', o[key], 'must be >= 0')
  _require(0 <= o.wsd_decay_fraction <= 1, 'opt.wsd_decay_fraction', o.wsd_decay_fraction,
           'must be in [0, 1]')
  try:
    re.compile(o.weight_decay_exclude)
  except re.error as e:
    raise ConfigError(f'opt.weight_decay_exclude={o.weight_decay_exclude!r} is not valid: '
                      f'not a regular expression ({e}).') from None
  try:
    [re.compile(pattern) for pattern, _ in optimizer.parse_multipliers(o.lr_multipliers)]
  except (ValueError, re.error):
    raise ConfigError(f'opt.lr_multipliers={o.lr_multipliers!r} is not valid: give '
                      "'regex=number,...', e.g. 'embed=0.5,blocks/0/=2'.") from None
  for key in ('b1', 'b2'):
    _require(0 <= o[key] < 1, f'opt.{key}', o[key], 'must be in [0, 1)')


def _check_distributed(d: ml_collections.ConfigDict) -> None:
  address = d.coordinator_address
  host, _, port = address.rpartition(':')
  _require(not address or (host and port.isdigit() and 0 < int(port) < 65536),
           'distributed.coordinator_address', address, "'' or host:port, e.g. 10.0.0.1:1234")
  _require(isinstance(d.num_processes, int) and d.num_processes >= 0, 'distributed.num_processes',
           d.num_processes, 'must be a positive integer (0: from the environment)')
  _require(isinstance(d.process_id, int) and -1 <= d.process_id
           and (d.num_processes == 0 or d.process_id < d.num_processes), 'distributed.process_id',
           d.process_id, f'must be in [0, distributed.num_processes={d.num_processes}) '
           '(-1: from the environment)')
  if address and not sharding.launched_as_one_of_several():
    _require(d.num_processes > 0 and d.process_id >= 0, 'distributed.num_processes',
             d.num_processes, 'give distributed.num_processes and distributed.process_id with '
             'a coordinator_address (no cluster launcher sets them here)')
  _require(isinstance(d.initialization_timeout, int) and d.initialization_timeout > 0,
           'distributed.initialization_timeout', d.initialization_timeout,
           'must be a positive number of seconds')


def check_devices(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError if the mesh or the batches do not fit the devices of the run."""
  try:
    sharding.mesh_shape(c.mesh.data, c.mesh.fsdp, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  A = c.grad_accumulation_steps
  _require(c.batch_size % (A * num_devices) == 0, 'batch_size', c.batch_size,
           f'each of the grad_accumulation_steps={A} micro-batches must be divisible by the '
           f'{num_devices} devices (data × fsdp): use a multiple of {A * num_devices}')
  _require(c.eval_batch_size % num_devices == 0, 'eval_batch_size', c.eval_batch_size,
           f'must be divisible by the {num_devices} devices (data × fsdp)')
