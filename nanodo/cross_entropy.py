"""Next-token cross-entropy from the last hidden states, a block of tokens at a time.

The logits of a whole batch (B·L·V floats) never exist at once: each block's logits give the
block's loss and its gradient (the softmax minus the target), and are dropped. Levanter calls
this blockwise cross-entropy. It saves the memory of the logits on every device, and on CPU it is
faster than the autodiff of a softmax over all the logits.
"""

import functools

import jax
import jax.numpy as jnp

# Parts of the objective, each a sum over the weighted targets.
Parts = dict[str, jax.Array]
# Tokens whose logits exist at once (over all devices); the fastest on a 2-core CPU.
BLOCK_SIZE = 512


def losses(
  logits_TxV: jax.Array,
  logz_T: jax.Array,
  y_T: jax.Array,
  weights_T: jax.Array,
  label_smoothing: float,
  z_loss: float,
) -> tuple[jax.Array, Parts]:
  """The objective and its parts, each a weighted sum over the targets; logz_T: logsumexp.

  'loss' is always the plain next-token cross-entropy; label smoothing and the z-loss (on the
  log-normalizer) are parts of their own when on.
  """
  total = lambda v_T: jnp.sum(v_T * weights_T)
  parts = {'loss': total(logz_T - jnp.take_along_axis(logits_TxV, y_T[:, None], -1)[:, 0])}
  objective = parts['loss']
  if label_smoothing:
    # Cross-entropy against (1 - s) on the target plus s spread uniformly over the vocabulary.
    parts['smoothed_loss'] = (1 - label_smoothing) * parts['loss'] + label_smoothing * total(
      logz_T - jnp.mean(logits_TxV, axis=-1)
    )
    objective = parts['smoothed_loss']
  if z_loss:
    parts['z_loss'] = z_loss * total(jnp.square(logz_T))
    objective += parts['z_loss']
  return objective, parts


def grad_logits(
  logits_TxV: jax.Array,
  logz_T: jax.Array,
  y_T: jax.Array,
  weights_T: jax.Array,
  label_smoothing: float,
  z_loss: float,
) -> jax.Array:
  """The gradient of losses' objective with respect to the logits, written out."""
  s, V = label_smoothing, logits_TxV.shape[-1]
  logz_Tx1 = logz_T[:, None]
  softmax_TxV = jnp.exp(logits_TxV - logz_Tx1)
  target_TxV = (1 - s) * jax.nn.one_hot(y_T, V, dtype=logits_TxV.dtype) + s / V
  return ((1 + 2 * z_loss * logz_Tx1) * softmax_TxV - target_TxV) * weights_T[:, None]


def _blocks(v_BxLx: jax.Array, block_size: int) -> jax.Array:
  """v_BxL.. cut along L into blocks of about block_size tokens (whole rows of the batch each)."""
  B, L = v_BxLx.shape[:2]
  Lb = max(1, min(L, block_size // B))
  while L % Lb:
    Lb -= 1
  return v_BxLx.reshape(B, L // Lb, Lb, *v_BxLx.shape[2:]).swapaxes(0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def blockwise(
  h_BxLxD: jax.Array,
  out_VxD: jax.Array,
  y_BxL: jax.Array,
  weights_BxL: jax.Array,
  label_smoothing: float,
  z_loss: float,
  block_size: int,
) -> tuple[jax.Array, Parts]:
  """losses of the logits h·out, a block of about block_size tokens at a time.

  Differentiable in h and out through the objective only (the parts are for reporting).
  """
  return _forward(h_BxLxD, out_VxD, y_BxL, weights_BxL, label_smoothing, z_loss, block_size)[0]


def _forward(
  h_BxLxD: jax.Array,
  out_VxD: jax.Array,
  y_BxL: jax.Array,
  weights_BxL: jax.Array,
  label_smoothing: float,
  z_loss: float,
  block_size: int,
) -> tuple[tuple[jax.Array, Parts], tuple[jax.Array, jax.Array]]:
  """blockwise's value, and its gradients in h and out, computed together block by block."""

  def block(d_out_VxD: jax.Array, xs: tuple) -> tuple[jax.Array, tuple]:
    h_BxLbxD, y_BxLb, weights_BxLb = xs
    # logits in float32: the loss needs the precision.
    h_TxD = h_BxLbxD.reshape(-1, h_BxLbxD.shape[-1]).astype(jnp.float32)
    logits_TxV = jnp.einsum('TD,VD->TV', h_TxD, out_VxD)
    logz_T = jax.nn.logsumexp(logits_TxV, axis=-1)
    args = (
      logits_TxV,
      logz_T,
      y_BxLb.reshape(-1),
      weights_BxLb.reshape(-1),
      label_smoothing,
      z_loss,
    )
    g_TxV = grad_logits(*args)
    d_h_BxLbxD = jnp.einsum('TV,VD->TD', g_TxV, out_VxD).reshape(h_BxLbxD.shape)
    return d_out_VxD + jnp.einsum('TV,TD->VD', g_TxV, h_TxD), (losses(*args), d_h_BxLbxD)

  xs = tuple(_blocks(v, block_size) for v in (h_BxLxD, y_BxL, weights_BxL))
  d_out_VxD, (sums, d_h_NxBxLbxD) = jax.lax.scan(block, jnp.zeros_like(out_VxD), xs)
  d_h_BxLxD = d_h_NxBxLbxD.swapaxes(0, 1).reshape(h_BxLxD.shape).astype(h_BxLxD.dtype)
  return jax.tree.map(jnp.sum, sums), (d_h_BxLxD, d_out_VxD)


def _backward(
  label_smoothing: float,
  z_loss: float,
  block_size: int,
  grads: tuple[jax.Array, jax.Array],
  cotangents: tuple[jax.Array, Parts],
) -> tuple[jax.Array | None, ...]:
  """The gradients _forward computed, times the objective's cotangent."""
  ct = cotangents[0]
  return (ct * grads[0]).astype(grads[0].dtype), ct * grads[1], None, None


blockwise.defvjp(_forward, _backward)
