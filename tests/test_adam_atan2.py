"""Adam-atan2: its update by hand, a run and a sweep with it, and the epsilon it has not."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from nanodo import optimizer, train
from nanodo.infra import validate
from nanodo.research import sweep


def _losses(workdir: str, variant: int | None = None) -> dict[int, float]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [r for r in map(json.loads, f) if 'loss' in r and r.get('variant') == variant]
  return {r['step']: r['loss'] for r in rows}


def test_the_update_is_1_27_atan2_of_adams_bias_corrected_moments_plus_decay():
  c = tiny_config('/unused')
  c.opt.update(optimizer='adam_atan2', b1=0.9, b2=0.95, weight_decay=0.1, clip_by_global_norm=0.0)
  tx = optimizer.get_optimizer(c.opt, lambda _: 1e-2)
  params = {'blocks': {'0': {'w_DxF': jnp.full((2, 3), 2.0)}}, 'ln_D': jnp.ones(3)}
  # Gradients of every size (atan2 is blind to it), a sign change and a coordinate always 0.
  g_TxF = np.array([[3e-12, -1e3, 0.0], [1e-12, 2e3, 0.0], [-2e-12, 1e3, 0.0]])
  state, m_F, v_F = tx.init(params), np.zeros(3), np.zeros(3)
  for t, g_F in enumerate(g_TxF, 1):
    grads = {'blocks': {'0': {'w_DxF': jnp.tile(g_F, (2, 1))}}, 'ln_D': jnp.asarray(g_F)}
    updates, state = tx.update(grads, state, params)
    m_F, v_F = 0.9 * m_F + 0.1 * g_F, 0.95 * v_F + 0.05 * g_F**2
    step_F = 1.27 * np.arctan2(m_F / (1 - 0.9**t), np.sqrt(v_F / (1 - 0.95**t)))
    np.testing.assert_allclose(updates['ln_D'], -1e-2 * step_F, rtol=1e-5)  # never decayed
    decayed_F = -1e-2 * (step_F + 0.1 * 2.0)
    np.testing.assert_allclose(updates['blocks']['0']['w_DxF'][0], decayed_F, rtol=1e-5)
  assert float(updates['ln_D'][2]) == 0.0


def test_a_sweep_under_mfp_with_adam_atan2_trains_each_variant_as_alone_and_learns(tmp_path):
  def config(workdir: str, spec: str):
    c = tiny_config(workdir, sweep=spec, checkpoint_every_steps=12)
    c.model.update(D=64, parameterization='mfp', base_width=16)
    c.opt.update(optimizer='adam_atan2', num_train_steps=12, peak_learning_rate=1e-2)
    return c

  swept = str(tmp_path / 'sweep')
  train.train_and_evaluate(config(swept, 'opt.b1=0.8,0.9 opt.weight_decay=0,0.1'))
  v = sweep.read(swept)[3]
  alone = str(tmp_path / 'alone')
  train.train_and_evaluate(sweep.with_values(config(alone, ''), v.values))
  a, b = _losses(alone), _losses(os.path.join(swept, 'groups', '0'), v.id)
  np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=1e-5)
  losses = list(a.values())
  assert np.mean(losses[-3:]) < losses[0] - 0.3, losses


def test_a_sweep_of_epsilon_without_adamw_is_refused_by_name():
  c = tiny_config('/unused', sweep='opt.eps=1e-8,1e-6')
  c.opt.optimizer = 'adam_atan2'
  with pytest.raises(validate.ConfigError) as e:
    validate.check(c)
  message = "sweep='opt.eps=1e-8,1e-6' is not valid: opt.eps has no part in"
  assert str(e.value).startswith(message) and 'only adamw reads it' in str(e.value)
  c.opt.optimizer = 'adamw'
  validate.check(c)
