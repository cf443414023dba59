"""Parameterizations: sp as it was, each one's per-layer scales against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, tiny_model_config, tiny_steps
from flax import nnx

from nanodo import data, model, ops, optimizer

NON_SP = ('mup', 'ntk', 'mfp')
UNTIED = {'ntk': False}  # ntk's head learns at another rate than its embedding


def _params(**overrides) -> tuple[nnx.State, model.ModelConfig]:
  cfg = tiny_model_config(**overrides)
  return nnx.state(model.TransformerDecoder(cfg, nnx.Rngs(0))), cfg


def _decoder(params: nnx.State, cfg: model.ModelConfig) -> model.TransformerDecoder:
  return nnx.merge(model.abstract(cfg)[0], params)


def _first_update(params: nnx.State, cfg: model.ModelConfig, grads: nnx.State) -> nnx.State:
  """AdamW's first update of grads at the learning rate 1e-2, no decay, no clipping."""
  c = tiny_config('/unused')
  c.opt.update(weight_decay=0.0, warmup_steps=0, clip_by_global_norm=0.0)
  tx = optimizer.get_optimizer(c.opt, lambda _: 1e-2, model.scales(cfg))
  return tx.update(grads, tx.init(params), params)[0]


@pytest.mark.parametrize('name', NON_SP)
def test_each_parameterization_at_its_base_width_is_sp_bit_for_bit(name):
  x_BxL = jnp.arange(32).reshape(2, 16) % 97
  tied = UNTIED.get(name, True)
  sp, cfg_sp = _params(tied=tied)
  other, cfg = _params(parameterization=name, base_width=32, tied=tied)  # the tiny model's D
  assert model.scales(cfg) == model.scales(cfg_sp) == ops.SP
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), sp, other))
  np.testing.assert_array_equal(_decoder(sp, cfg_sp)(x_BxL), _decoder(other, cfg)(x_BxL))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-9), sp)  # small: epsilon matters
  updates = _first_update(sp, cfg_sp, grads), _first_update(other, cfg, grads)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), *updates))


# m = D / base_width = 4: a layer's output multiplier m^-a, initial std m^(1/2 - b) times sp's
# D^-1/2, learning rate m^-c and epsilon m^-g, its gradient's exponent (r = a + b of the readout:
# embedding a + r, hidden a + r, readout a, the rest r); attention m^(1/2 - attention) when K grows.
FOUR_TIMES = {
  'mup': ((1, 2, 1, 1 / 4), (1, 1, 1 / 4, 1 / 4), (1 / 4, 2, 1, 1 / 4), 1 / 4, 1 / 2),
  'ntk': ((1, 2, 1, 1 / 2), (1 / 2, 2, 1 / 2, 1 / 4), (1 / 2, 2, 1 / 2, 1 / 2), 1 / 2, 1),
  'mfp': ((1, 2, 1, 1 / 4), (1 / 2, 2, 1 / 2, 1 / 8), (1 / 4, 2, 1, 1 / 4), 1 / 4, 1 / 2),
}


@pytest.mark.parametrize('name', NON_SP)
def test_the_factors_at_four_times_the_base_width_are_the_hand_computed_ones(name):
  assert ops.width_scales(name, 64, 256, 0) == FOUR_TIMES[name]
  assert ops.width_scales(name, 64, 256, 16).attention == 1.0  # a fixed head dimension
  assert ops.width_scales('sp', 64, 256, 0) == ops.SP


# At D = 256 from a base of 64, the measured initial stds: embedding, a block's matrix, the head.
STDS = {'mup': (1 / 8, 1 / 16, 1 / 8), 'ntk': (1 / 8, 1 / 8, 1 / 8), 'mfp': (1 / 8, 1 / 8, 1 / 8)}


@pytest.mark.parametrize('name', NON_SP)
def test_initial_stds_and_the_output_multiplier_at_four_times_the_base_width(name):
  params, cfg = _params(
    D=256, H=2, F=1024, V=4096, parameterization=name, base_width=64, tied=False
  )
  embedding, hidden, head = STDS[name]
  std = lambda w: float(jnp.std(w[...]))
  assert std(params['embed_VxD']) == pytest.approx(embedding, rel=0.02)
  assert std(params['blocks'][0]['attn']['wq_DxHxK']) == pytest.approx(hidden, rel=0.02)
  assert std(params['blocks'][0]['mlp']['wi_DxF']) == pytest.approx(hidden, rel=0.02)
  assert std(params['head_DxV']) == pytest.approx(head, rel=0.02)
  # The logits are the head's, times the output multiplier: 1/4 (mup, mfp) or 1/2 (ntk).
  decoder = _decoder(params, cfg)
  h_BxLxD = decoder.hidden(jnp.zeros((1, 4), jnp.int32))
  multiplier = FOUR_TIMES[name][2][0]
  expected = jnp.einsum('BLD,DV->BLV', h_BxLxD, params['head_DxV'][...]) * multiplier
  np.testing.assert_allclose(decoder.project(h_BxLxD), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', NON_SP)
def test_the_blocks_matrices_multiply_their_outputs(name):
  cfg = tiny_model_config(D=128, F=256, parameterization=name, base_width=32)  # m = 4
  mlp = model.Mlp(cfg, nnx.Rngs(0))
  x_BxLxD = jax.random.normal(jax.random.key(1), (1, 3, 128))
  a = FOUR_TIMES[name][1][0]  # 1 (mup) or 1/2 (ntk, mfp)
  h_BxLxF = jax.nn.gelu(a * jnp.einsum('BLD,DF->BLF', x_BxLxD, mlp.wi_DxF[...]))
  expected = a * jnp.einsum('BLF,FD->BLD', h_BxLxF, mlp.wo_FxD[...])
  np.testing.assert_allclose(mlp(x_BxLxD), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name, K0', [('mup', 8), ('mfp', 8), ('ntk', 32)])
def test_attention_logits_are_q_k_over_k_in_the_feature_learning_pair(name, K0):
  # K = 32, and 8 at the base width: mup and mfp divide by K (√K0 / K), ntk by √K.
  cfg = tiny_model_config(D=64, H=2, parameterization=name, base_width=16, tied=False)
  attn = model.Attention(cfg, nnx.Rngs(0))
  attn.sow_max_logit = True
  x_BxLxD = jax.random.normal(jax.random.key(1), (1, 5, 64))
  visible = jnp.tril(jnp.ones((1, 5, 5), bool))
  _, sown = nnx.capture(attn, nnx.Intermediate)(x_BxLxD, jnp.arange(5)[None], visible, None)
  a = model.scales(cfg).hidden.multiplier
  q = a * jnp.einsum('BLD,DHK->BLHK', x_BxLxD, attn.wq_DxHxK[...])
  k = a * jnp.einsum('BLD,DHK->BLHK', x_BxLxD, attn.wkv_2xDxGxK[...][0])
  att = jnp.einsum('BLHK,BMHK->BHLM', q, k) * K0**0.5 / 32
  expected = jnp.max(jnp.where(visible[:, None], att, -jnp.inf))
  assert float(jax.tree.leaves(sown)[0]) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize('name', NON_SP)
def test_learning_rates_at_four_times_the_base_width_scale_adams_first_update(name):
  params, cfg = _params(D=128, parameterization=name, base_width=32, tied=False)
  updates = _first_update(params, cfg, jax.tree.map(jnp.ones_like, params))
  step = lambda u: float(jnp.max(jnp.abs(u[...])))
  # Adam's first update is the learning rate in size: 1e-2 times each kind's factor m^-c.
  (_, _, embedding, _), (_, _, hidden, _), (_, _, readout, _), _, _ = FOUR_TIMES[name]
  assert step(updates['embed_VxD']) == pytest.approx(1e-2 * embedding, rel=1e-4)
  assert step(updates['blocks'][0]['attn']['wq_DxHxK']) == pytest.approx(1e-2 * hidden, rel=1e-4)
  assert step(updates['blocks'][1]['mlp']['wo_FxD']) == pytest.approx(1e-2 * hidden, rel=1e-4)
  assert step(updates['head_DxV']) == pytest.approx(1e-2 * readout, rel=1e-4)
  assert step(updates['blocks'][0]['ln1']['scale']) == pytest.approx(1e-2, rel=1e-4)


@pytest.mark.parametrize('name', NON_SP)
def test_adams_epsilon_at_four_times_the_base_width_scales_with_each_gradient(name):
  params, cfg = _params(D=128, parameterization=name, base_width=32, tied=False)
  g = 1e-8  # the size of the default epsilon: the update is lr · g / (g + eps · factor)
  updates = _first_update(params, cfg, jax.tree.map(lambda p: jnp.full_like(p, g), params))
  step = lambda u: float(jnp.max(jnp.abs(u[...])))
  expected = lambda layer: 1e-2 * layer[2] * g / (g + 1e-8 * layer[3])
  embedding, hidden, readout, other_eps, _ = FOUR_TIMES[name]
  assert step(updates['embed_VxD']) == pytest.approx(expected(embedding), rel=1e-5)
  wq = updates['blocks'][0]['attn']['wq_DxHxK']
  assert step(wq) == pytest.approx(expected(hidden), rel=1e-5)
  assert step(updates['head_DxV']) == pytest.approx(expected(readout), rel=1e-5)
  ln = updates['blocks'][0]['ln1']['scale']
  assert step(ln) == pytest.approx(expected((1, 1, 1, other_eps)), rel=1e-5)
  assert step(ln) != pytest.approx(1e-2 / 2, rel=1e-3)  # not sp's epsilon


def _logits_rms_after_one_update(D: int, **overrides) -> tuple[float, float]:
  """rms of mup's logits at initialisation and after one AdamW step at 1e-2 (base width 32)."""
  c = tiny_config('/unused')
  c.opt.update(warmup_steps=0, decay_type='constant', peak_learning_rate=1e-2, weight_decay=0.0)
  cfg = tiny_model_config(D=D, F=2 * D, parameterization='mup', base_width=32, **overrides)
  steps = tiny_steps(cfg, c)
  x_BxL = jax.random.randint(jax.random.key(0), (8, cfg.L), 1, cfg.V)
  rms = lambda params: float(jnp.sqrt(jnp.mean(_decoder(params, cfg)(x_BxL) ** 2)))
  before = rms(steps.state['params'])
  state, _ = steps.train_step(steps.state, data.as_batch(x_BxL))
  return before, rms(state['params'])


def test_a_zero_head_starts_mups_logits_at_zero_and_keeps_them_alike_across_width():
  (zero_32, after_32), (zero_256, after_256) = (
    _logits_rms_after_one_update(D, tied=False, zero_head=True) for D in (32, 256)
  )
  assert zero_32 == zero_256 == 0.0
  assert 1 / 1.3 < after_32 / after_256 < 1.3
  # A tied head starts at m^-1/2 of the base width's logits, which one update does not outweigh.
  (init_32, tied_32), (init_256, tied_256) = (_logits_rms_after_one_update(D) for D in (32, 256))
  assert init_32 / init_256 == pytest.approx(8**0.5, rel=0.2)
  assert tied_32 / tied_256 > 1.5
