"""Model properties: shapes, causality, tied embeddings, dtypes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HUB_OPTIONS, tiny_model_config
from flax import nnx

from nanodo.model import TransformerDecoder


def _logits(cfg, x_BxL, seed=0):
  return TransformerDecoder(cfg, nnx.Rngs(seed))(x_BxL)


def test_output_shape_and_dtype():
  cfg = tiny_model_config()
  x_BxL = jnp.ones((3, cfg.L), jnp.int32)
  logits_BxLxV = _logits(cfg, x_BxL)
  assert logits_BxLxV.shape == (3, cfg.L, cfg.V)
  assert logits_BxLxV.dtype == jnp.float32


@pytest.mark.parametrize('remat, options', [(False, {}), (True, {}), (False, HUB_OPTIONS)])
def test_future_tokens_do_not_change_past_logits(remat, options):
  cfg = tiny_model_config(remat=remat, **options)
  model = TransformerDecoder(cfg, nnx.Rngs(0))
  x_BxL = jax.random.randint(jax.random.key(1), (2, cfg.L), 0, cfg.V)
  t = cfg.L // 2
  changed_BxL = x_BxL.at[:, t:].set((x_BxL[:, t:] + 1) % cfg.V)
  before, after = model(x_BxL), model(changed_BxL)
  np.testing.assert_array_equal(before[:, :t], after[:, :t])
  assert not np.allclose(before[:, t:], after[:, t:])
  # remat took effect: the backward pass recomputes the blocks (a checkpoint in the jaxpr).
  graphdef, params = nnx.split(model)
  grad = jax.grad(lambda p: nnx.merge(graphdef, p)(x_BxL).sum())
  assert bool(re.search(r' (remat2|checkpoint)\[', str(jax.make_jaxpr(grad)(params)))) == remat


def test_shorter_input_uses_first_positions():
  cfg = tiny_model_config()
  model = TransformerDecoder(cfg, nnx.Rngs(0))
  x_BxL = jax.random.randint(jax.random.key(1), (2, cfg.L), 0, cfg.V)
  np.testing.assert_allclose(model(x_BxL[:, :5]), model(x_BxL)[:, :5], rtol=1e-5, atol=1e-5)


def test_input_and_output_embedding_are_one_array():
  cfg = tiny_model_config()
  model = TransformerDecoder(cfg, nnx.Rngs(0))
  vocab_sized = [p for p in jax.tree.leaves(nnx.state(model, nnx.Param)) if cfg.V in p.shape]
  assert len(vocab_sized) == 1
  # Token 5 never appears in x, yet its row of the table moves its logit: the output uses it.
  x_BxL = jnp.zeros((1, cfg.L), jnp.int32)
  before = model(x_BxL)
  new_row_D = jax.random.normal(jax.random.key(2), (cfg.D,))
  model.embed_VxD[...] = model.embed_VxD[...].at[5].set(new_row_D)
  after = model(x_BxL)
  assert not np.allclose(before[..., 5], after[..., 5])
  np.testing.assert_array_equal(np.delete(before, 5, -1), np.delete(after, 5, -1))


def test_no_biases_and_float32_params_under_bfloat16():
  cfg = tiny_model_config(dtype='bfloat16')
  model = TransformerDecoder(cfg, nnx.Rngs(0))
  names = [str(path[-1]) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  assert not any('bias' in n for n in names)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logits_BxLxV = model(jnp.ones((2, cfg.L), jnp.int32))
  assert logits_BxLxV.dtype == jnp.float32
  reference = TransformerDecoder(tiny_model_config(), nnx.Rngs(0))(jnp.ones((2, cfg.L), jnp.int32))
  np.testing.assert_allclose(logits_BxLxV, reference, atol=0.1)


@pytest.mark.parametrize(
  'options', [{}, {'positions': 'rope', 'attention': 'dot_product_attention', 'KV': 1}]
)
def test_packed_documents_do_not_see_each_other_and_restart_positions(options):
  cfg = tiny_model_config(**options)
  model = TransformerDecoder(cfg, nnx.Rngs(0))
  a, b = 6, 7  # document A in tokens 0-5, document B in 6-12, then padding
  segment_ids_1xL = jnp.array([[1] * a + [2] * b + [0] * (cfg.L - a - b)])
  positions_1xL = jnp.array([[*range(a), *range(b), *[0] * (cfg.L - a - b)]])
  x_1xL = jax.random.randint(jax.random.key(1), (1, cfg.L), 1, cfg.V) * (segment_ids_1xL > 0)
  changed_1xL = x_1xL.at[:, :a].set((x_1xL[:, :a] + 1) % cfg.V)
  before = model(x_1xL, segment_ids_1xL, positions_1xL)
  after = model(changed_1xL, segment_ids_1xL, positions_1xL)
  # Changing document A changes its own logits, and not one logit of document B.
  assert not np.allclose(before[:, :a], after[:, :a])
  np.testing.assert_array_equal(before[:, a : a + b], after[:, a : a + b])
  # Document B scores as if it stood alone at the start of a row.
  alone = model(x_1xL[:, a : a + b])
  np.testing.assert_allclose(before[:, a : a + b], alone, rtol=1e-5, atol=1e-5)
