"""Decoder-only Transformer in Flax NNX.

Dimension key: B batch, L length (decoding: a call's new tokens), M attended length (decoding: the
KV cache's, L), D model, H query heads, G key/value heads (KV; H: multi-head, 1: multi-query),
R = H // G, K head dim (D // H unless set), F MLP hidden, V vocabulary, N layers.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from nanodo import ops
from nanodo.ops import LayerCache, attend, einsum_BL, logits, max_logit, rope, write_cache
from nanodo.sharding import BATCH, FSDP

POSITIONS = ('learned', 'rope', 'none')
NORMS = ('layernorm', 'rmsnorm')
MLPS = ('gelu', 'swiglu', 'relu2')
ATTENTIONS = ('einsum', 'dot_product_attention')
# 'qkv': Qwen2's on q, k and v; 'all': GPT-2's on every projection but the head, and LayerNorm.
BIASES = ('none', 'qkv', 'all')
# What a remat'ed block keeps for the backward pass (jax.checkpoint_policies).
REMAT_POLICIES = ('nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable')

# The logits of hidden states h_TxD given the output projection out_VxD.
Head = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of the model: configs/default.py's `model` keys and the vocabulary size."""

  D: int
  H: int
  L: int
  N: int
  V: int
  F: int
  dtype: str
  remat: bool
  remat_policy: str
  KV: int  # key/value heads (G); 0: one per query head
  K: int  # head dimension; 0: D // H
  bias: str
  positions: str
  rope_base: float
  rope_scaling: str  # '': none; 'llama3:factor,low_freq_factor,high_freq_factor,original_L'
  norm: str
  norm_eps: float
  mlp: str
  qk_norm: bool
  tied: bool
  attention: str
  zero_init: bool  # output projections of attention and MLP start at zero
  zero_head: bool  # the untied head starts at zero
  logit_softcap: float  # logits as c·tanh(logits / c); 0: none
  parameterization: str  # how scales change with D: ops.PARAMETERIZATIONS
  base_width: int  # the D at which every parameterization is sp


def head_dim(cfg: ModelConfig) -> int:
  """K: model.K, else D // H."""
  return cfg.K or cfg.D // cfg.H


def scales(cfg: ModelConfig) -> ops.WidthScales:
  """The parameterization's factors at the model's width."""
  return ops.width_scales(cfg.parameterization, cfg.base_width, cfg.D, cfg.K)


def _norm(cfg: ModelConfig, dim: int, rngs: nnx.Rngs) -> nnx.Module:
  """LayerNorm (biased with model.bias='all'), or RMSNorm; float32 parameters either way."""
  kwargs = {'epsilon': cfg.norm_eps, 'dtype': cfg.dtype, 'param_dtype': jnp.float32, 'rngs': rngs}
  if cfg.norm == 'rmsnorm':
    return nnx.RMSNorm(dim, **kwargs)
  return nnx.LayerNorm(dim, use_bias=cfg.bias == 'all', **kwargs)


class Attention(nnx.Module):
  """Causal self-attention with H query heads sharing G key/value heads."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    D, H, G, K = cfg.D, cfg.H, cfg.KV or cfg.H, head_dim(cfg)
    std = D**-0.5 * scales(cfg).hidden.init
    self.wq_DxHxK = ops.param(rngs, std, (D, H, K), (FSDP, None, None))
    self.wkv_2xDxGxK = ops.param(rngs, std, (2, D, G, K), (None, FSDP, None, None))
    out_std = 0.0 if cfg.zero_init else std / (2 * cfg.N) ** 0.5  # for the depth of the sum
    self.wo_HxKxD = ops.param(rngs, out_std, (H, K, D), (None, None, FSDP))
    self.bq_HxK = ops.bias((H, K), cfg.bias != 'none')
    self.bkv_2xGxK = ops.bias((2, G, K), cfg.bias != 'none')
    self.bo_D = ops.bias((D,), cfg.bias == 'all')
    if cfg.qk_norm:
      self.q_norm = _norm(cfg, K, rngs)
      self.k_norm = _norm(cfg, K, rngs)
    self.sow_max_logit = False  # set by a step that logs the stability metrics

  def __call__(
    self, x_BxLxD: jax.Array, pos_BxL: jax.Array, visible_BxLxM: jax.Array, cache: LayerCache | None
  ) -> tuple[jax.Array, LayerCache | None]:
    """Attends to the visible tokens; a cache (decoding) first takes the new keys and values."""
    a = scales(self.cfg).hidden.multiplier
    q_BxLxHxK = ops.add_bias(einsum_BL('BLD,DHK->BLHK', x_BxLxD, self.wq_DxHxK, a), self.bq_HxK)
    k_BxLxGxK, v_BxLxGxK = einsum_BL('BLD,SDGK->SBLGK', x_BxLxD, self.wkv_2xDxGxK, a)
    k_BxLxGxK, v_BxLxGxK = (
      ops.add_bias(k_BxLxGxK, self.bkv_2xGxK, 0),
      ops.add_bias(v_BxLxGxK, self.bkv_2xGxK, 1),
    )
    if self.cfg.qk_norm:
      q_BxLxHxK, k_BxLxGxK = self.q_norm(q_BxLxHxK), self.k_norm(k_BxLxGxK)
    q_BxLxHxK = ops.scaled(q_BxLxHxK, scales(self.cfg).attention)  # mup, mfp: 1/K
    if self.cfg.positions == 'rope':
      q_BxLxHxK = rope(q_BxLxHxK, pos_BxL, self.cfg.rope_base, self.cfg.rope_scaling)
      k_BxLxGxK = rope(k_BxLxGxK, pos_BxL, self.cfg.rope_base, self.cfg.rope_scaling)
    cache = write_cache(cache, k_BxLxGxK, v_BxLxGxK, pos_BxL)
    k_BxMxGxK, v_BxMxGxK = cache or (k_BxLxGxK, v_BxLxGxK)
    if self.sow_max_logit:
      self.sow(nnx.Intermediate, 'max_logit', max_logit(q_BxLxHxK, k_BxMxGxK, visible_BxLxM))
    out_BxLxHxK = attend(q_BxLxHxK, k_BxMxGxK, v_BxMxGxK, visible_BxLxM, self.cfg.attention)
    out_BxLxD = einsum_BL('BLHK,HKD->BLD', out_BxLxHxK, self.wo_HxKxD, a)
    return ops.add_bias(out_BxLxD, self.bo_D), cache


class Mlp(nnx.Module):
  """Position-wise feed-forward: GELU, ReLU² or SwiGLU (a SiLU gate times a linear unit)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    D, F, init = cfg.D, cfg.F, scales(cfg).hidden.init
    out_std = 0.0 if cfg.zero_init else F**-0.5 * init / (2 * cfg.N) ** 0.5
    if cfg.mlp == 'swiglu':
      self.wi_2xDxF = ops.param(rngs, D**-0.5 * init, (2, D, F), (None, FSDP, None))
    else:
      self.wi_DxF = ops.param(rngs, D**-0.5 * init, (D, F), (FSDP, None))
    self.wo_FxD = ops.param(rngs, out_std, (F, D), (FSDP, None))
    self.bi_SxF = ops.bias((2 if cfg.mlp == 'swiglu' else 1, F), cfg.bias == 'all')
    self.bo_D = ops.bias((D,), cfg.bias == 'all')

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    a = scales(self.cfg).hidden.multiplier
    if self.cfg.mlp == 'swiglu':
      gate_BxLxF, up_BxLxF = einsum_BL('BLD,SDF->SBLF', x_BxLxD, self.wi_2xDxF, a)
      gate_BxLxF = ops.add_bias(gate_BxLxF, self.bi_SxF, 0)
      up_BxLxF = ops.add_bias(up_BxLxF, self.bi_SxF, 1)
      h_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
    else:
      act = jax.nn.gelu if self.cfg.mlp == 'gelu' else lambda z: jnp.square(jax.nn.relu(z))
      h_BxLxF = act(ops.add_bias(einsum_BL('BLD,DF->BLF', x_BxLxD, self.wi_DxF, a), self.bi_SxF, 0))
    return ops.add_bias(einsum_BL('BLF,FD->BLD', h_BxLxF, self.wo_FxD, a), self.bo_D)


class Block(nnx.Module):
  """Pre-norm decoder block."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.ln1 = _norm(cfg, cfg.D, rngs)
    self.attn = Attention(cfg, rngs)
    self.ln2 = _norm(cfg, cfg.D, rngs)
    self.mlp = Mlp(cfg, rngs)

  def __call__(
    self, x_BxLxD: jax.Array, pos_BxL: jax.Array, visible_BxLxM: jax.Array, cache: LayerCache | None
  ) -> tuple[jax.Array, LayerCache | None]:
    h_BxLxD, cache = self.attn(self.ln1(x_BxLxD), pos_BxL, visible_BxLxM, cache)
    x_BxLxD = x_BxLxD + h_BxLxD
    return x_BxLxD + self.mlp(self.ln2(x_BxLxD)), cache


class TransformerDecoder(nnx.Module):
  """Token (and learned position) embedding, N blocks, output projection (tied by default)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg, s = cfg, scales(cfg)
    self.embed_VxD = ops.param(rngs, cfg.D**-0.5 * s.embedding.init, (cfg.V, cfg.D), (None, FSDP))
    if cfg.positions == 'learned':
      self.pos_LxD = ops.param(rngs, 0.02, (cfg.L, cfg.D), (None, FSDP))
    if not cfg.tied:
      head_std = 0.0 if cfg.zero_head else cfg.D**-0.5 * s.readout.init
      self.head_DxV = ops.param(rngs, head_std, (cfg.D, cfg.V), (FSDP, None))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.N)])
    self.ln_f = _norm(cfg, cfg.D, rngs)

  def __call__(
    self, x_BxL: jax.Array, segment_BxL: jax.Array | None = None, pos_BxL: jax.Array | None = None
  ) -> jax.Array:
    """Logits; packed rows give segment ids (attention stays within each) and their positions."""
    return self.project(self.hidden(x_BxL, segment_BxL, pos_BxL))

  def hidden(
    self, x_BxL: jax.Array, segment_BxL: jax.Array | None = None, pos_BxL: jax.Array | None = None
  ) -> jax.Array:
    """The last block's normalised outputs, which project turns into logits."""
    L = x_BxL.shape[1]
    if pos_BxL is None:
      pos_BxL = jnp.broadcast_to(jnp.arange(L), x_BxL.shape)
    # Causal, and within a token's own segment (packed rows, positions restarting per segment).
    visible_BxLxM = jnp.tril(jnp.ones((1, L, L), bool))
    if segment_BxL is not None:
      visible_BxLxM &= segment_BxL[:, :, None] == segment_BxL[:, None, :]
    x_BxLxD = self._embed(x_BxL, pos_BxL)
    # Split along B over the mesh, if any: jit may follow the embedding and split along D.
    if not jax.sharding.get_abstract_mesh().empty:
      x_BxLxD = jax.lax.with_sharding_constraint(x_BxLxD, P(BATCH))
    block_fn = Block.__call__
    if self.cfg.remat:
      block_fn = nnx.remat(block_fn, policy=getattr(jax.checkpoint_policies, self.cfg.remat_policy))
    for block in self.blocks:
      x_BxLxD, _ = block_fn(block, x_BxLxD, pos_BxL, visible_BxLxM, None)
    return self.ln_f(x_BxLxD)

  def decode(
    self, x_BxL: jax.Array, pos_BxL: jax.Array, cache: list[LayerCache]
  ) -> tuple[jax.Array, list[LayerCache]]:
    """Logits of new tokens at positions pos_BxL (each below cfg.L); the cache extended by them."""
    # Causal by position: cache entries past a row's position are stale or padding.
    visible_BxLxM = jnp.arange(self.cfg.L) <= pos_BxL[..., None]
    x_BxLxD = self._embed(x_BxL, pos_BxL)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache, strict=True):
      x_BxLxD, layer_cache = block(x_BxLxD, pos_BxL, visible_BxLxM, layer_cache)
      new_cache.append(layer_cache)
    return self.project(self.ln_f(x_BxLxD)), new_cache

  def head(self) -> tuple[Head, jax.Array]:
    """The logits function and its output projection (the input embedding when tied)."""
    out_VxD = self.embed_VxD[...] if self.cfg.tied else self.head_DxV[...].T
    options = {'softcap': self.cfg.logit_softcap, 'multiplier': scales(self.cfg).readout.multiplier}
    return functools.partial(logits, **options), out_VxD

  def project(self, h_BxLxD: jax.Array) -> jax.Array:
    """Float32 logits of the hidden states."""
    head, out_VxD = self.head()
    return head(h_BxLxD, out_VxD)

  def _embed(self, x_BxL: jax.Array, pos_BxL: jax.Array) -> jax.Array:
    x_BxLxD = ops.scaled(self.embed_VxD[...][x_BxL], scales(self.cfg).embedding.multiplier)
    if self.cfg.positions == 'learned':
      x_BxLxD += self.pos_LxD[...][pos_BxL]
    return x_BxLxD.astype(jnp.dtype(self.cfg.dtype))


def abstract(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and its parameters' shapes, dtypes and partition specs; no weights made."""
  return nnx.split(nnx.eval_shape(lambda: TransformerDecoder(cfg, nnx.Rngs(0))))
