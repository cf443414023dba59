"""Decoder-only Transformer in Flax NNX.

Dimension key:
  B: batch size
  L: sequence length (in decoding: the new tokens of one call)
  T: tokens of a batch, B·L flattened (weight gradients of a 2-D matmul are far faster on CPU)
  M: attended (memory) length; in decoding, the KV cache's length (the model's L)
  D: model dimension
  H: number of query heads
  G: number of key/value heads (config KV; G = H is multi-head, G = 1 multi-query)
  R: query heads per key/value head, H // G
  K: head dimension (D // H)
  F: MLP hidden dimension
  V: vocabulary size
  N: number of layers
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

# FSDP: every weight is sharded over the 'fsdp' mesh axis along one dimension, and copied
# over the 'data' axis (data parallel).
FSDP, DATA = 'fsdp', 'data'
# Batches are split along B over every device.
BATCH = (DATA, FSDP)

POSITIONS = ('learned', 'rope', 'none')
NORMS = ('layernorm', 'rmsnorm')
MLPS = ('gelu', 'swiglu')
ATTENTIONS = ('einsum', 'dot_product_attention')
REMAT_POLICIES = (
  'nothing_saveable',
  'dots_saveable',
  'dots_with_no_batch_dims_saveable',
  'everything_saveable',
)

# Keys and values of one layer, k_BxMxGxK and v_BxMxGxK; a cache has one pair per layer.
LayerCache = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of the model; the defaults are the original nanodo's."""

  D: int
  H: int
  L: int
  N: int
  V: int
  F: int
  dtype: str = 'float32'
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  KV: int = 0  # key/value heads; 0: one per query head
  positions: str = 'learned'
  rope_base: float = 10_000.0
  norm: str = 'layernorm'
  mlp: str = 'gelu'
  qk_norm: bool = False
  tied: bool = True
  attention: str = 'einsum'

  @property
  def G(self) -> int:
    return self.KV or self.H


def _param(
  rngs: nnx.Rngs, std: float, shape: tuple[int, ...], names: tuple[str | None, ...]
) -> nnx.Param:
  """A normal-initialised weight with its partition spec (applied by the caller's jit)."""
  value = nnx.initializers.normal(stddev=std)(rngs.params(), shape)
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _norm(cfg: ModelConfig, dim: int, rngs: nnx.Rngs) -> nnx.Module:
  """LayerNorm without bias, or RMSNorm; a float32 scale either way."""
  if cfg.norm == 'rmsnorm':
    return nnx.RMSNorm(dim, dtype=cfg.dtype, param_dtype=jnp.float32, rngs=rngs)
  return nnx.LayerNorm(dim, use_bias=False, dtype=cfg.dtype, param_dtype=jnp.float32, rngs=rngs)


def rope(x_BxLxHxK: jax.Array, pos_BxL: jax.Array, base: float) -> jax.Array:
  """Rotates each pair (x_i, x_i+K/2) by the angle pos / base^(2i/K)."""
  K = x_BxLxHxK.shape[-1]
  freq_K2 = base ** (-jnp.arange(K // 2, dtype=jnp.float32) / (K // 2))
  angle_BxLx1xK2 = (pos_BxL[..., None].astype(jnp.float32) * freq_K2)[:, :, None]
  sin, cos = jnp.sin(angle_BxLx1xK2), jnp.cos(angle_BxLx1xK2)
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BxLxHxK.dtype)


def _split_batch(x_BxLxD: jax.Array) -> jax.Array:
  """x_BxLxD split along B over the mesh in context (jax.set_mesh), if there is one.

  Otherwise jit may follow the embedding's sharding and split activations along D: devices
  would then exchange activations in every layer instead of gathering weights.
  """
  if jax.sharding.get_abstract_mesh().empty:
    return x_BxLxD
  return jax.lax.with_sharding_constraint(x_BxLxD, P(BATCH))


class Attention(nnx.Module):
  """Causal self-attention with H query heads sharing G key/value heads."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    K = cfg.D // cfg.H
    std = cfg.D**-0.5
    self.wq_DxHxK = _param(rngs, std, (cfg.D, cfg.H, K), (FSDP, None, None))
    self.wkv_2xDxGxK = _param(rngs, std, (2, cfg.D, cfg.G, K), (None, FSDP, None, None))
    self.wo_HxKxD = _param(rngs, std / (2 * cfg.N) ** 0.5, (cfg.H, K, cfg.D), (None, None, FSDP))
    if cfg.qk_norm:
      self.q_norm, self.k_norm = _norm(cfg, K, rngs), _norm(cfg, K, rngs)

  def __call__(
    self,
    x_BxLxD: jax.Array,
    pos_BxL: jax.Array,
    cache: LayerCache | None = None,
    segment_ids_BxL: jax.Array | None = None,
  ) -> tuple[jax.Array, LayerCache | None]:
    """Attends from the tokens at pos_BxL to positions <= their own.

    With a cache (decoding), the new keys and values are first written into it at pos_BxL. With
    segment ids (packed rows, positions restarting per segment), a token attends to the tokens
    before it in its own segment only.
    """
    dtype = x_BxLxD.dtype
    B, L, D = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(B * L, D)
    q_BxLxHxK = jnp.einsum('TD,DHK->THK', x_TxD, self.wq_DxHxK[...].astype(dtype)).reshape(
      B, L, self.cfg.H, -1
    )
    kv_2xTxGxK = jnp.einsum('TD,SDGK->STGK', x_TxD, self.wkv_2xDxGxK[...].astype(dtype))
    k_BxLxGxK, v_BxLxGxK = kv_2xTxGxK.reshape(2, B, L, *kv_2xTxGxK.shape[-2:])
    if self.cfg.qk_norm:
      q_BxLxHxK, k_BxLxGxK = self.q_norm(q_BxLxHxK), self.k_norm(k_BxLxGxK)
    if self.cfg.positions == 'rope':
      q_BxLxHxK = rope(q_BxLxHxK, pos_BxL, self.cfg.rope_base)
      k_BxLxGxK = rope(k_BxLxGxK, pos_BxL, self.cfg.rope_base)
    if cache is None:
      k_BxMxGxK, v_BxMxGxK = k_BxLxGxK, v_BxLxGxK
    else:
      b_Bx1 = jnp.arange(B)[:, None]
      k_BxMxGxK = cache[0].at[b_Bx1, pos_BxL].set(k_BxLxGxK)
      v_BxMxGxK = cache[1].at[b_Bx1, pos_BxL].set(v_BxLxGxK)
      cache = (k_BxMxGxK, v_BxMxGxK)
    if segment_ids_BxL is None:
      # Causal by position: in a cache, entries past a row's position are stale or padding.
      visible_BxLxM = jnp.arange(k_BxMxGxK.shape[1]) <= pos_BxL[..., None]
    else:
      visible_BxLxM = jnp.tril(jnp.ones((1, L, L), bool)) & (
        segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
      )
    out_BxLxHxK = self._attend(q_BxLxHxK, k_BxMxGxK, v_BxMxGxK, visible_BxLxM)
    out_TxHxK = out_BxLxHxK.reshape(B * L, *out_BxLxHxK.shape[-2:])
    out_TxD = jnp.einsum('THK,HKD->TD', out_TxHxK, self.wo_HxKxD[...].astype(dtype))
    return out_TxD.reshape(B, L, D), cache

  def _attend(
    self, q_BxLxHxK: jax.Array, k_BxMxGxK: jax.Array, v_BxMxGxK: jax.Array, visible_BxLxM: jax.Array
  ) -> jax.Array:
    """Softmax attention of each query head over its key/value head's visible positions."""
    if self.cfg.attention == 'dot_product_attention':  # picks cuDNN's fused kernel on GPUs
      return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxMxGxK, v_BxMxGxK, mask=visible_BxLxM[:, None]
      )
    dtype = q_BxLxHxK.dtype
    B, L, H, K = q_BxLxHxK.shape
    G = k_BxMxGxK.shape[2]
    # Heads first, so that every einsum is a plain batched matmul: 16% faster on CPU.
    q_BxGxRxLxK = q_BxLxHxK.reshape(B, L, G, H // G, K).transpose(0, 2, 3, 1, 4) * K**-0.5
    k_BxGxMxK, v_BxGxMxK = (t.transpose(0, 2, 1, 3) for t in (k_BxMxGxK, v_BxMxGxK))
    att_BxGxRxLxM = jnp.einsum('BGRLK,BGMK->BGRLM', q_BxGxRxLxK, k_BxGxMxK)
    # softmax in float32: bfloat16 loses the small probabilities.
    att_BxGxRxLxM = jnp.where(
      visible_BxLxM[:, None, None], att_BxGxRxLxM.astype(jnp.float32), -jnp.inf
    )
    att_BxGxRxLxM = jax.nn.softmax(att_BxGxRxLxM, axis=-1).astype(dtype)
    out_BxGxRxLxK = jnp.einsum('BGRLM,BGMK->BGRLK', att_BxGxRxLxM, v_BxGxMxK)
    return out_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(B, L, H, K)


class Mlp(nnx.Module):
  """Position-wise feed-forward: GELU, or SwiGLU (a SiLU gate times a linear unit)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    std = cfg.D**-0.5
    if cfg.mlp == 'swiglu':
      self.wi_2xDxF = _param(rngs, std, (2, cfg.D, cfg.F), (None, FSDP, None))
    else:
      self.wi_DxF = _param(rngs, std, (cfg.D, cfg.F), (FSDP, None))
    self.wo_FxD = _param(rngs, cfg.F**-0.5 / (2 * cfg.N) ** 0.5, (cfg.F, cfg.D), (FSDP, None))

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dtype = x_BxLxD.dtype
    x_TxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
    if self.cfg.mlp == 'swiglu':
      gate_TxF, up_TxF = jnp.einsum('TD,SDF->STF', x_TxD, self.wi_2xDxF[...].astype(dtype))
      h_TxF = jax.nn.silu(gate_TxF) * up_TxF
    else:
      h_TxF = jax.nn.gelu(jnp.einsum('TD,DF->TF', x_TxD, self.wi_DxF[...].astype(dtype)))
    return jnp.einsum('TF,FD->TD', h_TxF, self.wo_FxD[...].astype(dtype)).reshape(x_BxLxD.shape)


class Block(nnx.Module):
  """Pre-norm decoder block."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.ln1 = _norm(cfg, cfg.D, rngs)
    self.attn = Attention(cfg, rngs)
    self.ln2 = _norm(cfg, cfg.D, rngs)
    self.mlp = Mlp(cfg, rngs)

  def __call__(
    self,
    x_BxLxD: jax.Array,
    pos_BxL: jax.Array,
    cache: LayerCache | None = None,
    segment_ids_BxL: jax.Array | None = None,
  ) -> tuple[jax.Array, LayerCache | None]:
    h_BxLxD, cache = self.attn(self.ln1(x_BxLxD), pos_BxL, cache, segment_ids_BxL)
    x_BxLxD = x_BxLxD + h_BxLxD
    return x_BxLxD + self.mlp(self.ln2(x_BxLxD)), cache


class TransformerDecoder(nnx.Module):
  """Token (and learned position) embedding, N blocks, output projection (tied by default)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_VxD = _param(rngs, cfg.D**-0.5, (cfg.V, cfg.D), (None, FSDP))
    if cfg.positions == 'learned':
      self.pos_LxD = _param(rngs, 0.02, (cfg.L, cfg.D), (None, FSDP))
    if not cfg.tied:
      self.head_DxV = _param(rngs, cfg.D**-0.5, (cfg.D, cfg.V), (FSDP, None))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.N)])
    self.ln_f = _norm(cfg, cfg.D, rngs)

  def __call__(
    self,
    x_BxL: jax.Array,
    segment_ids_BxL: jax.Array | None = None,
    pos_BxL: jax.Array | None = None,
  ) -> jax.Array:
    """Logits; packed rows give segment ids (attention stays within each) and their positions."""
    return self.project(self.hidden(x_BxL, segment_ids_BxL, pos_BxL))

  def hidden(
    self,
    x_BxL: jax.Array,
    segment_ids_BxL: jax.Array | None = None,
    pos_BxL: jax.Array | None = None,
  ) -> jax.Array:
    """The last block's normalised outputs, which project turns into logits."""
    if pos_BxL is None:
      pos_BxL = jnp.broadcast_to(jnp.arange(x_BxL.shape[1]), x_BxL.shape)
    x_BxLxD = _split_batch(self._embed(x_BxL, pos_BxL))
    block_fn = Block.__call__
    if self.cfg.remat:
      block_fn = nnx.remat(block_fn, policy=getattr(jax.checkpoint_policies, self.cfg.remat_policy))
    for block in self.blocks:
      x_BxLxD, _ = block_fn(block, x_BxLxD, pos_BxL, None, segment_ids_BxL)
    return self.ln_f(x_BxLxD)

  def decode(
    self, x_BxL: jax.Array, pos_BxL: jax.Array, cache: list[LayerCache]
  ) -> tuple[jax.Array, list[LayerCache]]:
    """Logits of new tokens at positions pos_BxL (each below cfg.L); the cache extended by them."""
    x_BxLxD = self._embed(x_BxL, pos_BxL)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache, strict=True):
      x_BxLxD, layer_cache = block(x_BxLxD, pos_BxL, layer_cache)
      new_cache.append(layer_cache)
    return self.project(self.ln_f(x_BxLxD)), new_cache

  def out_VxD(self) -> jax.Array:
    """The output projection, a row per piece: the input embedding when tied."""
    return self.embed_VxD[...] if self.cfg.tied else self.head_DxV[...].T

  def project(self, h_BxLxD: jax.Array) -> jax.Array:
    """Logits of the hidden states."""
    # logits in float32: the loss needs the precision.
    B, L, D = h_BxLxD.shape
    h_TxD = h_BxLxD.reshape(B * L, D).astype(jnp.float32)
    return jnp.einsum('TD,VD->TV', h_TxD, self.out_VxD()).reshape(B, L, -1)

  def _embed(self, x_BxL: jax.Array, pos_BxL: jax.Array) -> jax.Array:
    x_BxLxD = self.embed_VxD[...][x_BxL]
    if self.cfg.positions == 'learned':
      x_BxLxD += self.pos_LxD[...][pos_BxL]
    return x_BxLxD.astype(jnp.dtype(self.cfg.dtype))


def init_cache(cfg: ModelConfig, B: int) -> list[LayerCache]:
  """An empty KV cache of every layer for B sequences of up to L tokens."""
  shape = (B, cfg.L, cfg.G, cfg.D // cfg.H)
  return [(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in range(cfg.N)]
