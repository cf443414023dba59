"""Next-token cross-entropy from the last hidden states, a block of tokens at a time.

The logits of a whole batch (B·L·V floats) never exist at once: each block's logits give the
block's loss and its gradient (the softmax minus the target), and are dropped. Levanter calls
this blockwise cross-entropy. It saves the memory of the logits on every device, and on CPU it is
faster than the autodiff of a softmax over all the logits. The model owns the logits of a block
(its head: the output projection, any soft-cap); the loss owns what follows them.

T is the tokens of a block, C the number of blocks.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Parts of the objective, each a sum over the weighted targets.
Parts = dict[str, jax.Array]
# The model's logits of hidden states h_TxD given its output projection out_VxD, in float32.
Head = Callable[[jax.Array, jax.Array], jax.Array]


class Options(NamedTuple):
  """How the loss is computed: the objective's extras, what is reported, the block size."""

  label_smoothing: float
  z_loss: float
  squares: bool  # also the squared loss, for a standard error
  block_size: int  # tokens whose logits exist at once


def _on(weight: float | jax.Array) -> bool:
  """Whether a part of the objective is on: a nonzero number, or an array (a sweep's values)."""
  return not _number(weight) or weight != 0


def losses(
  logits_TxV: jax.Array, logz_T: jax.Array, y_T: jax.Array, weights_T: jax.Array, opts: Options
) -> tuple[jax.Array, Parts]:
  """The objective and its parts, each a weighted sum over the targets; logz_T: logsumexp.

  'loss' is always the plain next-token cross-entropy; label smoothing, the z-loss (on the
  log-normalizer) and the squared loss are parts of their own when on.
  """
  total = lambda v_T: jnp.sum(v_T * weights_T)
  nll_T = logz_T - jnp.take_along_axis(logits_TxV, y_T[:, None], -1)[:, 0]
  parts = {'loss': total(nll_T)}
  objective = parts['loss']
  if _on(opts.label_smoothing):
    # Cross-entropy against (1 - s) on the target plus s spread uniformly over the vocabulary.
    s = opts.label_smoothing
    uniform = total(logz_T - jnp.mean(logits_TxV, axis=-1))
    parts['smoothed_loss'] = (1 - s) * parts['loss'] + s * uniform
    objective = parts['smoothed_loss']
  if _on(opts.z_loss):
    parts['z_loss'] = opts.z_loss * total(jnp.square(logz_T))
    objective += parts['z_loss']
  if opts.squares:
    parts['loss_sq'] = total(jnp.square(nll_T))
  return objective, parts


def grad_logits(
  logits_TxV: jax.Array, logz_T: jax.Array, y_T: jax.Array, weights_T: jax.Array, opts: Options
) -> jax.Array:
  """The gradient of losses' objective with respect to the logits."""
  s, V = opts.label_smoothing, logits_TxV.shape[-1]
  logz_Tx1 = logz_T[:, None]
  softmax_TxV = jnp.exp(logits_TxV - logz_Tx1)
  target_TxV = (1 - s) * jax.nn.one_hot(y_T, V, dtype=logits_TxV.dtype) + s / V
  return ((1 + 2 * opts.z_loss * logz_Tx1) * softmax_TxV - target_TxV) * weights_T[:, None]


def _blocks(v_BxLx: jax.Array, block_size: int) -> jax.Array:
  """v_BxL.. cut along L into blocks of about block_size tokens (whole rows of the batch each)."""
  B, L = v_BxLx.shape[:2]
  Lb = max(1, min(L, block_size // B))
  while L % Lb:
    Lb -= 1
  return v_BxLx.reshape(B, L // Lb, Lb, *v_BxLx.shape[2:]).swapaxes(0, 1)


def _flat(h_BxLbxD: jax.Array, y_BxLb: jax.Array, w_BxLb: jax.Array) -> tuple[jax.Array, ...]:
  """A block's hidden states, targets and weights with its tokens on one axis."""
  return h_BxLbxD.reshape(-1, h_BxLbxD.shape[-1]), y_BxLb.ravel(), w_BxLb.ravel()


def blockwise(
  head: Head,
  h_BxLxD: jax.Array,
  out_VxD: jax.Array,
  y_BxL: jax.Array,
  weights_BxL: jax.Array,
  opts: Options,
) -> tuple[jax.Array, Parts]:
  """losses of head's logits, a block of about opts.block_size tokens at a time.

  Differentiable in h and out through the objective only (the parts are for reporting).
  """
  # Weights given as arrays (a sweep's, one per variant) are arguments of the custom VJP;
  # numbers stay part of its static options.
  arrays = {k: v for k, v in opts._asdict().items() if k in ARRAYS and not _number(v)}
  static = opts._replace(**dict.fromkeys(arrays))
  return _blockwise(head, h_BxLxD, out_VxD, y_BxL, weights_BxL, arrays, static)


ARRAYS = ('label_smoothing', 'z_loss')


def _number(v: object) -> bool:
  return isinstance(v, int | float)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def _blockwise(
  head: Head,
  h_BxLxD: jax.Array,
  out_VxD: jax.Array,
  y_BxL: jax.Array,
  weights_BxL: jax.Array,
  arrays: dict[str, jax.Array],
  opts: Options,
) -> tuple[jax.Array, Parts]:
  """blockwise, with the options' arrays apart."""
  opts = opts._replace(**arrays)

  def block(_, xs: tuple) -> tuple[None, tuple]:
    h_TxD, y_T, w_T = _flat(*xs)
    logits_TxV = head(h_TxD, out_VxD)
    return None, losses(logits_TxV, jax.nn.logsumexp(logits_TxV, axis=-1), y_T, w_T, opts)

  xs = tuple(_blocks(v, opts.block_size) for v in (h_BxLxD, y_BxL, weights_BxL))
  return jax.tree.map(jnp.sum, jax.lax.scan(block, None, xs)[1])


def _forward(
  head: Head,
  h_BxLxD: jax.Array,
  out_VxD: jax.Array,
  y_BxL: jax.Array,
  weights_BxL: jax.Array,
  arrays: dict[str, jax.Array],
  opts: Options,
) -> tuple[tuple[jax.Array, Parts], tuple]:
  """blockwise's value, and its gradients in h and out, computed together block by block."""
  opts = opts._replace(**arrays)

  def block(d_out_VxD: jax.Array, xs: tuple) -> tuple[jax.Array, tuple]:
    h_TxD, y_T, w_T = _flat(*xs)
    logits_TxV, head_vjp = jax.vjp(head, h_TxD, out_VxD)
    args = (logits_TxV, jax.nn.logsumexp(logits_TxV, axis=-1), y_T, w_T)
    d_h_TxD, d_block_VxD = head_vjp(grad_logits(*args, opts))
    return d_out_VxD + d_block_VxD, (losses(*args, opts), d_h_TxD.reshape(xs[0].shape))

  xs = tuple(_blocks(v, opts.block_size) for v in (h_BxLxD, y_BxL, weights_BxL))
  d_out_VxD, (sums, d_h_CxBxLbxD) = jax.lax.scan(block, jnp.zeros_like(out_VxD), xs)
  d_h_BxLxD = d_h_CxBxLbxD.swapaxes(0, 1).reshape(h_BxLxD.shape)
  return jax.tree.map(jnp.sum, sums), (d_h_BxLxD, d_out_VxD, arrays)


def _backward(
  head: Head, opts: Options, grads: tuple, cotangents: tuple
) -> tuple[jax.Array | None, ...]:
  """The gradients _forward computed, times the objective's cotangent (none for the weights)."""
  ct = cotangents[0]
  zeros = jax.tree.map(jnp.zeros_like, grads[2])
  return (ct * grads[0]).astype(grads[0].dtype), ct * grads[1], None, None, zeros


_blockwise.defvjp(_forward, _backward)
