"""Next-token cross-entropy from the last hidden states, a block of tokens at a time.

The logits of a whole batch (B·L·V floats) never exist at once: each block's logits give the
block's loss and its gradient (the softmax minus the target), and are dropped. Levanter calls
this blockwise cross-entropy. It saves the memory of the logits on every device, and on CPU it is
faster than the autodiff of a softmax over all the logits.

T is the tokens of a block, C the number of blocks.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Parts of the objective, each a sum over the weighted targets.
Parts = dict[str, jax.Array]


class Options(NamedTuple):
  """How the loss is computed: the objective's extras, what is reported, the block size."""

  label_smoothing: float
  z_loss: float
  squares: bool  # also the squared loss, for a standard error
  block_size: int  # tokens whose logits exist at once
  softcap: float = 0.0  # logits as softcap·tanh(h·out / softcap); 0: h·out


def softcap(logits: jax.Array, cap: float) -> jax.Array:
  """cap·tanh(logits / cap): logits bounded in (-cap, cap); unchanged when cap is 0."""
  return cap * jnp.tanh(logits / cap) if cap else logits


def losses(
  logits_TxV: jax.Array, logz_T: jax.Array, y_T: jax.Array, weights_T: jax.Array, opts: Options
) -> tuple[jax.Array, Parts]:
  """The objective and its parts, each a weighted sum over the targets; logz_T: logsumexp.

  'loss' is always the plain next-token cross-entropy; label smoothing, the z-loss (on the
  log-normalizer) and the squared loss are parts of their own when on.
  """
  label_smoothing, z_loss, squares = opts.label_smoothing, opts.z_loss, opts.squares
  total = lambda v_T: jnp.sum(v_T * weights_T)
  nll_T = logz_T - jnp.take_along_axis(logits_TxV, y_T[:, None], -1)[:, 0]
  parts = {'loss': total(nll_T)}
  objective = parts['loss']
  if label_smoothing:
    # Cross-entropy against (1 - s) on the target plus s spread uniformly over the vocabulary.
    uniform = total(logz_T - jnp.mean(logits_TxV, axis=-1))
    parts['smoothed_loss'] = (1 - label_smoothing) * parts['loss'] + label_smoothing * uniform
    objective = parts['smoothed_loss']
  if z_loss:
    parts['z_loss'] = z_loss * total(jnp.square(logz_T))
    objective += parts['z_loss']
  if squares:
    parts['loss_sq'] = total(jnp.square(nll_T))
  return objective, parts


def grad_logits(
  logits_TxV: jax.Array, logz_T: jax.Array, y_T: jax.Array, weights_T: jax.Array, opts: Options
) -> jax.Array:
  """The gradient of losses' objective with respect to h·out (the logits before any cap)."""
  s, z_loss, V = opts.label_smoothing, opts.z_loss, logits_TxV.shape[-1]
  logz_Tx1 = logz_T[:, None]
  softmax_TxV = jnp.exp(logits_TxV - logz_Tx1)
  target_TxV = (1 - s) * jax.nn.one_hot(y_T, V, dtype=logits_TxV.dtype) + s / V
  g_TxV = ((1 + 2 * z_loss * logz_Tx1) * softmax_TxV - target_TxV) * weights_T[:, None]
  # d(c·tanh(x / c))/dx = 1 - tanh², with tanh = logits / c.
  return g_TxV * (1 - jnp.square(logits_TxV / opts.softcap)) if opts.softcap else g_TxV


def _blocks(v_BxLx: jax.Array, block_size: int) -> jax.Array:
  """v_BxL.. cut along L into blocks of about block_size tokens (whole rows of the batch each)."""
  B, L = v_BxLx.shape[:2]
  Lb = max(1, min(L, block_size // B))
  while L % Lb:
    Lb -= 1
  return v_BxLx.reshape(B, L // Lb, Lb, *v_BxLx.shape[2:]).swapaxes(0, 1)


def _block_logits(
  out_VxD: jax.Array, h_BxLbxD: jax.Array, y_BxLb: jax.Array, w_BxLb: jax.Array, cap: float
):
  """A block's h in float32 and the arguments of losses (float32 logits: for the precision)."""
  h_TxD = h_BxLbxD.reshape(-1, h_BxLbxD.shape[-1]).astype(jnp.float32)
  logits_TxV = softcap(jnp.einsum('TD,VD->TV', h_TxD, out_VxD), cap)
  return h_TxD, (logits_TxV, jax.nn.logsumexp(logits_TxV, axis=-1), y_BxLb.ravel(), w_BxLb.ravel())


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blockwise(
  h_BxLxD: jax.Array, out_VxD: jax.Array, y_BxL: jax.Array, weights_BxL: jax.Array, opts: Options
) -> tuple[jax.Array, Parts]:
  """losses of the logits h·out, a block of about opts.block_size tokens at a time.

  Differentiable in h and out through the objective only (the parts are for reporting).
  """

  def block(_, xs: tuple) -> tuple[None, tuple]:
    return None, losses(*_block_logits(out_VxD, *xs, opts.softcap)[1], opts)

  xs = tuple(_blocks(v, opts.block_size) for v in (h_BxLxD, y_BxL, weights_BxL))
  return jax.tree.map(jnp.sum, jax.lax.scan(block, None, xs)[1])


def _forward(
  h_BxLxD: jax.Array, out_VxD: jax.Array, y_BxL: jax.Array, weights_BxL: jax.Array, opts: Options
) -> tuple[tuple[jax.Array, Parts], tuple[jax.Array, jax.Array]]:
  """blockwise's value, and its gradients in h and out, computed together block by block."""

  def block(d_out_VxD: jax.Array, xs: tuple) -> tuple[jax.Array, tuple]:
    h_TxD, args = _block_logits(out_VxD, *xs, opts.softcap)
    g_TxV = grad_logits(*args, opts)
    d_h_BxLbxD = jnp.einsum('TV,VD->TD', g_TxV, out_VxD).reshape(xs[0].shape)
    return d_out_VxD + jnp.einsum('TV,TD->VD', g_TxV, h_TxD), (losses(*args, opts), d_h_BxLbxD)

  xs = tuple(_blocks(v, opts.block_size) for v in (h_BxLxD, y_BxL, weights_BxL))
  d_out_VxD, (sums, d_h_CxBxLbxD) = jax.lax.scan(block, jnp.zeros_like(out_VxD), xs)
  d_h_BxLxD = d_h_CxBxLbxD.swapaxes(0, 1).reshape(h_BxLxD.shape).astype(h_BxLxD.dtype)
  return jax.tree.map(jnp.sum, sums), (d_h_BxLxD, d_out_VxD)


def _backward(opts: Options, grads: tuple, cotangents: tuple) -> tuple[jax.Array | None, ...]:
  """The gradients _forward computed, times the objective's cotangent."""
  ct = cotangents[0]
  return (ct * grads[0]).astype(grads[0].dtype), ct * grads[1], None, None


blockwise.defvjp(_forward, _backward)
