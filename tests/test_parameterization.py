"""Parameterizations: sp as it was, mup's per-layer scales against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, tiny_model_config
from flax import nnx

from nanodo import model, ops, optimizer
from nanodo.infra import validate
from nanodo.tools import hf_families


def _params(**overrides) -> dict:
  cfg = tiny_model_config(**overrides)
  return nnx.state(model.TransformerDecoder(cfg, nnx.Rngs(0))), cfg


def _logits(params, cfg, x_BxL):
  return nnx.merge(model.abstract(cfg)[0], params)(x_BxL)


def test_mup_at_its_base_width_is_sp_bit_for_bit():
  x_BxL = jnp.arange(32).reshape(2, 16) % 97
  sp, cfg_sp = _params()
  mup, cfg_mup = _params(parameterization='mup', base_width=32)  # the tiny model's D
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), sp, mup))
  np.testing.assert_array_equal(_logits(sp, cfg_sp, x_BxL), _logits(mup, cfg_mup, x_BxL))
  assert model.scales(cfg_sp) == model.scales(cfg_mup) == ops.WidthScales(1.0, 1.0, 1.0, 1.0)


def test_mup_scales_four_times_the_base_width_as_hand_computed():
  # m = D / base_width = 256 / 64 = 4; H = 2 heads of K = 128, 32 at the base width.
  assert ops.width_scales('mup', 64, 256, 0) == (2.0, 0.25, 0.25, 0.5)
  assert ops.width_scales('mup', 64, 256, 16) == (2.0, 0.25, 0.25, 1.0)  # K fixed at 16
  assert ops.width_scales('sp', 64, 256, 0) == (1.0, 1.0, 1.0, 1.0)
  params, cfg = _params(D=256, H=2, F=1024, V=4096, parameterization='mup', base_width=64)
  # The embedding keeps the base width's std, 64^-1/2 = 0.125; the blocks' matrices keep sp's.
  assert float(jnp.std(params['embed_VxD'][...])) == pytest.approx(0.125, rel=0.02)
  wq = params['blocks'][0]['attn']['wq_DxHxK'][...]
  assert float(jnp.std(wq)) == pytest.approx(256**-0.5, rel=0.02)
  # The logits are the tied embedding's, divided by m.
  decoder = nnx.merge(model.abstract(cfg)[0], params)
  h_BxLxD = decoder.hidden(jnp.zeros((1, 4), jnp.int32))
  expected = jnp.einsum('BLD,VD->BLV', h_BxLxD, params['embed_VxD'][...]) / 4
  np.testing.assert_allclose(decoder.project(h_BxLxD), expected, rtol=1e-5, atol=1e-6)


def test_attention_logits_under_mup_are_sqrt_k0_over_k():
  cfg = tiny_model_config(D=64, H=2, parameterization='mup', base_width=16)  # K 32, K0 8
  attn = model.Attention(cfg, nnx.Rngs(0))
  attn.sow_max_logit = True
  x_BxLxD = jax.random.normal(jax.random.key(1), (1, 5, 64))
  visible = jnp.tril(jnp.ones((1, 5, 5), bool))
  _, sown = nnx.capture(attn, nnx.Intermediate)(x_BxLxD, jnp.arange(5)[None], visible, None)
  q = jnp.einsum('BLD,DHK->BLHK', x_BxLxD, attn.wq_DxHxK[...])
  k = jnp.einsum('BLD,DHK->BLHK', x_BxLxD, attn.wkv_2xDxGxK[...][0])
  att = jnp.einsum('BLHK,BMHK->BHLM', q, k) * 8**0.5 / 32
  expected = jnp.max(jnp.where(visible[:, None], att, -jnp.inf))
  assert float(jax.tree.leaves(sown)[0]) == pytest.approx(float(expected), rel=1e-5)


def test_mup_blocks_learn_at_one_over_m_of_the_rate():
  params, cfg = _params(D=128, parameterization='mup', base_width=32)
  c = tiny_config('/unused')
  c.opt.update(weight_decay=0.0, warmup_steps=0, clip_by_global_norm=0.0)
  tx = optimizer.get_optimizer(c.opt, lambda _: 1e-2, model.scales(cfg).hidden_lr)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  step = lambda u: float(jnp.max(jnp.abs(u[...])))
  # Adam's first update is the learning rate in size: 1e-2, and 1e-2 / 4 for the blocks' matrices.
  assert step(updates['embed_VxD']) == pytest.approx(1e-2, rel=1e-4)
  assert step(updates['blocks'][0]['attn']['wq_DxHxK']) == pytest.approx(2.5e-3, rel=1e-4)
  assert step(updates['blocks'][0]['mlp']['wo_FxD']) == pytest.approx(2.5e-3, rel=1e-4)
  assert step(updates['blocks'][0]['ln1']['scale']) == pytest.approx(1e-2, rel=1e-4)


@pytest.mark.parametrize(
  'overrides, key, message',
  [
    ({'model.parameterization': 'ntk'}, 'model.parameterization', "one of ('sp', 'mup')"),
    ({'model.parameterization': 'mup'}, 'model.base_width', 'mup needs the width'),
    (
      {'model.parameterization': 'mup', 'model.base_width': 16, 'opt.optimizer': 'lion'},
      'opt.optimizer',
      "must be 'adamw' with mup",
    ),
  ],
)
def test_a_bad_parameterization_is_refused_by_name(overrides, key, message):
  c = tiny_config('/unused')
  for k, v in overrides.items():
    c[k.split('.')[0]][k.split('.')[1]] = v
  with pytest.raises(validate.ConfigError) as e:
    validate.check(c)
  assert str(e.value).startswith(key) and message in str(e.value)


def test_export_refuses_mup_by_name():
  keys = dict(tiny_model_config(parameterization='mup', base_width=16).__dict__)
  with pytest.raises(ValueError, match=r"model.parameterization='mup' has no Hugging Face"):
    hf_families.family(keys)
