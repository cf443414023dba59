"""The model's math: its weights, flattened einsums, rotary positions, attention, the logits, and
how a parameterization scales them with the width.

Dimensions are named by the key at the top of model.py.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, std: float, shape: tuple[int, ...], spec: tuple) -> nnx.Param:
  """A normal-initialised weight with its partition spec (applied by the caller's jit)."""
  value = nnx.initializers.normal(stddev=std)(rngs.params(), shape)
  return nnx.Param(value, out_sharding=spec, eager_sharding=False)


def bias(shape: tuple[int, ...], on: bool) -> nnx.Param | None:
  """A zero-initialised bias, replicated; None when off."""
  spec = (None,) * len(shape)
  return nnx.Param(jnp.zeros(shape), out_sharding=spec, eager_sharding=False) if on else None


def add_bias(x: jax.Array, b: nnx.Param | None, index: int | None = None) -> jax.Array:
  """x plus the bias b (or its row index), if there is one."""
  return x if b is None else x + (b[...] if index is None else b[index]).astype(x.dtype)


def scaled(x: jax.Array, factor: float) -> jax.Array:
  """x times factor; x itself when it is 1, so that sp computes exactly what it did."""
  return x if factor == 1.0 else x * factor


def einsum_BL(
  spec: str, x_BxLx: jax.Array, w: nnx.Param | jax.Array, multiplier: float = 1.0
) -> jax.Array:
  """jnp.einsum(spec) of activations and a weight (cast to their dtype), B and L as one axis,
  times the weight's output multiplier."""
  # One flattened axis makes a 2-D matmul, whose weight gradient is far faster on CPU.
  B, L = x_BxLx.shape[:2]
  w = w[...].astype(x_BxLx.dtype)
  y = jnp.einsum(spec.replace('BL', 'T'), x_BxLx.reshape(B * L, *x_BxLx.shape[2:]), w)
  t = spec.split('->')[1].index('BL')
  return scaled(y.reshape(*y.shape[:t], B, L, *y.shape[t + 1 :]), multiplier)


def logits(
  h_TxD: jax.Array, out_VxD: jax.Array, softcap: float, multiplier: float = 1.0
) -> jax.Array:
  """Float32 logits of hidden states (the loss needs the precision), times the output
  multiplier, as c·tanh(logits / c) if c."""
  logits_TxV = scaled(jnp.einsum('...D,VD->...V', h_TxD.astype(jnp.float32), out_VxD), multiplier)
  return softcap * jnp.tanh(logits_TxV / softcap) if softcap else logits_TxV


PARAMETERIZATIONS = ('sp', 'mup', 'ntk', 'mfp')


class Exponents(NamedTuple):
  """A parameterization's exponents of the width n, per layer kind: (a, b, c), where the layer's
  output is multiplied by n^-a, its weights start at a std of n^-b and learn at n^-c times the
  learning rate (Everett et al. 2024, "Scaling Exponents Across Parameterizations and
  Optimizers"); the attention logits are divided by K^attention."""

  embedding: tuple[float, float, float]  # the input embedding (and the head, when tied)
  hidden: tuple[float, float, float]  # the blocks' matrices
  readout: tuple[float, float, float]  # the head
  attention: float  # 1/2: q·k/√K; 1: q·k/K


# The paper's Table 1, Adam (full alignment). Adam's updates do not change under (a, b, c) ->
# (a + t, b - t, c - t) (but through epsilon), and each row is moved so that the embedding and the
# readout start at b = 0: one tied matrix can then be both. The paper's mup embedding (-1/2, 1/2,
# 1/2) and readout (1/2, 1/2, 1/2) move by t = 1/2; its ntk and mfp rows need no move. ntk's
# readout learns at another rate than its embedding: it needs an untied head. Attention is 1/K
# in the feature-learning pair (mup, mfp: µP's rule for a K that grows with D), 1/√K for ntk.
EXPONENTS = {
  'mup': Exponents((0, 0, 0), (0, 0.5, 1), (1, 0, 0), 1),
  'ntk': Exponents((0, 0, 0), (0.5, 0, 0.5), (0.5, 0, 0.5), 0.5),
  'mfp': Exponents((0, 0, 0), (0.5, 0, 0.5), (1, 0, 0), 1),
}


class LayerScales(NamedTuple):
  """One layer kind's factors at m = D / base_width, relative to sp's (1 at the base width)."""

  multiplier: float  # on its output: m^-a
  init: float  # on its initial std, sp's D^-1/2 (b = 1/2): m^(1/2 - b)
  lr: float  # on its learning rate: m^-c
  eps: float  # on Adam's epsilon: m^-g, where its gradient scales as n^-g


class WidthScales(NamedTuple):
  """A parameterization's factors at width D; sp's are all 1."""

  embedding: LayerScales
  hidden: LayerScales
  readout: LayerScales
  other_eps: float  # on Adam's epsilon of the rest: norms' scales, biases, learned positions
  attention: float  # on the attention logits' 1/√K


_ONES = LayerScales(1.0, 1.0, 1.0, 1.0)
SP = WidthScales(_ONES, _ONES, _ONES, 1.0, 1.0)


def width_scales(parameterization: str, base_width: int, D: int, K: int) -> WidthScales:
  """The factors of EXPONENTS[parameterization] at m = D / base_width; sp: all 1, at any width.

  Adam divides a gradient by its own scale but for epsilon, which must then scale as the
  gradient does (the paper's per-layer epsilon): the gradient flowing into the hidden states
  scales as n^-r, r = a + b of the readout, so a layer that multiplies by n^-a gets n^-(a + r),
  the readout n^-a, the rest n^-r. The attention factor applies where the head dimension grows
  with D (model.K 0): K^(1/2 - attention) relative to the base width's K.
  """
  if parameterization == 'sp':
    return SP
  m, (embedding, hidden, readout, attention) = D / base_width, EXPONENTS[parameterization]
  r = readout[0] + readout[1]
  layer = lambda a, b, c, g: LayerScales(m**-a, m ** (0.5 - b), m**-c, m**-g)
  return WidthScales(
    layer(*embedding, embedding[0] + r),
    layer(*hidden, hidden[0] + r),
    layer(*readout, readout[0]),
    m**-r,
    1.0 if K else m ** (0.5 - attention),
  )


def llama3_scaling(spec: str) -> tuple[float, float, float, float] | None:
  """(factor, low_freq_factor, high_freq_factor, original_L) of 'llama3:32,1,4,8192'; '': None.

  ValueError for any other string.
  """
  if not spec:
    return None
  kind, _, values = spec.partition(':')
  numbers = values.split(',')
  if kind != 'llama3' or len(numbers) != 4:
    raise ValueError('give llama3:factor,low_freq_factor,high_freq_factor,original_L')
  return tuple(float(v) for v in numbers)


def rope_freqs(K: int, base: float, scaling: str = '') -> jax.Array:
  """The angle per position of each pair i of a head: base^(-2i/K), float32.

  scaling 'llama3:factor,low_freq_factor,high_freq_factor,original_L' stretches the long
  wavelengths as Llama 3.1 does: by factor beyond original_L / low_freq_factor, smoothly below it
  down to original_L / high_freq_factor.
  """
  freq_K2 = base ** (-jnp.arange(K // 2, dtype=jnp.float32) / (K // 2))
  if not scaling:
    return freq_K2
  factor, low, high, original_L = llama3_scaling(scaling)
  wavelength_K2 = 2 * math.pi / freq_K2
  smooth_K2 = (original_L / wavelength_K2 - low) / (high - low)
  smoothed_K2 = (1 - smooth_K2) * freq_K2 / factor + smooth_K2 * freq_K2
  long_K2, short_K2 = wavelength_K2 > original_L / low, wavelength_K2 < original_L / high
  return jnp.where(long_K2, freq_K2 / factor, jnp.where(short_K2, freq_K2, smoothed_K2))


def rope(x_BxLxHxK: jax.Array, pos_BxL: jax.Array, base: float, scaling: str = '') -> jax.Array:
  """Rotates each pair (x_i, x_i+K/2) by the angle pos · rope_freqs(K, base, scaling)[i]."""
  freq_K2 = rope_freqs(x_BxLxHxK.shape[-1], base, scaling)
  angle_BxLx1xK2 = (pos_BxL[..., None].astype(jnp.float32) * freq_K2)[:, :, None]
  sin, cos = jnp.sin(angle_BxLx1xK2), jnp.cos(angle_BxLx1xK2)
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BxLxHxK.dtype)


# Keys and values of one layer, k_BxMxGxK and v_BxMxGxK; a cache has one pair per layer.
LayerCache = tuple[jax.Array, jax.Array]


def write_cache(
  cache: LayerCache | None, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array, pos_BxL: jax.Array
) -> LayerCache | None:
  """The cache's keys and values, k_BxMxGxK and v_BxMxGxK, with the new ones at pos_BxL; no
  cache (None, training): None."""
  if cache is None:
    return None
  b_Bx1 = jnp.arange(pos_BxL.shape[0])[:, None]
  return cache[0].at[b_Bx1, pos_BxL].set(k_BxLxGxK), cache[1].at[b_Bx1, pos_BxL].set(v_BxLxGxK)


def attend(
  q_BxLxHxK: jax.Array,
  k_BxMxGxK: jax.Array,
  v_BxMxGxK: jax.Array,
  visible_BxLxM: jax.Array,
  kind: str = 'einsum',
) -> jax.Array:
  """Softmax attention of each query head over its key/value head's visible positions.

  kind 'dot_product_attention': jax.nn's, which picks cuDNN's fused kernel on GPUs.
  """
  if kind == 'dot_product_attention':
    return jax.nn.dot_product_attention(
      q_BxLxHxK, k_BxMxGxK, v_BxMxGxK, mask=visible_BxLxM[:, None]
    )
  (B, L, H, K), G = q_BxLxHxK.shape, k_BxMxGxK.shape[2]
  # Heads first, so that every einsum is a plain batched matmul: 16% faster on CPU.
  q_BxGxRxLxK = q_BxLxHxK.reshape(B, L, G, H // G, K).transpose(0, 2, 3, 1, 4) * K**-0.5
  k_BxGxMxK, v_BxGxMxK = (t.transpose(0, 2, 1, 3) for t in (k_BxMxGxK, v_BxMxGxK))
  att_BxGxRxLxM = jnp.einsum('BGRLK,BGMK->BGRLM', q_BxGxRxLxK, k_BxGxMxK)
  # softmax in float32: bfloat16 loses the small probabilities.
  att_BxGxRxLxM = att_BxGxRxLxM.astype(jnp.float32)
  att_BxGxRxLxM = jnp.where(visible_BxLxM[:, None, None], att_BxGxRxLxM, -jnp.inf)
  att_BxGxRxLxM = jax.nn.softmax(att_BxGxRxLxM, axis=-1).astype(q_BxLxHxK.dtype)
  out_BxGxRxLxK = jnp.einsum('BGRLM,BGMK->BGRLK', att_BxGxRxLxM, v_BxGxMxK)
  return out_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(B, L, H, K)


def max_logit(q_BxLxHxK: jax.Array, k_BxMxGxK: jax.Array, visible_BxLxM: jax.Array) -> jax.Array:
  """The largest attention logit (q·k/√K, before the softmax) over the visible positions."""
  (B, L, H, K), G = q_BxLxHxK.shape, k_BxMxGxK.shape[2]
  q_BxLxGxRxK = q_BxLxHxK.reshape(B, L, G, H // G, K).astype(jnp.float32) * K**-0.5
  att_BxGxRxLxM = jnp.einsum('BLGRK,BMGK->BGRLM', q_BxLxGxRxK, k_BxMxGxK.astype(jnp.float32))
  return jnp.max(jnp.where(visible_BxLxM[:, None, None], att_BxGxRxLxM, -jnp.inf))
