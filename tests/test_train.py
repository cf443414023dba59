"""The jitted train step: metrics, learning, shardings."""

import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import VOCAB, tiny_config, tiny_model_config, tiny_steps
from flax import nnx
from ml_collections import ConfigDict

from nanodo import data, optimizer, step, train
from nanodo.corpora import inputs, sources, token_cache, tokenizer
from nanodo.infra import checkpoint, metrics, workdir
from nanodo.model import TransformerDecoder


def _step_fn(c, cfg):
  run = tiny_steps(cfg, c)
  return run.state, run.train_step


def test_one_step_metrics_and_state(tmp_path):
  c = tiny_config(str(tmp_path))
  c.opt.init_learning_rate = 1e-4
  cfg = tiny_model_config()
  state, step = _step_fn(c, cfg)
  before = jax.tree.map(np.asarray, state['params'])
  x_BxL = jax.random.randint(jax.random.key(0), (4, cfg.L), 1, cfg.V)
  state, m = step(state, data.as_batch(x_BxL))
  assert set(m) == {
    'loss',
    'target_tokens',
    'learning_rate',
    'grad_norm',
    'update_norm',
    'param_norm',
  }
  assert all(np.isfinite(v) for v in jax.device_get(m).values())
  assert int(state['step']) == 1
  assert float(m['learning_rate']) == pytest.approx(1e-4, rel=1e-5)  # float32
  assert np.log(cfg.V) < float(m['loss']) < np.log(cfg.V) + 1.5  # near uniform at init
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), before, jax.device_get(state['params']))
  assert all(jax.tree.leaves(moved))


def test_loss_falls_when_overfitting_one_batch(tmp_path):
  c = tiny_config(str(tmp_path))
  c.opt.update(num_train_steps=40, warmup_steps=5, peak_learning_rate=1e-2)
  cfg = tiny_model_config()
  state, step = _step_fn(c, cfg)
  x_BxL = jax.random.randint(jax.random.key(0), (4, cfg.L), 1, cfg.V)
  losses = []
  for _ in range(40):
    state, m = step(state, data.as_batch(x_BxL))
    losses.append(float(m['loss']))
  assert losses[-1] < 0.2 * losses[0], losses


def test_padding_targets_carry_no_loss(tmp_path):
  c = tiny_config(str(tmp_path))
  cfg = tiny_model_config()
  run = tiny_steps(cfg, c)
  state, graphdef, opts = run.state, run.graphdef, step.StepConfig.of(c)
  loss_fn = lambda batch: step.loss_fn(state['params'], graphdef, batch, opts.loss, False)[0]
  x_BxL = jax.random.randint(jax.random.key(0), (2, cfg.L), 1, cfg.V)
  padded = data.as_batch(x_BxL.at[:, 10:].set(0))
  loss = loss_fn(padded)
  # Padding that is not a target changes nothing: tokens 10 on are padding in both.
  other = {**padded, 'x': padded['x'].copy()}
  other['x'][:, 12:] = 7
  assert float(loss) == pytest.approx(float(loss_fn(data.with_targets(other))))
  # The same rows without padding: the targets at 10 and on now count.
  assert float(loss) != pytest.approx(float(loss_fn(data.as_batch(x_BxL))))


def test_weight_decay_skips_embeddings_and_scales(tmp_path):
  c = tiny_config(str(tmp_path))
  state, _ = _step_fn(c, tiny_model_config())
  mask = optimizer.decay_mask(state['params'], c.opt.weight_decay_exclude)
  flat = {
    jax.tree_util.keystr(path, simple=True, separator='/'): v
    for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
  }
  assert flat['embed_VxD/value'] is False and flat['pos_LxD/value'] is False
  assert flat['blocks/0/mlp/wi_DxF/value'] is True
  assert flat['blocks/0/ln1/scale/value'] is False


SHARDED = """
import jax
from conftest import tiny_config, tiny_model_config, tiny_steps
cfg = tiny_model_config(D=64, F=128, L=32)
state = tiny_steps(cfg, tiny_config('/unused')).state
for name, x in [('wi', state['params']['blocks'][0]['mlp']['wi_DxF'][...]),
                ('mu', state['opt_state'][1][0].mu['blocks'][0]['mlp']['wi_DxF'][...]),
                ('embed', state['params']['embed_VxD'][...])]:
  print(name, x.shape, x.addressable_shards[0].data.shape, len(x.sharding.device_set))
"""


def test_params_and_optimizer_state_are_sharded_over_8_devices():
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  out = subprocess.run(
    [sys.executable, '-c', SHARDED],
    env=env,
    capture_output=True,
    text=True,
    cwd=os.path.dirname(__file__),
    check=True,
  ).stdout
  lines = dict((line.split(' ', 1)) for line in out.strip().splitlines())
  assert lines['wi'] == '(64, 128) (8, 128) 8'
  assert lines['mu'] == '(64, 128) (8, 128) 8'
  assert lines['embed'] == '(97, 64) (97, 8) 8'


def test_model_flops_per_token_counts_every_matmul():
  cfg = tiny_model_config()
  params = nnx.state(TransformerDecoder(cfg, nnx.Rngs(0)))
  D, F, L, N, V = cfg.D, cfg.F, cfg.L, cfg.N, cfg.V
  # Per block: q, k, v, o (4·D·D) and the MLP (2·D·F); forward and backward are 3 × 2 FLOPs.
  expected = 6 * N * (4 * D * D + 2 * D * F) + 6 * N * L * D * 2 + 6 * D * V
  # LayerNorm scales are parameters too (N blocks × 2 + final), counted in P as 6 FLOPs each.
  expected += 6 * (2 * N + 1) * D
  assert metrics.model_flops_per_token(params, cfg) == expected
  # An explicit head dimension widens q, k, v, o and the attention scores: H·K for D.
  cfg = tiny_model_config(K=24)
  params = nnx.state(TransformerDecoder(cfg, nnx.Rngs(0)))
  expected = 6 * N * (4 * D * 2 * 24 + 2 * D * F) + 6 * N * L * 2 * 24 * 2 + 6 * D * V
  assert metrics.model_flops_per_token(params, cfg) == expected + 6 * (2 * N + 1) * D


# The timed run's extra waits: in its first step (as a long compile would be) and in each save.
FIRST_STEP_SECONDS = SAVE_SECONDS = 1.0


@pytest.fixture(scope='module')
def timed_run(tmp_path_factory) -> tuple[ConfigDict, list[dict]]:
  """A 6-step run whose first step and checkpoint saves (steps 2, 4, 6) are slow: its rows."""
  c = tiny_config(str(tmp_path_factory.mktemp('timed')), peak_tflops=1e-3)
  c.checkpoint_every_steps = 2
  setup, save = train.build_steps, checkpoint.save
  steps = []

  def slow_first_step(state, batch, *, step):
    if not steps:
      time.sleep(FIRST_STEP_SECONDS)
    steps.append(1)
    return step(state, batch)

  def slow_setup(*args):
    run = setup(*args)
    return run._replace(train_step=functools.partial(slow_first_step, step=run.train_step))

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, 'build_steps', slow_setup)
    mp.setattr(checkpoint, 'save', lambda *args: time.sleep(SAVE_SECONDS) or save(*args))
    train.train_and_evaluate(c)
  with open(os.path.join(c.workdir, workdir.METRICS), encoding='utf-8') as f:
    return c, [r for r in map(json.loads, f) if 'loss' in r]


def _seconds(c: ConfigDict, row: dict) -> float:
  """The wall-clock time of a logged step: its row tokens over its logged rate."""
  return c.batch_size * c.model.L / row['tokens_per_sec']


def test_logged_mfu_uses_the_given_peak(timed_run):
  c, rows = timed_run
  cfg = tiny_model_config(L=c.model.L, V=tokenizer.load(VOCAB).vocab_size())
  per_token = metrics.model_flops_per_token(nnx.state(TransformerDecoder(cfg, nnx.Rngs(0))), cfg)
  for r in rows[1:]:
    assert r['mfu'] == pytest.approx(r['tokens_per_sec'] * per_token / 1e9, rel=1e-6)
  # Row tokens/s is the step's rows over the wall-clock time since the step before was logged
  # (when no save came between).
  for before, r in itertools.pairwise(rows[1:]):
    if before['step'] % c.checkpoint_every_steps:
      assert _seconds(c, r) == pytest.approx(r['time'] - before['time'], abs=0.02)


def test_target_tokens_per_sec_counts_the_targets_of_the_step(timed_run):
  c, rows = timed_run
  # The run's batches again: the same data, seed and packing.
  sp = tokenizer.load(VOCAB)
  split = sources.get_split(sources.Source.of(c), 'train')
  tokens = token_cache.load_shared(split, sp, workdir.cache_dir(c.cache_dir, c.workdir), 1)
  batches = iter(data.train_dataset(tokens, c.model.L, c.batch_size, c.seed, c.packing))
  for r, batch in zip(rows, batches, strict=False):
    targets = float(batch['weights'].sum())
    assert targets < c.batch_size * c.model.L  # document starts (and padding) are not targets
    assert r['target_tokens'] == targets
    if 'target_tokens_per_sec' in r:
      assert r['target_tokens_per_sec'] * _seconds(c, r) == pytest.approx(targets, rel=1e-6)


def test_a_checkpoint_save_is_not_in_the_next_steps_rate(timed_run):
  c, rows = timed_run
  after_save = [(before, r) for before, r in itertools.pairwise(rows) if before['step'] % 2 == 0]
  assert [r['step'] for _, r in after_save] == [3, 5]
  for before, r in after_save:
    assert r['time'] - before['time'] >= SAVE_SECONDS  # the save came between the two
    assert _seconds(c, r) < SAVE_SECONDS / 2


def test_the_step_that_compiled_has_no_rate(timed_run):
  c, rows = timed_run
  rated = [r for r in rows if 'tokens_per_sec' in r]
  assert [r['step'] for r in rated] == [2, 3, 4, 5, 6]
  assert all(_seconds(c, r) < FIRST_STEP_SECONDS / 2 for r in rated)
  assert not {'target_tokens_per_sec', 'mfu'} & set(rows[0])


def test_a_workdir_tokenizer_of_another_size_is_not_reused_silently(tmp_path):
  shutil.copy(VOCAB, tmp_path / workdir.TOKENIZER)
  c = tiny_config(str(tmp_path), vocab_path='', vocab_size=2048)
  found = workdir.tokenizer_path(c.vocab_path, c.workdir)
  with pytest.raises(
    ValueError,
    match=r'^vocab_size=2048 is not valid: .* holds a tokenizer of '
    r'1024 pieces; set vocab_size=1024\.',
  ):
    inputs.get_tokenizer(found, c.vocab_size, False, found, split=None)
  assert inputs.get_tokenizer(found, 1024, False, found, split=None).vocab_size() == 1024
