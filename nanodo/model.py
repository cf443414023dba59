"""Decoder-only Transformer in Flax NNX.

Dimension key:
  B: batch size
  L: sequence length (in decoding: the new tokens of one call)
  T: tokens of a batch, B·L flattened (weight gradients of a 2-D matmul are far faster on CPU)
  M: attended (memory) length; in decoding, the KV cache's length (the model's L)
  D: model dimension
  H: number of heads
  K: head dimension (D // H)
  F: MLP hidden dimension
  V: vocabulary size
  N: number of layers
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

# FSDP: every weight is sharded over the 'fsdp' mesh axis along one dimension.
FSDP = 'fsdp'

# Keys and values of one layer, k_BxMxHxK and v_BxMxHxK; a cache has one pair per layer.
LayerCache = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of the model."""

  D: int
  H: int
  L: int
  N: int
  V: int
  F: int
  dtype: str = 'float32'
  remat: bool = False


def _param(rngs: nnx.Rngs, std: float, shape: tuple[int, ...], names: tuple[str | None, ...]) -> nnx.Param:
  """A normal-initialised weight with its partition spec (applied by the caller's jit)."""
  value = nnx.initializers.normal(stddev=std)(rngs.params(), shape)
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class Attention(nnx.Module):
  """Causal multi-head self-attention."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    K = cfg.D // cfg.H
    std = cfg.D**-0.5
    self.wqkv_3xDxHxK = _param(rngs, std, (3, cfg.D, cfg.H, K), (None, FSDP, None, None))
    self.wo_HxKxD = _param(rngs, std / (2 * cfg.N) ** 0.5, (cfg.H, K, cfg.D), (None, None, FSDP))

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dtype = x_BxLxD.dtype
    B, L, D = x_BxLxD.shape
    w_3xDxHxK = self.wqkv_3xDxHxK[...].astype(dtype)
    qkv_3xTxHxK = jnp.einsum('TD,SDHK->STHK', x_BxLxD.reshape(B * L, D), w_3xDxHxK)
    q_BxLxHxK, k_BxMxHxK, v_BxMxHxK = qkv_3xTxHxK.reshape(3, B, L, *qkv_3xTxHxK.shape[-2:])
    q_BxLxHxK *= q_BxLxHxK.shape[-1] ** -0.5
    att_BxHxLxM = jnp.einsum('BLHK,BMHK->BHLM', q_BxLxHxK, k_BxMxHxK)
    L, M = att_BxHxLxM.shape[-2:]
    causal_LxM = jnp.tril(jnp.ones((L, M), dtype=bool))
    # softmax in float32: bfloat16 loses the small probabilities.
    att_BxHxLxM = jnp.where(causal_LxM, att_BxHxLxM.astype(jnp.float32), -jnp.inf)
    att_BxHxLxM = jax.nn.softmax(att_BxHxLxM, axis=-1).astype(dtype)
    out_TxHxK = jnp.einsum('BHLM,BMHK->BLHK', att_BxHxLxM, v_BxMxHxK).reshape(B * L, *q_BxLxHxK.shape[-2:])
    return jnp.einsum('THK,HKD->TD', out_TxHxK, self.wo_HxKxD[...].astype(dtype)).reshape(B, L, D)

  def decode(self, x_BxLxD: jax.Array, pos_BxL: jax.Array,
             cache: LayerCache) -> tuple[jax.Array, LayerCache]:
    """Writes the new tokens' keys and values at pos_BxL, then attends to positions <= their own."""
    dtype = x_BxLxD.dtype
    w_3xDxHxK = self.wqkv_3xDxHxK[...].astype(dtype)
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = jnp.einsum('BLD,SDHK->SBLHK', x_BxLxD, w_3xDxHxK)
    q_BxLxHxK *= q_BxLxHxK.shape[-1] ** -0.5
    b_Bx1 = jnp.arange(x_BxLxD.shape[0])[:, None]
    k_BxMxHxK = cache[0].at[b_Bx1, pos_BxL].set(k_BxLxHxK)
    v_BxMxHxK = cache[1].at[b_Bx1, pos_BxL].set(v_BxLxHxK)
    att_BxHxLxM = jnp.einsum('BLHK,BMHK->BHLM', q_BxLxHxK, k_BxMxHxK)
    # Causal by position: entries past a row's position are stale or padding.
    visible_BxLxM = jnp.arange(k_BxMxHxK.shape[1]) <= pos_BxL[..., None]
    att_BxHxLxM = jnp.where(visible_BxLxM[:, None], att_BxHxLxM.astype(jnp.float32), -jnp.inf)
    att_BxHxLxM = jax.nn.softmax(att_BxHxLxM, axis=-1).astype(dtype)
    out_BxLxHxK = jnp.einsum('BHLM,BMHK->BLHK', att_BxHxLxM, v_BxMxHxK)
    out_BxLxD = jnp.einsum('BLHK,HKD->BLD', out_BxLxHxK, self.wo_HxKxD[...].astype(dtype))
    return out_BxLxD, (k_BxMxHxK, v_BxMxHxK)


class Mlp(nnx.Module):
  """Position-wise feed-forward with GELU."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    std = cfg.D**-0.5
    self.wi_DxF = _param(rngs, std, (cfg.D, cfg.F), (FSDP, None))
    self.wo_FxD = _param(rngs, cfg.F**-0.5 / (2 * cfg.N) ** 0.5, (cfg.F, cfg.D), (FSDP, None))

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dtype = x_BxLxD.dtype
    x_TxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
    h_TxF = jax.nn.gelu(jnp.einsum('TD,DF->TF', x_TxD, self.wi_DxF[...].astype(dtype)))
    return jnp.einsum('TF,FD->TD', h_TxF, self.wo_FxD[...].astype(dtype)).reshape(x_BxLxD.shape)


def _layer_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(cfg.D, use_bias=False, dtype=cfg.dtype, param_dtype=jnp.float32, rngs=rngs)


class Block(nnx.Module):
  """Pre-LayerNorm decoder block."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.ln1 = _layer_norm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.ln2 = _layer_norm(cfg, rngs)
    self.mlp = Mlp(cfg, rngs)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x_BxLxD = x_BxLxD + self.attn(self.ln1(x_BxLxD))
    return x_BxLxD + self.mlp(self.ln2(x_BxLxD))

  def decode(self, x_BxLxD: jax.Array, pos_BxL: jax.Array,
             cache: LayerCache) -> tuple[jax.Array, LayerCache]:
    """The block on new tokens, reading and extending the layer's KV cache."""
    h_BxLxD, cache = self.attn.decode(self.ln1(x_BxLxD), pos_BxL, cache)
    x_BxLxD = x_BxLxD + h_BxLxD
    return x_BxLxD + self.mlp(self.ln2(x_BxLxD)), cache


class TransformerDecoder(nnx.Module):
  """Token and learned position embedding, N blocks, tied output projection."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_VxD = _param(rngs, cfg.D**-0.5, (cfg.V, cfg.D), (None, FSDP))
    self.pos_LxD = _param(rngs, 0.02, (cfg.L, cfg.D), (None, FSDP))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.N)])
    self.ln_f = _layer_norm(cfg, rngs)

  def __call__(self, x_BxL: jax.Array) -> jax.Array:
    dtype = jnp.dtype(self.cfg.dtype)
    L = x_BxL.shape[1]
    x_BxLxD = self.embed_VxD[...][x_BxL] + self.pos_LxD[...][:L]
    x_BxLxD = x_BxLxD.astype(dtype)
    block_fn = nnx.remat(Block.__call__) if self.cfg.remat else Block.__call__
    for block in self.blocks:
      x_BxLxD = block_fn(block, x_BxLxD)
    return self._logits(x_BxLxD)

  def decode(self, x_BxL: jax.Array, pos_BxL: jax.Array,
             cache: list[LayerCache]) -> tuple[jax.Array, list[LayerCache]]:
    """Logits of new tokens at positions pos_BxL (each below cfg.L); the cache extended by them."""
    x_BxLxD = self.embed_VxD[...][x_BxL] + self.pos_LxD[...][pos_BxL]
    x_BxLxD = x_BxLxD.astype(jnp.dtype(self.cfg.dtype))
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache, strict=True):
      x_BxLxD, layer_cache = block.decode(x_BxLxD, pos_BxL, layer_cache)
      new_cache.append(layer_cache)
    return self._logits(x_BxLxD), new_cache

  def _logits(self, x_BxLxD: jax.Array) -> jax.Array:
    """Final LayerNorm and the tied output projection."""
    x_BxLxD = self.ln_f(x_BxLxD)
    # logits in float32: the loss needs the precision.
    B, L, D = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(B * L, D).astype(jnp.float32)
    return jnp.einsum('TD,VD->TV', x_TxD, self.embed_VxD[...]).reshape(B, L, -1)


def init_cache(cfg: ModelConfig, B: int) -> list[LayerCache]:
  """An empty KV cache of every layer for B sequences of up to L tokens."""
  shape = (B, cfg.L, cfg.H, cfg.D // cfg.H)
  return [(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in range(cfg.N)]
