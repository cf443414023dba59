"""Blockwise cross-entropy: the loss and gradients of all the logits at once, without them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodo import loss, model

B, L, D, V = 4, 12, 8, 37
Opts = loss.Options
HEAD = functools.partial(model.logits, softcap=0.0)


def _inputs(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 4)
  h_BxLxD = jax.random.normal(k[0], (B, L, D), dtype)
  out_VxD = jax.random.normal(k[1], (V, D))
  y_BxL = jax.random.randint(k[2], (B, L), 0, V)
  weights_BxL = (jax.random.uniform(k[3], (B, L)) > 0.3).astype(jnp.float32)
  return h_BxLxD, out_VxD, y_BxL, weights_BxL


def _all_logits(h_BxLxD, out_VxD, y_BxL, weights_BxL, s, z, cap=0.0):
  """loss.losses of every logit at once, differentiated by autodiff."""
  logits_TxV = jnp.einsum('BLD,VD->BLV', h_BxLxD.astype(jnp.float32), out_VxD).reshape(-1, V)
  if cap:
    logits_TxV = cap * jnp.tanh(logits_TxV / cap)
  return loss.losses(
    logits_TxV,
    jax.nn.logsumexp(logits_TxV, axis=-1),
    y_BxL.reshape(-1),
    weights_BxL.reshape(-1),
    Opts(s, z, True, 1),
  )


@pytest.mark.parametrize('block_size', [1, 16, 20, 48, 1000])
@pytest.mark.parametrize(
  's,z,cap',
  [(0.0, 0.0, 0.0), (0.1, 0.0, 0.0), (0.0, 1e-2, 0.0), (0.2, 1e-3, 0.0), (0.1, 1e-3, 2.0)],
)
def test_blockwise_equals_the_loss_and_gradients_of_all_logits(block_size, s, z, cap):
  h, out, y, weights = _inputs()
  # The model's head: its soft-cap, differentiated by the loss through the head's own VJP.
  head = functools.partial(model.logits, softcap=cap)
  blockwise = lambda h, out: loss.blockwise(head, h, out, y, weights, Opts(s, z, True, block_size))
  whole = lambda h, out: _all_logits(h, out, y, weights, s, z, cap)
  (objective, parts), grads = jax.value_and_grad(blockwise, (0, 1), has_aux=True)(h, out)
  (expected, expected_parts), expected_grads = jax.value_and_grad(whole, (0, 1), has_aux=True)(
    h, out
  )
  assert (
    set(parts)
    == set(expected_parts)
    == {'loss', 'loss_sq'} | ({'smoothed_loss'} if s else set()) | ({'z_loss'} if z else set())
  )
  np.testing.assert_allclose(objective, expected, rtol=1e-6)
  for k in parts:
    np.testing.assert_allclose(parts[k], expected_parts[k], rtol=1e-6)
  # Without a gradient, the forward-only scan gives the same sums.
  forward_objective, forward_parts = blockwise(h, out)
  np.testing.assert_allclose(forward_objective, expected, rtol=1e-6)
  for k in parts:
    np.testing.assert_allclose(forward_parts[k], expected_parts[k], rtol=1e-6)
  for g, expected_g in zip(grads, expected_grads, strict=True):
    np.testing.assert_allclose(g, expected_g, atol=1e-5)
  assert float(jnp.abs(grads[0]).max()) > 0.01  # not vacuous


def test_padding_targets_get_no_gradient():
  h, out, y, weights = _inputs()
  d_h = jax.grad(lambda h: loss.blockwise(HEAD, h, out, y, weights, Opts(0.1, 1e-3, False, 16))[0])(
    h
  )
  assert not np.any(np.asarray(d_h)[np.asarray(weights) == 0])
  assert np.all(np.abs(np.asarray(d_h)[np.asarray(weights) == 1]).sum(-1) > 0)


def test_the_logits_of_all_tokens_never_exist_at_once():
  h, out, y, weights = _inputs()
  grad = jax.jit(
    jax.grad(
      lambda h, out: loss.blockwise(HEAD, h, out, y, weights, Opts(0.0, 0.0, False, 16))[0],
      (0, 1),
    )
  )
  hlo = grad.lower(h, out).compile().as_text()
  assert f'f32[16,{V}]' in hlo  # one block of 4 rows x 4 positions
  for shape in (f'[{B * L},{V}]', f'[{B},{L},{V}]', f'[{V},{B * L}]'):
    assert shape not in hlo


def test_the_gradient_keeps_the_dtype_of_the_hidden_states():
  h, out, y, weights = _inputs(jnp.bfloat16)
  d_h, d_out = jax.grad(
    lambda h, out: loss.blockwise(HEAD, h, out, y, weights, Opts(0.0, 0.0, False, 16))[0], (0, 1)
  )(h, out)
  assert d_h.dtype == jnp.bfloat16 and d_out.dtype == jnp.float32
