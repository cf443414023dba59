"""The Hugging Face families of nanodo's models: GPT-2, Llama, Qwen3; their configs and tensors."""

import math

import jax
import jax.numpy as jnp
import sentencepiece as spm

from nanodo.ground import tree
from nanodo.model import ModelConfig, abstract

NEEDS = "needs the safetensors package: pip install 'nanodo[hf-models]'"
# Each family's (positions, norm, mlp, qk_norm) and its transformers class.
FAMILIES = {
  'gpt2': (('learned', 'layernorm', 'gelu', False), 'GPT2LMHeadModel'),
  'llama': (('rope', 'rmsnorm', 'swiglu', False), 'LlamaForCausalLM'),
  'qwen3': (('rope', 'rmsnorm', 'swiglu', True), 'Qwen3ForCausalLM'),
}
_OPTIONS = ('positions', 'norm', 'mlp', 'qk_norm')
# Model keys every family takes: sizes, how nanodo computes rather than what, an initialisation,
# and the soft-cap (refused unless 0).
_SHARED = 'V D H L N F KV tied rope_base norm_eps dtype remat remat_policy attention'.split()
_SHARED += ['zero_init', 'logit_softcap']
_SUPPORTED = (
  'learned + layernorm + gelu (GPT-2), rope + rmsnorm + swiglu (Llama), with qk_norm (Qwen3)'
)
# Settings of a config.json that nanodo computes one way only: the values it takes (the first is
# transformers' default, for a key left out).
_FIXED = {
  'gpt2': {
    'activation_function': ('gelu_new', 'gelu_pytorch_tanh'),  # jax.nn.gelu's tanh form
    'scale_attn_weights': (True,),
    'scale_attn_by_inverse_layer_idx': (False,),
    'add_cross_attention': (False,),
  },
  'llama': {'hidden_act': ('silu',), 'attention_bias': (False,), 'mlp_bias': (False,)},
  'qwen3': {'hidden_act': ('silu',), 'attention_bias': (False,), 'use_sliding_window': (False,)},
}


def family(model: dict) -> str:
  """The family of a run's model keys; ValueError naming an option that none of them has."""
  for key, value in model.items():
    if key not in (*_SHARED, *_OPTIONS):
      raise ValueError(f'model.{key}={value!r} is unknown to export, which supports {_SUPPORTED}.')
  if model.get('logit_softcap'):
    cap = f'model.logit_softcap={model["logit_softcap"]!r}'
    raise ValueError(f'{cap} has no Hugging Face counterpart in these families: 0 (uncapped) only.')
  options = tuple(model[k] for k in _OPTIONS)
  differ = lambda f: [
    k for k, a, b in zip(_OPTIONS, options, FAMILIES[f][0], strict=True) if a != b
  ]
  name = min(FAMILIES, key=lambda f: len(differ(f)))
  if differ(name):
    odd = ' and '.join(f'model.{k}={model[k]!r}' for k in differ(name))
    rest = ', '.join(f'{k}={model[k]!r}' for k in _OPTIONS if k not in differ(name))
    raise ValueError(
      f'{odd} (with {rest}) has no Hugging Face counterpart; export supports {_SUPPORTED}.'
    )
  if name == 'gpt2' and model['KV'] not in (0, model['H']):
    why = 'GPT-2 has a key/value head per query head'
    raise ValueError(f'model.KV={model["KV"]} with learned positions has no counterpart: {why}.')
  return name


def hf_config(cfg: ModelConfig, name: str, sp: spm.SentencePieceProcessor) -> dict:
  """The config.json of cfg as a model of family name, with the token ids of sp."""
  pad = sp.pad_id() if sp.pad_id() >= 0 else None
  ids = {'bos_token_id': sp.bos_id(), 'eos_token_id': sp.eos_id(), 'pad_token_id': pad}
  common = {'architectures': [FAMILIES[name][1]], 'model_type': name, 'vocab_size': cfg.V}
  common |= {'tie_word_embeddings': cfg.tied, 'dtype': 'float32', **ids}
  if name == 'gpt2':
    sizes = {'n_embd': cfg.D, 'n_head': cfg.H, 'n_layer': cfg.N, 'n_positions': cfg.L}
    sizes['n_ctx'] = cfg.L  # what llama.cpp's converter and older tools read as the context
    dropout = {'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0}
    eps = {'layer_norm_epsilon': cfg.norm_eps}
    return common | sizes | {'n_inner': cfg.F, 'activation_function': 'gelu_new'} | eps | dropout
  sizes = {
    'hidden_size': cfg.D,
    'num_attention_heads': cfg.H,
    'num_key_value_heads': cfg.KV or cfg.H,
  }
  sizes |= {'head_dim': cfg.D // cfg.H, 'num_hidden_layers': cfg.N, 'intermediate_size': cfg.F}
  rope = {'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_base}}
  rest = {'max_position_embeddings': cfg.L, 'rms_norm_eps': cfg.norm_eps, **rope}
  fixed = {k: v[0] for k, v in _FIXED[name].items()}
  return common | sizes | rest | fixed


def model_keys(hf: dict, where: str) -> tuple[str, dict]:
  """The family and nanodo's model keys (and V) of a Hugging Face config.json from where.

  ValueError for a family or setting nanodo has no counterpart of; KeyError for a missing size.
  """
  name = hf.get('model_type')
  if name not in FAMILIES:
    raise ValueError(f'{where} holds a {name!r} model; nanodo imports {", ".join(FAMILIES)}.')
  for key, valid in _FIXED[name].items():
    if hf.get(key, valid[0]) not in valid:
      raise ValueError(f'{where}: {key}={hf[key]!r} has no counterpart in nanodo ({valid[0]!r}).')
  keys = dict(zip(_OPTIONS, FAMILIES[name][0], strict=True))
  if name == 'gpt2':
    D = hf['n_embd']
    keys |= {'V': hf['vocab_size'], 'D': D, 'H': hf['n_head'], 'N': hf['n_layer']}
    keys |= {'L': hf['n_positions'], 'F': hf.get('n_inner') or 4 * D, 'KV': 0}
    eps = hf['layer_norm_epsilon']
    return name, keys | {'tied': hf.get('tie_word_embeddings', True), 'norm_eps': eps}
  D, H = hf['hidden_size'], hf['num_attention_heads']
  rope = hf.get('rope_parameters') or {'rope_theta': hf.get('rope_theta', 10_000.0)}
  if rope.get('rope_type', 'default') != 'default' or hf.get('rope_scaling'):
    raise ValueError(f'{where}: {rope} has no counterpart in nanodo (RoPE without scaling).')
  if hf.get('head_dim') not in (None, D // H):
    heads = f'hidden_size / num_attention_heads = {D // H}, as in nanodo'
    raise ValueError(f'{where}: head_dim={hf["head_dim"]} is not {heads}.')
  G = hf.get('num_key_value_heads') or H
  keys |= {'N': hf['num_hidden_layers'], 'F': hf['intermediate_size'], 'KV': 0 if G == H else G}
  keys |= {'rope_base': float(rope['rope_theta']), 'tied': hf.get('tie_word_embeddings', False)}
  return name, keys | {'V': hf['vocab_size'], 'D': D, 'H': H, 'norm_eps': hf['rms_norm_eps']}


# Per layer: (Hugging Face tensor, nanodo parameter, index into it, its input axes). A tensor is
# the parameter (or its slice) with its input axes flattened into rows and its output axes into
# columns, as GPT-2's Conv1D holds it (Llama's Linear holds the transpose); 0 input axes: as it
# is. GPT-2 holds q, k and v side by side in one tensor (its columns) and adds zero biases.
_GPT2_LAYER = [
  ('attn.c_attn.weight:q', 'attn/wq_DxHxK', None, 1),
  ('attn.c_attn.weight:k', 'attn/wkv_2xDxGxK', 0, 1),
  ('attn.c_attn.weight:v', 'attn/wkv_2xDxGxK', 1, 1),
  ('attn.c_proj.weight', 'attn/wo_HxKxD', None, 2),
  ('mlp.c_fc.weight', 'mlp/wi_DxF', None, 1),
  ('mlp.c_proj.weight', 'mlp/wo_FxD', None, 1),
  ('ln_1.weight', 'ln1/scale', None, 0),
  ('ln_2.weight', 'ln2/scale', None, 0),
]
_LLAMA_LAYER = [
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
_QWEN3_LAYER = [
  *_LLAMA_LAYER,
  ('self_attn.q_norm.weight', 'attn/q_norm/scale', None, 0),
  ('self_attn.k_norm.weight', 'attn/k_norm/scale', None, 0),
]
# (Hugging Face tensor, nanodo parameter, index, input axes, transposed) of every weight.
Row = tuple[str, str, int | None, int, bool]


def _table(cfg: ModelConfig, name: str) -> list[Row]:
  """Where each Hugging Face tensor of the family name comes from in nanodo's parameters."""
  if name == 'gpt2':
    top = [('transformer.wte.weight', 'embed_VxD'), ('transformer.wpe.weight', 'pos_LxD')]
    top.append(('transformer.ln_f.weight', 'ln_f/scale'))
    block, layer = 'transformer.h', _GPT2_LAYER
  else:
    top = [('model.embed_tokens.weight', 'embed_VxD'), ('model.norm.weight', 'ln_f/scale')]
    block, layer = 'model.layers', _QWEN3_LAYER if name == 'qwen3' else _LLAMA_LAYER
  rows = [(hf, path, None, 0, False) for hf, path in top]
  if not cfg.tied:
    rows.append(('lm_head.weight', 'head_DxV', None, 1, True))
  T = name != 'gpt2'
  for i in range(cfg.N):
    rows += [(f'{block}.{i}.{h}', f'blocks/{i}/{p}', j, n, T and n > 0) for h, p, j, n in layer]
  return rows


def to_hf(cfg: ModelConfig, name: str, params: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The Hugging Face tensors of nanodo's parameters (by path)."""
  t = {}
  for hf, path, index, n_in, transposed in _table(cfg, name):
    w = params[path] if index is None else params[path][index]
    w = w.reshape(math.prod(w.shape[:n_in]), -1) if n_in else w
    t[hf] = w.T if transposed else w
  if name == 'gpt2':
    for i in range(cfg.N):
      qkv = f'transformer.h.{i}.attn.c_attn.weight'
      t[qkv] = jnp.concatenate([t.pop(f'{qkv}:{x}') for x in 'qkv'], axis=1)
    for k in [k for k in t if k.startswith(('transformer.h.', 'transformer.ln_f.'))]:
      t[k.removesuffix('weight') + 'bias'] = jnp.zeros(t[k].shape[-1:], t[k].dtype)
  return t


def from_hf(
  cfg: ModelConfig, name: str, t: dict[str, jax.Array], shapes: dict[str, tuple]
) -> dict[str, jax.Array]:
  """nanodo's parameters (by path, of these shapes) from Hugging Face tensors: to_hf undone."""
  t = dict(t)
  if name == 'gpt2':
    for i in range(cfg.N):
      qkv = f'transformer.h.{i}.attn.c_attn.weight'
      t.update(zip([f'{qkv}:{x}' for x in 'qkv'], jnp.split(t.pop(qkv), 3, axis=1), strict=True))
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
