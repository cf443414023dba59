"""Decoder-only Transformer in Flax NNX.

Dimension key:
  B: batch size
  L: sequence length
  M: attended (memory) length
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
  return nnx.Param(value, sharding_names=names, eager_sharding=False)


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
    w_3xDxHxK = self.wqkv_3xDxHxK[...].astype(dtype)
    q_BxLxHxK, k_BxMxHxK, v_BxMxHxK = (
        jnp.einsum('BLD,DHK->BLHK', x_BxLxD, w_3xDxHxK[i]) for i in range(3))
    q_BxLxHxK *= q_BxLxHxK.shape[-1] ** -0.5
    att_BxHxLxM = jnp.einsum('BLHK,BMHK->BHLM', q_BxLxHxK, k_BxMxHxK)
    L, M = att_BxHxLxM.shape[-2:]
    causal_LxM = jnp.tril(jnp.ones((L, M), dtype=bool))
    # softmax in float32: bfloat16 loses the small probabilities.
    att_BxHxLxM = jnp.where(causal_LxM, att_BxHxLxM.astype(jnp.float32), -jnp.inf)
    att_BxHxLxM = jax.nn.softmax(att_BxHxLxM, axis=-1).astype(dtype)
    out_BxLxHxK = jnp.einsum('BHLM,BMHK->BLHK', att_BxHxLxM, v_BxMxHxK)
    return jnp.einsum('BLHK,HKD->BLD', out_BxLxHxK, self.wo_HxKxD[...].astype(dtype))


class Mlp(nnx.Module):
  """Position-wise feed-forward with GELU."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    std = cfg.D**-0.5
    self.wi_DxF = _param(rngs, std, (cfg.D, cfg.F), (FSDP, None))
    self.wo_FxD = _param(rngs, cfg.F**-0.5 / (2 * cfg.N) ** 0.5, (cfg.F, cfg.D), (FSDP, None))

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dtype = x_BxLxD.dtype
    h_BxLxF = jax.nn.gelu(jnp.einsum('BLD,DF->BLF', x_BxLxD, self.wi_DxF[...].astype(dtype)))
    return jnp.einsum('BLF,FD->BLD', h_BxLxF, self.wo_FxD[...].astype(dtype))


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
    x_BxLxD = self.ln_f(x_BxLxD)
    # logits in float32: the loss needs the precision.
    return jnp.einsum('BLD,VD->BLV', x_BxLxD.astype(jnp.float32), self.embed_VxD[...])
