"""Config checks: every key, before any work; resume may not change model, tokenizer or data."""

import json
import os

import ml_collections
import pytest
from conftest import tiny_config

from nanodo.configs import default, lm1b, ten_minutes
from nanodo.infra import validate, workdir

_MISSING = object()


def _flat(tree: dict, prefix: str = '') -> dict[str, object]:
  return {
    k: v
    for key, value in tree.items()
    for k, v in (
      _flat(value, f'{prefix}{key}.').items()
      if isinstance(value, dict)
      else [(prefix + key, value)]
    )
  }


DECLARED = _flat(default.get_config().to_dict())


def _with(workdir_: str, key: str, value: object) -> ml_collections.ConfigDict:
  """The tiny config with key set to value, whatever its type."""
  d = tiny_config(workdir_).to_dict()
  *parents, leaf = key.split('.')
  node = d
  for p in parents:
    node = node[p]
  if value is _MISSING:
    del node[leaf]
  else:
    node[leaf] = value
  return ml_collections.ConfigDict(d)


@pytest.mark.parametrize('config', [default.get_config, lm1b.get_config, ten_minutes.get_config])
def test_shipped_configs_pass(config, tmp_path):
  c = config()
  c.workdir = str(tmp_path / 'run')
  validate.check(c)


@pytest.mark.parametrize('key', sorted(DECLARED))
def test_every_key_is_type_checked(key, tmp_path):
  wrong = 3 if isinstance(DECLARED[key], str) else 'x'
  with pytest.raises(validate.ConfigError, match=rf'^{key}={wrong!r} is not valid: must be '):
    validate.check(_with(str(tmp_path), key, wrong))


@pytest.mark.parametrize(
  'key,value,message',
  [
    ('seed', -1, 'must be in [0, 2**32)'),
    ('seed', 2**32, 'must be in [0, 2**32)'),
    ('batch_size', 0, 'must be a positive integer'),
    ('batch_size', True, 'must be an integer'),
    ('eval_batch_size', -8, 'must be a positive integer'),
    ('vocab_size', 100, 'must exceed 259'),
    ('vocab_path', '/no/such.model', 'is not a readable SentencePiece model'),
    ('ds_name', 'lm2b', "one of ['shakespeare', 'pystdlib'"),
    ('model.D', 31, 'must be divisible by model.H=2'),
    ('model.H', 0, 'must be a positive integer'),
    ('model.L', 1, 'must be at least 2'),
    ('model.N', -1, 'must be a positive integer'),
    ('model.F', 0, 'must be a positive integer'),
    ('model.dtype', 'float16', "one of ('float32', 'bfloat16')"),
    ('model.remat', 1, 'must be True or False'),
    ('opt.optimizer', 'sgd', "one of ('adamw', "),
    ('opt.decay_type', 'cos', "one of ('cosine', "),
    ('opt.num_train_steps', 0, 'must be a positive integer'),
    ('opt.warmup_steps', -1, 'must be a non-negative integer'),
    ('opt.peak_learning_rate', 0.0, 'must be > 0'),
    ('opt.peak_learning_rate', float('inf'), 'must be a finite number'),
    ('opt.init_learning_rate', float('nan'), 'must be a finite number'),
    ('opt.final_learning_rate', -1e-4, 'must be >= 0'),
    ('opt.weight_decay', -0.1, 'must be >= 0'),
    ('opt.b1', -0.1, 'must be in [0, 1)'),
    ('opt.b2', 1.0, 'must be in [0, 1)'),
    ('opt.eps', -1e-8, 'must be >= 0'),
    ('opt.clip_by_global_norm', -1.0, 'must be >= 0'),
    ('model.tied', 'no', 'must be True or False'),
    ('model.zero_head', True, 'needs model.tied=False: a tied head is the input embedding'),
    ('model.KV', 1.0, 'must be an integer'),
    ('model.K', -1, 'must be a positive integer (0: model.D // model.H)'),
    ('model.bias', 'some', "one of ('none', 'qkv', 'all')"),
    ('model.rope_scaling', 'llama3:8,1,4,16', "scales RoPE: needs model.positions='rope'"),
    ('peak_tflops', -1.0, 'must be >= 0'),
    ('log_every_steps', 0, 'must be a positive integer'),
    ('eval_every_steps', 0, 'must be a positive integer'),
    ('checkpoint_every_steps', -3, 'must be a positive integer'),
    ('max_to_keep', 0, 'must be a positive integer'),
    ('cross_entropy_block_size', 0, 'must be a positive integer'),
    ('distributed.heartbeat_timeout', 0, 'must be a positive number of seconds'),
    ('checkpoint_restore_dir', '/no/such/run', 'a nanodo workdir with checkpoints'),
    ('workdir', '', 'give a directory'),
    ('opt.lr', 0.1, 'not a config key'),
    ('opt.eps', _MISSING, 'missing'),
  ],
)
def test_bad_values_name_the_key_the_value_and_what_is_valid(key, value, message, tmp_path):
  shown = None if value is _MISSING else value
  with pytest.raises(validate.ConfigError) as e:
    validate.check(_with(str(tmp_path / 'run'), key, value))
  assert str(e.value).startswith(f'{key}={shown!r} is not ')
  assert message in str(e.value)


@pytest.mark.parametrize(
  'spec', ['llama3:8,1,4', 'yarn:8,1,4,16', 'llama3:8,4,1,16', 'llama3:a,b,c,d']
)
def test_a_rope_scaling_that_is_not_llama3s_is_refused(spec, tmp_path):
  c = tiny_config(str(tmp_path / 'run'))
  c.model.update(positions='rope', rope_scaling=spec)
  with pytest.raises(validate.ConfigError, match='llama3:factor,low_freq_factor,high_freq_factor'):
    validate.check(c)
  c.model.update(rope_scaling='llama3:8,1,4,16', D=30, K=16)  # D / H need not be the head
  validate.check(c)


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(validate.ConfigError, match='exists and is not a directory'):
    validate.check(tiny_config(str(tmp_path / 'file')))


def test_resume_refuses_a_changed_model_tokenizer_or_data_and_lists_each_change(tmp_path):
  c = tiny_config(str(tmp_path))
  workdir.write_config(c)
  c.model.D, c.model.positions, c.vocab_size, c.batch_size = 64, 'rope', 2048, 8
  c.opt.optimizer = 'lion'
  with pytest.raises(validate.ConfigError) as e:
    validate.check_resume(c)
  for change in (
    'model.D: 32 -> 64',
    "model.positions: 'learned' -> 'rope'",
    'vocab_size: 8192 -> 2048',
    'batch_size: 4 -> 8',
    "opt.optimizer: 'adamw' -> 'lion'",
  ):
    assert change in str(e.value)
  assert 'model.H' not in str(e.value)


def test_resume_allows_changing_the_length_schedule_and_intervals(tmp_path):
  c = tiny_config(str(tmp_path))
  workdir.write_config(c)
  c.opt.num_train_steps, c.opt.peak_learning_rate, c.opt.decay_type = 100, 1e-4, 'linear'
  c.eval_every_steps, c.checkpoint_every_steps, c.log_every_steps = 7, 5, 3
  c.model.remat, c.model.dtype, c.model.attention = True, 'bfloat16', 'dot_product_attention'
  c.max_to_keep, c.z_loss, c.opt.lr_multipliers = 9, 1e-4, 'embed=0.5'
  validate.check_resume(c)


def test_resume_takes_a_key_missing_from_an_older_config_json_as_its_default(tmp_path):
  c = tiny_config(str(tmp_path))
  old = json.loads(c.to_json())
  del old['model']['remat'], old['seed']
  with open(os.path.join(str(tmp_path), workdir.CONFIG), 'w', encoding='utf-8') as f:
    json.dump(old, f)
  validate.check_resume(c)
  c.seed = 7
  with pytest.raises(validate.ConfigError, match='seed: 42 -> 7'):
    validate.check_resume(c)


def test_starting_from_another_run_needs_its_model_and_tokenizer_not_its_data(tmp_path):
  other = tiny_config(str(tmp_path / 'other'))
  os.makedirs(other.workdir)
  workdir.write_config(other)
  c = tiny_config(str(tmp_path / 'run'), checkpoint_restore_dir=other.workdir, batch_size=8, seed=1)
  validate.check_resume(c)
  c.model.N = 3
  with pytest.raises(
    validate.ConfigError,
    match=r"^checkpoint_restore_dir='.*other' holds a run "
    r'.*model.N: 2 -> 3\.',
  ):
    validate.check_resume(c)
