"""The Hugging Face families of nanodo's models: GPT-2, Llama, Qwen2, Qwen3; their config.json."""

import sentencepiece as spm

from nanodo.model import ModelConfig, head_dim
from nanodo.ops import llama3_scaling

NEEDS = "needs the safetensors package: pip install 'nanodo[hf-models]'"
# Each family's (positions, norm, mlp, qk_norm), its biases (the first: an import's), its
# transformers class. Qwen2 is Llama with biased q, k and v.
FAMILIES = {
  'gpt2': (('learned', 'layernorm', 'gelu', False), ('all', 'none'), 'GPT2LMHeadModel'),
  'llama': (('rope', 'rmsnorm', 'swiglu', False), ('none', 'all'), 'LlamaForCausalLM'),
  'qwen2': (('rope', 'rmsnorm', 'swiglu', False), ('qkv',), 'Qwen2ForCausalLM'),
  'qwen3': (('rope', 'rmsnorm', 'swiglu', True), ('none',), 'Qwen3ForCausalLM'),
}
_OPTIONS = ('positions', 'norm', 'mlp', 'qk_norm')
# Model keys every family takes: sizes, how nanodo computes rather than what, an initialisation,
# the soft-cap (refused unless 0) and the parameterization (unless sp).
_SHARED = 'V D H L N F KV K bias tied rope_base rope_scaling norm_eps dtype remat'.split()
_SHARED += ['remat_policy', 'attention', 'zero_init', 'logit_softcap', 'parameterization']
_SHARED += ['base_width', 'zero_head']
_SUPPORTED = (
  'learned + layernorm + gelu (GPT-2), rope + rmsnorm + swiglu (Llama; Qwen2 with'
  " bias='qkv'), with qk_norm (Qwen3)"
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
  'llama': {'hidden_act': ('silu',)},
  'qwen2': {'hidden_act': ('silu',), 'use_sliding_window': (False,)},
  'qwen3': {'hidden_act': ('silu',), 'attention_bias': (False,), 'use_sliding_window': (False,)},
}
_LLAMA3 = ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')


def family(model: dict) -> str:
  """The family of a run's model keys; ValueError naming an option that none of them has."""
  for key, value in model.items():
    if key not in (*_SHARED, *_OPTIONS):
      raise ValueError(f'model.{key}={value!r} is unknown to export, which supports {_SUPPORTED}.')
  if model.get('logit_softcap'):
    cap = f'model.logit_softcap={model["logit_softcap"]!r}'
    raise ValueError(f'{cap} has no Hugging Face counterpart in these families: 0 (uncapped) only.')
  if model.get('parameterization', 'sp') != 'sp':
    mup = f'model.parameterization={model["parameterization"]!r}'
    why = 'its output multiplier and attention scale have no place in their config.json'
    raise ValueError(f'{mup} has no Hugging Face counterpart in these families ({why}): sp only.')
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
  name = 'qwen2' if name == 'llama' and model['bias'] == 'qkv' else name
  if model['bias'] not in FAMILIES[name][1]:
    valid = ' or '.join(repr(b) for b in FAMILIES[name][1])
    raise ValueError(f'model.bias={model["bias"]!r} has no counterpart in {name}: {valid}.')
  if name == 'gpt2' and model['KV'] not in (0, model['H']):
    why = 'GPT-2 has a key/value head per query head'
    raise ValueError(f'model.KV={model["KV"]} with learned positions has no counterpart: {why}.')
  if name == 'gpt2' and model['K'] and model['K'] * model['H'] != model['D']:
    why = f'GPT-2 heads are model.D / model.H = {model["D"] / model["H"]:g} wide'
    raise ValueError(f'model.K={model["K"]} with learned positions has no counterpart: {why}.')
  return name


def hf_config(cfg: ModelConfig, name: str, sp: spm.SentencePieceProcessor) -> dict:
  """The config.json of cfg as a model of family name, with the token ids of sp."""
  pad = sp.pad_id() if sp.pad_id() >= 0 else None
  ids = {'bos_token_id': sp.bos_id(), 'eos_token_id': sp.eos_id(), 'pad_token_id': pad}
  common = {'architectures': [FAMILIES[name][2]], 'model_type': name, 'vocab_size': cfg.V}
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
  sizes |= {'head_dim': head_dim(cfg), 'num_hidden_layers': cfg.N, 'intermediate_size': cfg.F}
  rope = {'rope_type': 'default', 'rope_theta': cfg.rope_base}
  if scaling := llama3_scaling(cfg.rope_scaling):
    rope = {'rope_type': 'llama3', 'rope_theta': cfg.rope_base}
    rope |= dict(zip(_LLAMA3, (*scaling[:3], int(scaling[3])), strict=True))
  rest = {'max_position_embeddings': cfg.L, 'rms_norm_eps': cfg.norm_eps, 'rope_parameters': rope}
  fixed = {k: v[0] for k, v in _FIXED[name].items()}
  if name == 'llama':
    fixed |= {'attention_bias': cfg.bias == 'all', 'mlp_bias': cfg.bias == 'all'}
  return common | sizes | rest | fixed


def _rope(hf: dict, where: str) -> tuple[float, str]:
  """rope_base and rope_scaling of a config.json's RoPE, in either of transformers' forms."""
  forms = [hf.get('rope_parameters') or {}, hf.get('rope_scaling') or {}]
  kind_of = lambda r: r.get('rope_type', r.get('type', 'default'))
  rope = next((r for r in forms if kind_of(r) != 'default'), forms[0])
  theta = float(rope.get('rope_theta', forms[0].get('rope_theta', hf.get('rope_theta', 10_000.0))))
  kind = kind_of(rope)
  if kind == 'default':
    return theta, ''
  if kind != 'llama3':
    raise ValueError(f'{where}: {rope} has no counterpart in nanodo (plain RoPE, or llama3).')
  values = [float(rope[k]) for k in _LLAMA3]
  return theta, 'llama3:' + ','.join(str(int(v)) if v == int(v) else repr(v) for v in values)


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
  keys = dict(zip(_OPTIONS, FAMILIES[name][0], strict=True)) | {'bias': FAMILIES[name][1][0]}
  if name == 'gpt2':
    D = hf['n_embd']
    keys |= {'V': hf['vocab_size'], 'D': D, 'H': hf['n_head'], 'N': hf['n_layer']}
    keys |= {'L': hf['n_positions'], 'F': hf.get('n_inner') or 4 * D, 'KV': 0}
    eps = hf['layer_norm_epsilon']
    return name, keys | {'tied': hf.get('tie_word_embeddings', True), 'norm_eps': eps}
  if name == 'llama':
    biased = hf.get('attention_bias', False), hf.get('mlp_bias', False)
    if biased[0] != biased[1]:
      both = 'both or neither, as in nanodo (model.bias)'
      raise ValueError(f'{where}: attention_bias={biased[0]} and mlp_bias={biased[1]}: {both}.')
    keys['bias'] = 'all' if biased[0] else 'none'
  D, H = hf['hidden_size'], hf['num_attention_heads']
  K = hf.get('head_dim') or D // H
  G = hf.get('num_key_value_heads') or H
  keys |= {'N': hf['num_hidden_layers'], 'F': hf['intermediate_size'], 'KV': 0 if G == H else G}
  keys |= {'K': 0 if K * H == D else K, 'tied': hf.get('tie_word_embeddings', False)}
  keys['rope_base'], keys['rope_scaling'] = _rope(hf, where)
  return name, keys | {'V': hf['vocab_size'], 'D': D, 'H': H, 'norm_eps': hf['rms_norm_eps']}
