"""The hub's GPT-2, Llama 3.2, Qwen2.5 and Qwen3 from their own config.json values, with random
weights (nothing downloaded): an import computes transformers' logits and greedy tokens, a run
from it exports back, and export -> import -> export is bit for bit."""

import json
import os
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import VOCAB, once, text_config
from flax import nnx
from safetensors import numpy as safetensors_numpy

from nanodo import train
from nanodo.configs import default
from nanodo.corpora import builtin, tokenizer
from nanodo.ground import tree
from nanodo.model import ModelConfig, abstract
from nanodo.tools import hf_export, hf_import, hf_tensors, sample, trained

# Each model's config.json as the hub has it, but fewer layers and a vocabulary of the test
# tokenizer's 1,024 pieces (the Qwens' padded beyond it, as theirs is).
_LESS = {'num_hidden_layers': 2, 'vocab_size': 1024}
HUB = {
  'openai-community/gpt2': {
    'model_type': 'gpt2', 'activation_function': 'gelu_new', 'attn_pdrop': 0.1,
    'embd_pdrop': 0.1, 'initializer_range': 0.02, 'layer_norm_epsilon': 1e-05, 'n_ctx': 1024,
    'n_embd': 768, 'n_head': 12, 'n_layer': 2, 'n_positions': 1024, 'resid_pdrop': 0.1,
    'summary_first_dropout': 0.1, 'vocab_size': 1024,
  },
  'meta-llama/Llama-3.2-1B': {
    'model_type': 'llama', 'attention_bias': False, 'attention_dropout': 0.0, 'head_dim': 64,
    'hidden_act': 'silu', 'hidden_size': 2048, 'intermediate_size': 8192,
    'max_position_embeddings': 131072, 'mlp_bias': False, 'num_attention_heads': 32,
    'num_key_value_heads': 8, 'pretraining_tp': 1, 'rms_norm_eps': 1e-05, 'rope_scaling': {
      'factor': 32.0, 'high_freq_factor': 4.0, 'low_freq_factor': 1.0,
      'original_max_position_embeddings': 8192, 'rope_type': 'llama3',
    }, 'rope_theta': 500000.0, 'tie_word_embeddings': True, **_LESS, 'num_hidden_layers': 1,
  },
  'Qwen/Qwen2.5-0.5B': {
    'model_type': 'qwen2', 'attention_dropout': 0.0, 'hidden_act': 'silu', 'hidden_size': 896,
    'intermediate_size': 4864, 'max_position_embeddings': 32768, 'max_window_layers': 24,
    'num_attention_heads': 14, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-06,
    'rope_theta': 1000000.0, 'sliding_window': 32768, 'tie_word_embeddings': True,
    'use_sliding_window': False, **_LESS, 'vocab_size': 1088,
  },
  'Qwen/Qwen3-0.6B': {
    'model_type': 'qwen3', 'attention_bias': False, 'attention_dropout': 0.0, 'head_dim': 128,
    'hidden_act': 'silu', 'hidden_size': 1024, 'intermediate_size': 3072,
    'max_position_embeddings': 40960, 'max_window_layers': 28, 'num_attention_heads': 16,
    'num_key_value_heads': 8, 'rms_norm_eps': 1e-06, 'rope_scaling': None, 'rope_theta': 1000000,
    'sliding_window': None, 'tie_word_embeddings': True, 'use_sliding_window': False, **_LESS,
    'vocab_size': 1088,
  },
}  # fmt: skip
PLAY = builtin.shakespeare()[1][0]


def _build(directory: pathlib.Path, name: str) -> None:
  """The model of HUB[name] with random weights, the test tokenizer's ids, and that tokenizer."""
  sp = tokenizer.load(VOCAB)
  ids = {'bos_token_id': sp.bos_id(), 'eos_token_id': sp.eos_id()}
  config = transformers.AutoConfig.for_model(**HUB[name], **ids)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():  # every weight away from its initialisation: zero biases, unit norms
    for key, w in model.named_parameters():
      if key.endswith('.bias') or 'norm' in key or 'ln_' in key:
        w.copy_(float(key.endswith('weight')) + 0.1 * torch.randn_like(w))
      else:
        w.normal_(0.0, 0.02)
  model.save_pretrained(directory / 'hf')
  shutil.copyfile(VOCAB, directory / 'hf' / 'tokenizer.model')


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
  """name -> the directory of its model, made once for all pytest-xdist workers."""
  shared = tmp_path_factory.getbasetemp()
  shared = shared.parent if os.environ.get('PYTEST_XDIST_WORKER') else shared
  return lambda name: str(once(shared / f'hub_{name.replace("/", "_")}', lambda d: _build(d, name)))


def _config(path: str, hf_init_dir: str, name: str, **overrides):
  """A run from hf_init_dir on a short play, its model keys and tokenizer the import's."""
  c = text_config(path, {}, hf_init_dir=hf_init_dir, vocab_path='', **overrides)
  c.model = default.get_config().model
  if HUB[name]['model_type'] != 'gpt2':  # GPT-2's context is its n_positions
    c.model.L = 64
  return hf_import.config(c)


def _transformers(path: str) -> transformers.PreTrainedModel:
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits_and_greedy(path: str, cfg: ModelConfig, params, x_BxL: np.ndarray) -> None:
  """Asserts that transformers' model in path has nanodo's logits and greedy tokens."""
  graphdef = abstract(cfg)[0]
  ours = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(x_BxL)))
  model = _transformers(path)
  with torch.no_grad():
    theirs = model(torch.tensor(x_BxL)).logits.numpy()
  diff = np.abs(ours - theirs).max()
  print(f'{path}: max |logits difference| {diff:.2e} (logits up to {np.abs(theirs).max():.1f})')
  assert diff <= 1e-4
  prompt = x_BxL[:1, :8].tolist()
  kwargs = dict(max_new_tokens=20, sampling=sample.Sampling(temperature=0), eos_id=-1)
  inputs = (*sample.pad_prompts(prompt, cfg.L, 20), sample.row_keys(0, 1))
  greedy = sample.generate(graphdef, params, *inputs, **kwargs)[0].tolist()
  with torch.no_grad():
    out = model.generate(
      torch.tensor(prompt), max_new_tokens=20, min_new_tokens=20, do_sample=False
    )
  assert greedy == out[0, 8:].tolist()


def _rows(L: int) -> np.ndarray:
  sp = tokenizer.load(VOCAB)
  return np.asarray([sp.bos_id(), *sp.encode(PLAY)][: 2 * L]).reshape(2, L)


@pytest.mark.parametrize('name', HUB)
def test_an_import_computes_transformers_logits_and_greedy_tokens(hub, name, tmp_path):
  path = os.path.join(hub(name), 'hf')
  c = _config(str(tmp_path / 'run'), path, name)
  cfg = ModelConfig(V=c.vocab_size, **c.model)
  params = hf_import.params(path, cfg, abstract(cfg)[1])
  _logits_and_greedy(path, cfg, params, _rows(min(cfg.L, 64)))


EXPECTED = {  # the options each import takes
  'openai-community/gpt2': {'bias': 'all', 'K': 0, 'L': 1024, 'positions': 'learned'},
  'meta-llama/Llama-3.2-1B': {'bias': 'none', 'K': 0, 'rope_scaling': 'llama3:32,1,4,8192'},
  'Qwen/Qwen2.5-0.5B': {'bias': 'qkv', 'K': 0, 'KV': 2, 'rope_base': 1e6},
  'Qwen/Qwen3-0.6B': {'bias': 'none', 'K': 128, 'qk_norm': True, 'D': 1024, 'H': 16},
}


@pytest.mark.parametrize('name', HUB)
def test_a_run_from_an_import_exports_back_bit_for_bit(hub, name, tmp_path):
  path, run, out = os.path.join(hub(name), 'hf'), str(tmp_path / 'run'), str(tmp_path / 'out')
  c = _config(run, path, name, batch_size=2, eval_batch_size=2)
  assert {k: c.model[k] for k in EXPECTED[name]} == EXPECTED[name]
  c.opt.update(num_train_steps=1, warmup_steps=0, decay_type='constant', peak_learning_rate=1e-3)
  c.update(eval_every_steps=1, checkpoint_every_steps=1)
  train.train_and_evaluate(c)
  assert hf_export.export(run, out) == HUB[name]['model_type']
  trained_run = trained.load(run)
  _logits_and_greedy(out, trained_run.cfg, trained_run.params, _rows(64))
  again = _config(str(tmp_path / 'again'), out, name)
  assert again.model.to_dict() == trained_run.config.model.to_dict()
  cfg = ModelConfig(V=again.vocab_size, **again.model)
  params = hf_import.params(out, cfg, trained_run.params)
  tensors = safetensors_numpy.load_file(os.path.join(out, 'model.safetensors'))
  exported = hf_tensors.to_hf(cfg, HUB[name]['model_type'], tree.by_path(params))
  same = lambda a, b: a.dtype == b.dtype and np.array_equal(a, b)
  assert set(exported) == set(tensors) and all(
    same(np.asarray(exported[k]), tensors[k]) for k in tensors
  )
  config = json.loads(pathlib.Path(out, 'config.json').read_text())
  assert config['model_type'] == HUB[name]['model_type']
