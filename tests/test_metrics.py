"""Metrics: JSON lines, TensorBoard, W&B, hyper-parameters, per-layer statistics, profiles;
a resumed run logs each step once."""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import tiny_config, tiny_model_config
from flax import nnx
from tensorboard.backend.event_processing import event_accumulator

from nanodo import data, train
from nanodo.ground import tree
from nanodo.infra import metrics, validate
from nanodo.model import TransformerDecoder
from nanodo.step import StepConfig, loss_fn
from nanodo.tools import trained

TRAIN_KEYS = {'loss', 'target_tokens', 'learning_rate', 'grad_norm', 'update_norm', 'param_norm'}
# The wall-clock rates: of every step but the first of a start (it compiles).
RATE_KEYS = {'tokens_per_sec', 'target_tokens_per_sec', 'mfu'}
EVAL_KEYS = {'eval_loss', 'eval_loss_stderr', 'eval_perplexity', 'eval_bits_per_byte'}


def _writer(c, step: int) -> metrics.Writer:
  """The metrics writer of the run c from step on."""
  return metrics.Writer(c.workdir, step, c.to_dict(), c.wandb_project, c.wandb_entity)


def _rows(workdir: str, name: str = 'metrics.jsonl') -> list[dict]:
  with open(os.path.join(workdir, name), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_jsonl_has_one_object_per_step_and_one_per_evaluation(tiny_run):
  rows = _rows(tiny_run)
  train_rows = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  assert {k for k in train_rows[0] if '/' not in k} == {'step', 'time', *TRAIN_KEYS}
  # Per-layer keys in every row; the rates in all but the first.
  assert all(set(r) == set(train_rows[0]) | RATE_KEYS for r in train_rows[1:])
  eval_rows = [r for r in rows if 'eval_loss' in r]
  assert [r['step'] for r in eval_rows] == [6]
  assert set(eval_rows[0]) == {'step', 'time', *EVAL_KEYS}
  assert len(rows) == len(train_rows) + len(eval_rows)


def test_tensorboard_events_read_back_equal_the_jsonl(tiny_run):
  events = event_accumulator.EventAccumulator(tiny_run, size_guidance={'scalars': 0, 'tensors': 0})
  events.Reload()
  logged_keys = {k for r in _rows(tiny_run) for k in r} - {'step', 'time'}
  assert set(events.Tags()['scalars']) == logged_keys
  for key in ('loss', 'grad_norm', 'eval_bits_per_byte', 'act/blocks/0/mlp/rms'):
    logged = {r['step']: r[key] for r in _rows(tiny_run) if key in r}
    read = {e.step: e.value for e in events.Scalars(key)}
    assert read == pytest.approx(logged, rel=1e-6)
  assert {'hparams/config/text_summary', 'hparams/versions/text_summary'} <= set(
    events.Tags()['tensors']
  )


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path):

  def steps(key):
    events = event_accumulator.EventAccumulator(c.workdir, size_guidance={'scalars': 0})
    events.Reload()
    return [e.step for e in events.Scalars(key)]

  c = tiny_config(str(tmp_path / 'run'))  # checkpoints at 3 and 6, an evaluation at 6
  train.train_and_evaluate(c)
  assert steps('loss') == [1, 2, 3, 4, 5, 6]
  # What a run killed while saving step 6 leaves: steps 4-6 logged, checkpoint 3 the latest.
  shutil.rmtree(os.path.join(c.workdir, 'checkpoints', '6'))
  train.train_and_evaluate(c)
  assert steps('loss') == [1, 2, 3, 4, 5, 6]
  assert steps('eval_loss') == [6]


def _git(*args: str) -> str | None:
  """git's output in nanodo's source tree; None outside a git checkout."""
  out = subprocess.run(
    ['git', *args], cwd=os.path.dirname(metrics.__file__), capture_output=True, text=True
  )
  return out.stdout.strip() if out.returncode == 0 else None


def test_hyper_parameters_are_recorded_once_per_start(tmp_path):
  c = tiny_config(str(tmp_path / 'run'), checkpoint_every_steps=3)
  c.opt.num_train_steps = 3
  train.train_and_evaluate(c)
  c.opt.num_train_steps = 5  # a second start: resumed from step 3
  train.train_and_evaluate(c)
  records = _rows(c.workdir, 'hparams.jsonl')
  assert [r['step'] for r in records] == [0, 3]
  with open(os.path.join(c.workdir, 'config.json'), encoding='utf-8') as f:
    assert records[-1]['config'] == json.load(f)
  assert [r['config']['opt']['num_train_steps'] for r in records] == [3, 5]
  for record in records:
    assert record['versions']['jax'] == jax.__version__
    assert record['versions']['python'] == '.'.join(map(str, sys.version_info[:3]))
    head = _git('rev-parse', 'HEAD')  # None only outside a checkout, as a pip wheel installs
    dirty = head and _git('status', '--porcelain', '--untracked-files=no')
    assert record['git_commit'] == (head and head + ('+dirty' if dirty else ''))


def test_profile_steps_write_a_trace_to_the_workdir(tiny_run):
  assert glob.glob(os.path.join(tiny_run, 'plugins', 'profile', '*', '*.xplane.pb'))


def test_per_layer_statistics_of_a_run_match_its_checkpoint(tiny_run):
  [last] = [r for r in _rows(tiny_run) if r['step'] == 6 and 'loss' in r]
  params = trained.load(tiny_run, 6).params
  for path, x in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    name, x = tree.path_str(path), np.asarray(x, np.float64)
    assert last[f'params/{name}/rms'] == pytest.approx(np.sqrt(np.mean(x**2)), rel=1e-5), name
    assert last[f'params/{name}/mean'] == pytest.approx(x.mean(), rel=1e-4, abs=1e-7), name
    assert last[f'params/{name}/std'] == pytest.approx(x.std(), rel=1e-4), name
    for prefix in ('grads', 'updates'):
      assert {f'{prefix}/{name}/{k}' for k in ('rms', 'mean', 'std')} <= set(last), (prefix, name)
  for name in ('blocks/0/attn', 'blocks/0/mlp', 'blocks/1/ln2', 'blocks/1', 'ln_f', 'output'):
    assert {f'act/{name}/{k}' for k in ('rms', 'mean', 'std')} <= set(last), name
  assert all(np.isfinite(v) for v in last.values())


def test_activation_statistics_leave_the_loss_unchanged():
  cfg = tiny_model_config()
  graphdef, params = nnx.split(TransformerDecoder(cfg, nnx.Rngs(0)))
  x_BxL = jax.random.randint(jax.random.key(0), (2, cfg.L), 1, cfg.V)
  forward = jax.jit(loss_fn, static_argnames=('graphdef', 'opts', 'internal'))
  batch, c = data.as_batch(x_BxL), tiny_config('/unused')
  opts = StepConfig.of(c).loss
  loss, (parts, _, _) = forward(params, graphdef=graphdef, batch=batch, opts=opts, internal=False)
  with_stats, (_, stats, _) = forward(
    params, graphdef=graphdef, batch=batch, opts=opts, internal=True
  )
  assert set(parts) == {'loss'}
  assert float(with_stats) == pytest.approx(float(loss), rel=1e-6)
  logits = np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x_BxL), np.float64)
  assert float(stats['act/output/rms']) == pytest.approx(np.sqrt(np.mean(logits**2)), rel=1e-4)
  assert float(stats['act/output/std']) == pytest.approx(logits.std(), rel=1e-4)


def test_count_of_embedding_and_other_parameters():
  cfg = tiny_model_config()
  model = nnx.eval_shape(lambda: TransformerDecoder(cfg, nnx.Rngs(0)))
  counts = metrics.param_counts(nnx.state(model))
  assert counts['embedding'] == (cfg.V + cfg.L) * cfg.D
  per_block = 4 * cfg.D * cfg.D + 2 * cfg.D * cfg.F + 2 * cfg.D
  assert counts['non_embedding'] == cfg.N * per_block + cfg.D
  assert counts['all'] == counts['embedding'] + counts['non_embedding']


def test_negative_profile_steps_are_refused(tmp_path):
  with pytest.raises(
    validate.ConfigError, match='profile_steps=-1 is not valid: must be a non-negative integer'
  ):
    validate.check(tiny_config(str(tmp_path), profile_steps=-1))


def test_wandb_project_without_wandb_installed_is_refused(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)
  with pytest.raises(validate.ConfigError, match="wandb_project='p' is not valid: needs the wandb"):
    validate.check(tiny_config(str(tmp_path), wandb_project='p'))


def test_wandb_run_logs_offline_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
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
  time.sleep(1.1)  # W&B names an offline run by the second it starts
  c.opt.num_train_steps = 2  # resumed from step 1
  train.train_and_evaluate(c)
  runs = sorted(glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*')))
  assert len(runs) == 2 and all(r.endswith(f'-{run_id}') for r in runs)
  [log] = glob.glob(os.path.join(runs[1], '*.wandb'))
  with open(log, 'rb') as f:
    assert b'grad_norm' in f.read()  # the resumed run logged its step to the same W&B run


def _steps(path) -> list[tuple[int, bool]]:
  with open(path, encoding='utf-8') as f:
    return [(r['step'], 'loss' in r) for r in map(json.loads, f)]


def test_rows_after_the_restored_step_and_a_torn_line_are_dropped(tmp_path):
  writer = _writer(tiny_config(str(tmp_path)), 0)
  for step in range(1, 8):
    writer.write(step, {'loss': 1.0 / step}, flush=False)
    if step % 3 == 0:
      writer.write(step, {'eval_loss': 2.0}, flush=False)
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write('{"step": 8, "lo')
  metrics.drop_rows_after(str(tmp_path), 6)
  assert _steps(tmp_path / 'metrics.jsonl') == [
    (1, True),
    (2, True),
    (3, True),
    (3, False),
    (4, True),
    (5, True),
    (6, True),
    (6, False),
  ]
  writer = _writer(tiny_config(str(tmp_path)), 0)
  writer.write(7, {'loss': 0.5}, flush=False)
  writer.close()
  assert [s for s, is_train in _steps(tmp_path / 'metrics.jsonl') if is_train] == list(range(1, 8))


def test_dropping_nothing_leaves_the_file_alone(tmp_path):
  metrics.drop_rows_after(str(tmp_path), 3)  # no file yet
  writer = _writer(tiny_config(str(tmp_path)), 0)
  writer.write(1, {'loss': 1.0}, flush=False)
  writer.close()
  before = (tmp_path / 'metrics.jsonl').stat()
  metrics.drop_rows_after(str(tmp_path), 3)
  assert (tmp_path / 'metrics.jsonl').stat().st_mtime_ns == before.st_mtime_ns
  metrics.drop_rows_after(str(tmp_path), 0)
  assert (tmp_path / 'metrics.jsonl').read_text() == ''
