"""The tensors of nanodo's models under Hugging Face's names (GPT-2, Llama, Qwen2, Qwen3)."""

import math

import jax
import jax.numpy as jnp

from nanodo.ground import tree
from nanodo.model import ModelConfig, abstract

# Per layer: (Hugging Face tensor, nanodo parameter, index into it, its input axes). A tensor is
# the parameter (or its slice) with its input axes flattened into rows and its output axes into
# columns, as GPT-2's Conv1D holds it (Llama's Linear holds the transpose); 0 input axes: as it
# is; None: a bias, flattened. GPT-2 holds q, k and v side by side in one tensor (its columns).
Layer = list[tuple[str, str, int | None, int | None]]
_GPT2_LAYER: Layer = [
  ('attn.c_attn.weight:q', 'attn/wq_DxHxK', None, 1),
  ('attn.c_attn.weight:k', 'attn/wkv_2xDxGxK', 0, 1),
  ('attn.c_attn.weight:v', 'attn/wkv_2xDxGxK', 1, 1),
  ('attn.c_proj.weight', 'attn/wo_HxKxD', None, 2),
  ('mlp.c_fc.weight', 'mlp/wi_DxF', None, 1),
  ('mlp.c_proj.weight', 'mlp/wo_FxD', None, 1),
  ('ln_1.weight', 'ln1/scale', None, 0),
  ('ln_2.weight', 'ln2/scale', None, 0),
]
_GPT2_BIASES: Layer = [
  ('attn.c_attn.bias:q', 'attn/bq_HxK', None, None),
  ('attn.c_attn.bias:k', 'attn/bkv_2xGxK', 0, None),
  ('attn.c_attn.bias:v', 'attn/bkv_2xGxK', 1, None),
  ('attn.c_proj.bias', 'attn/bo_D', None, None),
  ('mlp.c_fc.bias', 'mlp/bi_SxF', 0, None),
  ('mlp.c_proj.bias', 'mlp/bo_D', None, None),
  ('ln_1.bias', 'ln1/bias', None, 0),
  ('ln_2.bias', 'ln2/bias', None, 0),
]
_LLAMA_LAYER: Layer = [
  ('self_attn.q_proj.weight', 'attn/wq_DxHxK', None, 1),
  ('self_attn.k_proj.weight', 'attn/wkv_2xDxGxK', 0, 1),
  ('self_attn.v_proj.weight', 'attn/wkv_2xDxGxK', 1, 1),
  ('self_attn.o_proj.weight', 'attn/wo_HxKxD', None, 2),
  ('mlp.gate_proj.weight', 'mlp/wi_2xDxF', 0, 1),
  ('mlp.up_proj.weight', 'mlp/wi_2xDxF', 1, 1),
  ('mlp.down_proj.weight', 'mlp/wo_FxD', None, 1),
  ('input_layernorm.weight', 'ln1/scale', None, 0),
  ('post_attention_layernorm.weight', 'ln2/scale', None, 0),
]
_QKV_BIASES: Layer = [
  ('self_attn.q_proj.bias', 'attn/bq_HxK', None, None),
  ('self_attn.k_proj.bias', 'attn/bkv_2xGxK', 0, None),
  ('self_attn.v_proj.bias', 'attn/bkv_2xGxK', 1, None),
]
_OTHER_BIASES: Layer = [  # Llama's attention_bias and mlp_bias
  ('self_attn.o_proj.bias', 'attn/bo_D', None, None),
  ('mlp.gate_proj.bias', 'mlp/bi_SxF', 0, None),
  ('mlp.up_proj.bias', 'mlp/bi_SxF', 1, None),
  ('mlp.down_proj.bias', 'mlp/bo_D', None, None),
]
_QK_NORMS: Layer = [
  ('self_attn.q_norm.weight', 'attn/q_norm/scale', None, 0),
  ('self_attn.k_norm.weight', 'attn/k_norm/scale', None, 0),
]
# (Hugging Face tensor, nanodo parameter, index, input axes, transposed) of every weight.
Row = tuple[str, str, int | None, int | None, bool]


def _layer(cfg: ModelConfig, name: str) -> Layer:
  """The tensors of one block of family name."""
  if name == 'gpt2':
    return _GPT2_LAYER + (_GPT2_BIASES if cfg.bias == 'all' else [])
  biases = {'none': [], 'qkv': _QKV_BIASES, 'all': _QKV_BIASES + _OTHER_BIASES}[cfg.bias]
  return _LLAMA_LAYER + biases + (_QK_NORMS if name == 'qwen3' else [])


def _table(cfg: ModelConfig, name: str) -> list[Row]:
  """Where each Hugging Face tensor of the family name comes from in nanodo's parameters."""
  if name == 'gpt2':
    top = [('transformer.wte.weight', 'embed_VxD'), ('transformer.wpe.weight', 'pos_LxD')]
    top.append(('transformer.ln_f.weight', 'ln_f/scale'))
    top += [('transformer.ln_f.bias', 'ln_f/bias')] if cfg.bias == 'all' else []
    block = 'transformer.h'
  else:
    top = [('model.embed_tokens.weight', 'embed_VxD'), ('model.norm.weight', 'ln_f/scale')]
    block = 'model.layers'
  rows = [(hf, path, None, 0, False) for hf, path in top]
  if not cfg.tied:
    rows.append(('lm_head.weight', 'head_DxV', None, 1, True))
  T = name != 'gpt2'
  for i in range(cfg.N):
    rows += [
      (f'{block}.{i}.{h}', f'blocks/{i}/{p}', j, n, T and bool(n))
      for h, p, j, n in _layer(cfg, name)
    ]
  return rows


def to_hf(cfg: ModelConfig, name: str, params: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The Hugging Face tensors of nanodo's parameters (by path); a GPT-2 without biases has
  zeros for them, as GPT2LMHeadModel must."""
  t = {}
  for hf, path, index, n_in, transposed in _table(cfg, name):
    w = params[path] if index is None else params[path][index]
    w = w.reshape(-1) if n_in is None else w.reshape(math.prod(w.shape[:n_in]), -1) if n_in else w
    t[hf] = w.T if transposed else w
  if name == 'gpt2':
    for i in range(cfg.N):
      for kind in ('weight', 'bias'):
        qkv = f'transformer.h.{i}.attn.c_attn.{kind}'
        if f'{qkv}:q' in t:
          t[qkv] = jnp.concatenate([t.pop(f'{qkv}:{x}') for x in 'qkv'], axis=-1)
    weights = [k for k in t if k.startswith(('transformer.h.', 'transformer.ln_f.'))]
    for k in [k for k in weights if k.endswith('weight')]:
      t.setdefault(k.removesuffix('weight') + 'bias', jnp.zeros(t[k].shape[-1:], t[k].dtype))
  return t


def from_hf(
  cfg: ModelConfig, name: str, t: dict[str, jax.Array], shapes: dict[str, tuple]
) -> dict[str, jax.Array]:
  """nanodo's parameters (by path, of these shapes) from Hugging Face tensors: to_hf undone."""
  t = dict(t)
  if name == 'gpt2':
    for i in range(cfg.N):
      for kind in ('weight', 'bias'):
        qkv = f'transformer.h.{i}.attn.c_attn.{kind}'
        split = jnp.split(t.pop(qkv), 3, axis=-1)
        t.update(zip([f'{qkv}:{x}' for x in 'qkv'], split, strict=True))
  parts = {}
  for hf, path, index, _, transposed in _table(cfg, name):
    w = t[hf].T if transposed else t[hf]
    parts.setdefault(path, {})[index] = w.reshape(shapes[path][index is not None :])
  return {
    p: v[None] if None in v else jnp.stack([v[i] for i in sorted(v)]) for p, v in parts.items()
  }


def hf_shapes(cfg: ModelConfig, name: str) -> dict[str, tuple]:
  """The shape of every tensor of a model cfg of the family name (no weights made)."""
  hf = jax.eval_shape(lambda p: to_hf(cfg, name, p), tree.by_path(abstract(cfg)[1]))
  return {k: tuple(v.shape) for k, v in hf.items()}
