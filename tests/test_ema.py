"""opt.ema_decay: a moving average of the weights, evaluated, sampled and exported for them."""

import os
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config, tiny_steps

from nanodo import data, model, train
from nanodo.infra import checkpoint, validate, workdir
from nanodo.tools import commands


def test_the_average_moves_a_1_minus_d_step_toward_each_new_weight():
  c = tiny_config('/unused')
  c.opt.ema_decay = 0.9
  steps = tiny_steps(model.ModelConfig(V=1024, **c.model), c)
  rng = np.random.default_rng(0)
  state = steps.state
  assert 'ema' not in tiny_steps(model.ModelConfig(V=1024, **c.model), tiny_config('/u')).state
  ema = jax.device_get(state['params'])
  for _ in range(3):
    batch = data.as_batch(rng.integers(3, 1024, (c.batch_size, c.model.L)).astype(np.int32))
    state, _ = steps.train_step(state, batch)
    new = jax.device_get(state['params'])
    ema = jax.tree.map(lambda a, p: 0.9 * a + 0.1 * p, ema, new)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      ema,
      jax.device_get(state['ema']),
    )
  differ = jax.tree.map(lambda a, p: not np.allclose(a, p), jax.device_get(state['ema']), new)
  assert any(jax.tree.leaves(differ))


def test_a_run_evaluates_the_average_saves_it_and_resumes_with_the_same_numbers(tmp_path):
  c = tiny_config(str(tmp_path), checkpoint_every_steps=6)
  c.opt.update(num_train_steps=12, ema_decay=0.9)
  result = train.train_and_evaluate(c)
  # nanodo eval (and sample, export) read the average: the held-out loss the run reported.
  run, again = commands.evaluate_run(str(tmp_path))
  np.testing.assert_allclose(again['loss'], result['loss'], rtol=1e-6)
  mngr = checkpoint.manager(os.path.join(tmp_path, workdir.CHECKPOINTS))
  try:
    raw = checkpoint.restore_params(
      mngr, 12, run.params, jax.tree.map(lambda x: x.sharding, run.params)
    )
  finally:
    mngr.close()
  gaps = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), raw, run.params)
  assert max(jax.tree.leaves(gaps)) > 1e-3  # the trained weights themselves are not the average
  # Killed after checkpoint 6: the same command gives the same average, and the same loss.
  shutil.rmtree(os.path.join(tmp_path, workdir.CHECKPOINTS, '12'))
  resumed = train.train_and_evaluate(
    tiny_config(str(tmp_path), checkpoint_every_steps=6, opt=c.opt)
  )
  np.testing.assert_allclose(resumed['loss'], result['loss'], rtol=1e-6)


def test_a_decay_outside_0_1_and_a_resume_that_switches_the_average_are_refused(tmp_path):
  c = tiny_config(str(tmp_path))
  c.opt.ema_decay = 1.0
  with pytest.raises(
    validate.ConfigError, match=r'opt.ema_decay=1.0 is not valid: must be in \[0, 1\)'
  ):
    validate.check(c)
  c.opt.ema_decay = 0.0
  c.opt.num_train_steps = 3
  train.train_and_evaluate(c)
  c.opt.ema_decay = 0.99
  with pytest.raises(validate.ConfigError, match=r'opt.ema_decay: 0.0 -> 0.99'):
    train.train_and_evaluate(c)


def test_a_sweep_evaluates_and_reloads_each_variants_average(tmp_path):
  c = tiny_config(str(tmp_path), sweep='opt.peak_learning_rate=1e-3,1e-2')
  c.opt.update(num_train_steps=4, ema_decay=0.5)
  report = train.train_and_evaluate(c)
  losses = [v['eval_loss'] for v in report['variants']]
  assert abs(losses[0] - losses[1]) > 1e-3
  for k, loss in enumerate(losses):
    np.testing.assert_allclose(
      commands.evaluate_run(str(tmp_path), variant=k)[1]['loss'], loss, rtol=1e-6
    )
