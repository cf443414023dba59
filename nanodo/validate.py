"""Checks a config before any compile or write; errors name the key, value and what is valid."""

import importlib.util
import re

import jax
import ml_collections

from nanodo import data, model, optimizer, tokenizer

DTYPES = ('float32', 'bfloat16')


class ConfigError(ValueError):
  """A config value that cannot work."""


def _require(ok: bool, key: str, value: object, valid: str) -> None:
  if not ok:
    raise ConfigError(f'{key}={value!r} is not valid: {valid}.')


def check(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first bad value of c."""
  _require(bool(c.workdir), 'workdir', c.workdir, 'give a directory, e.g. --config.workdir=/tmp/nanodo')
  for key in ('batch_size', 'eval_batch_size', 'vocab_size', 'log_every_steps', 'eval_every_steps',
              'checkpoint_every_steps', 'max_to_keep'):
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
  _require(isinstance(c.profile_steps, int) and c.profile_steps >= 0, 'profile_steps',
           c.profile_steps, 'must be a non-negative integer (0: no trace)')
  _require(not c.wandb_project or importlib.util.find_spec('wandb') is not None, 'wandb_project',
           c.wandb_project, "needs the wandb package: pip install 'nanodo[wandb]'")
  n = jax.device_count()
  for key in ('batch_size', 'eval_batch_size'):
    _require(c[key] % n == 0, key, c[key], f'must be divisible by the {n} devices')
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
