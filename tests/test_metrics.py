"""Metrics: JSON lines, TensorBoard, W&B, hyper-parameters, per-layer statistics, profiles."""

import functools
import glob
import json
import os
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_config, tiny_model_config
from flax import nnx

from nanodo import metrics, optimizer, sharding, train, validate
from nanodo.model import TransformerDecoder

TRAIN_KEYS = {'loss', 'learning_rate', 'grad_norm', 'update_norm', 'param_norm', 'tokens_per_sec',
              'mfu'}
EVAL_KEYS = {'eval_loss', 'eval_loss_stderr', 'eval_perplexity', 'eval_bits_per_byte'}


def _rows(workdir: str, name: str = 'metrics.jsonl') -> list[dict]:
  with open(os.path.join(workdir, name), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_jsonl_has_one_object_per_step_and_one_per_evaluation(tiny_run):
  rows = _rows(tiny_run)
  train_rows = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  assert all(set(r) == {'step', 'time', *TRAIN_KEYS} for r in train_rows)
  eval_rows = [r for r in rows if 'eval_loss' in r]
  assert [r['step'] for r in eval_rows] == [6]
  assert set(eval_rows[0]) == {'step', 'time', *EVAL_KEYS}
  assert len(rows) == len(train_rows) + len(eval_rows)


def test_tensorboard_events_read_back_equal_the_jsonl(tiny_run):
  event_accumulator = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')
  events = event_accumulator.EventAccumulator(tiny_run, size_guidance={'scalars': 0, 'tensors': 0})
  events.Reload()
  assert set(events.Tags()['scalars']) == TRAIN_KEYS | EVAL_KEYS
  for key in ('loss', 'grad_norm', 'eval_bits_per_byte'):
    logged = {r['step']: r[key] for r in _rows(tiny_run) if key in r}
    read = {e.step: e.value for e in events.Scalars(key)}
    assert read == pytest.approx(logged, rel=1e-6)
  assert {'hparams/config/text_summary', 'hparams/versions/text_summary'} <= set(
      events.Tags()['tensors'])


def test_hyper_parameters_are_recorded_once_per_start(tiny_run):
  [record] = _rows(tiny_run, 'hparams.jsonl')
  with open(os.path.join(tiny_run, 'config.json'), encoding='utf-8') as f:
    assert record['config'] == json.load(f)
  assert record['step'] == 0
  assert record['versions']['jax'] == jax.__version__
  assert record['versions']['python'] == '.'.join(map(str, sys.version_info[:3]))
  commit = metrics.git_commit()
  assert record['git_commit'] == commit
  assert commit is None or len(commit.removesuffix('+dirty')) == 40


def test_profile_steps_write_a_trace_to_the_workdir(tiny_run):
  assert glob.glob(os.path.join(tiny_run, 'plugins', 'profile', '*', '*.xplane.pb'))


def test_per_layer_statistics_when_switched_on(tmp_path):
  c = tiny_config(str(tmp_path))
  c.opt.init_learning_rate = 1e-3
  cfg = tiny_model_config()
  tx = optimizer.get_optimizer(c.opt)
  graphdef, state, _ = train.init_state(cfg, tx, c.seed, sharding.make_mesh())
  x_BxL = jax.random.randint(jax.random.key(0), (4, cfg.L), 1, cfg.V)
  logits = np.asarray(nnx.merge(graphdef, state['params'])(x_BxL))
  loss, _ = train.loss_fn(state['params'], graphdef, x_BxL)
  step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx,
                                   schedule=optimizer.get_schedule(c.opt), layer_stats=True))
  state, s = step(state, x_BxL)
  assert float(s['loss']) == pytest.approx(float(loss), rel=1e-6)
  assert float(s['act/output/mean']) == pytest.approx(logits.mean(), rel=1e-4, abs=1e-6)
  wi = np.asarray(jax.device_get(state['params'])['blocks'][0]['mlp']['wi_DxF'][...])
  assert float(s['params/blocks/0/mlp/wi_DxF/rms']) == pytest.approx(np.sqrt(np.mean(wi**2)), 1e-5)
  assert float(s['params/blocks/0/mlp/wi_DxF/std']) == pytest.approx(wi.std(), rel=1e-4)
  for prefix in ('grads', 'updates', 'params'):
    for name in ('embed_VxD', 'pos_LxD', 'blocks/1/attn/wkv_2xDxGxK', 'ln_f/scale'):
      assert {f'{prefix}/{name}/{k}' for k in ('rms', 'mean', 'std')} <= set(s), (prefix, name)
  for name in ('blocks/0/attn', 'blocks/0/mlp', 'blocks/1/ln2', 'blocks/1', 'ln_f'):
    assert f'act/{name}/rms' in s, name
  assert all(np.isfinite(v) for v in jax.device_get(s).values())


def test_count_of_embedding_and_other_parameters():
  cfg = tiny_model_config()
  model = nnx.eval_shape(lambda: TransformerDecoder(cfg, nnx.Rngs(0)))
  counts = metrics.param_counts(nnx.state(model))
  assert counts['embedding'] == (cfg.V + cfg.L) * cfg.D
  per_block = 4 * cfg.D * cfg.D + 2 * cfg.D * cfg.F + 2 * cfg.D
  assert counts['non_embedding'] == cfg.N * per_block + cfg.D
  assert counts['all'] == counts['embedding'] + counts['non_embedding']


def test_negative_profile_steps_are_refused(tmp_path):
  with pytest.raises(validate.ConfigError,
                     match='profile_steps=-1 is not valid: must be a non-negative integer'):
    validate.check(tiny_config(str(tmp_path), profile_steps=-1))


def test_wandb_project_without_wandb_installed_is_refused(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)
  with pytest.raises(validate.ConfigError, match="wandb_project='p' is not valid: needs the wandb"):
    validate.check(tiny_config(str(tmp_path), wandb_project='p'))


def test_wandb_run_logs_offline_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
  pytest.importorskip('wandb')
  for var in ('WANDB_DIR', 'WANDB_CACHE_DIR', 'WANDB_CONFIG_DIR', 'WANDB_DATA_DIR'):
    monkeypatch.setenv(var, str(tmp_path / 'wandb_home'))
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  workdir = str(tmp_path / 'run')
  c = tiny_config(workdir, wandb_project='nanodo-test')
  c.opt.num_train_steps = 1
  validate.check(c)
  train.train_and_evaluate(c)
  with open(os.path.join(workdir, 'wandb_run_id'), encoding='utf-8') as f:
    run_id = f.read()
  [log] = glob.glob(os.path.join(workdir, 'wandb', f'offline-run-*-{run_id}', '*.wandb'))
  with open(log, 'rb') as f:
    records = f.read()
  for text in (b'eval_bits_per_byte', b'grad_norm', b'peak_learning_rate', b'git_commit'):
    assert text in records, text
  metrics.Writer(c, step=2).close()  # a resumed run's writer
  runs = glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*'))
  assert runs and all(r.endswith(f'-{run_id}') for r in runs)
