"""A real open model: SmolLM2-135M-Instruct in, its logits and greedy text, fine-tuned, out."""

import filecmp
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import metric_rows, text_config
from flax import nnx
from ml_collections import ConfigDict
from smollm2 import model_dir

from nanodo import train
from nanodo.configs import default
from nanodo.corpora import builtin, tokenizer
from nanodo.model import ModelConfig, abstract
from nanodo.tools import commands, hf_export, hf_import, sample, trained

PROMPT = 'The capital of France is'
GREEDY = sample.Sampling(temperature=0.0)


@pytest.fixture(scope='module')
def smollm2() -> str:
  return model_dir()


def _config(path: str, hf_init_dir: str, **overrides) -> ConfigDict:
  """A run from hf_init_dir on a short play, its tokenizer and model keys left to the import."""
  c = text_config(path, {}, hf_init_dir=hf_init_dir, vocab_path='', **overrides)
  c.model = default.get_config().model
  c.model.L = 64
  return c


def _hf(path: str) -> transformers.PreTrainedModel:
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_greedy(path: str, prompt: str, n: int) -> str:
  """transformers' greedy continuation of prompt, n tokens, up to its EOS."""
  tok = transformers.AutoTokenizer.from_pretrained(path)
  ids = tok(prompt, return_tensors='pt')
  with torch.no_grad():
    out = _hf(path).generate(**ids, max_new_tokens=n, do_sample=False)
  return tok.decode(out[0, ids['input_ids'].shape[1] :], skip_special_tokens=True)


def test_an_import_of_smollm2_has_transformers_logits_and_greedy_text(smollm2, tmp_path):
  c = hf_import.config(_config(str(tmp_path / 'run'), smollm2))
  assert (c.model.N, c.model.D, c.model.H, c.model.KV, c.vocab_size) == (30, 576, 9, 3, 49152)
  assert (c.model.rope_base, c.model.norm_eps, c.model.tied) == (1e5, pytest.approx(1e-5), True)
  sp = tokenizer.load(os.path.join(smollm2, 'tokenizer.json'))
  assert (sp.bos_id(), sp.eos_id(), sp.pad_id()) == (1, 2, 2)  # the model's own, not id 0
  hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2)
  assert tokenizer.prompt_ids(sp, PROMPT) == hf_tok(PROMPT)['input_ids']  # no BOS added
  cfg = ModelConfig(V=c.vocab_size, **c.model)
  graphdef, like = abstract(cfg)
  params = hf_import.params(smollm2, cfg, like)
  play = builtin.shakespeare()[1][0]  # a held-out play
  x_4x32 = np.asarray(sp.encode(play)[:128], np.int32).reshape(4, 32)
  logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(x_4x32)))
  hf, x_4x32 = _hf(smollm2), torch.tensor(x_4x32, dtype=torch.long)
  with torch.no_grad():
    f32, f64 = (hf.to(dtype)(x_4x32).logits.numpy() for dtype in (torch.float32, torch.float64))
  # Two float32 computations in different orders: 1.3e-4 apart, each about 1e-4 from float64's.
  assert np.max(np.abs(logits - f32)) <= 2e-4
  assert np.max(np.abs(logits - f64)) <= 2 * np.max(np.abs(f32 - f64))
  run = trained.Trained(cfg, graphdef, params, sp, 0, c)
  text = sample.sample(run, [PROMPT], max_new_tokens=20, sampling=GREEDY)[0]  # a 30-layer cache
  assert text == _hf_greedy(smollm2, PROMPT, 20) and text.startswith(' Paris')


@pytest.mark.slow
def test_smollm2_fine_tunes_on_a_play_and_exports_back_with_its_own_files(smollm2, tmp_path):
  path, out = str(tmp_path / 'run'), str(tmp_path / 'hf')
  c = _config(path, smollm2, batch_size=2, eval_at_start=True, eval_batch_size=4)
  c.opt.update(num_train_steps=4, warmup_steps=1, decay_type='constant', peak_learning_rate=1e-4)
  c.update(eval_every_steps=4, checkpoint_every_steps=4)
  train.train_and_evaluate(c)
  evals = [(r['step'], r['eval_bits_per_byte']) for r in metric_rows(path) if 'eval_loss' in r]
  assert [s for s, _ in evals] == [0, 4] and evals[1][1] < evals[0][1] - 0.05, evals
  bpb = [b for _, b in evals]
  assert sorted(os.listdir(os.path.join(path, 'hf_files'))) == sorted(
    n for n in os.listdir(smollm2) if n != 'model.safetensors'
  )
  _, r = commands.evaluate_run(path)
  assert r['bits_per_byte'] == pytest.approx(bpb[-1], abs=1e-6)
  assert hf_export.export(path, out) == 'llama'
  for name in ('tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'):
    assert filecmp.cmp(os.path.join(smollm2, name), os.path.join(out, name), shallow=False)
  assert filecmp.cmp(*(os.path.join(d, 'generation_config.json') for d in (smollm2, out)))
  original, exported = (json.load(open(os.path.join(d, 'config.json'))) for d in (smollm2, out))
  assert exported == original
  assert not os.path.exists(os.path.join(out, 'tokenizer.model'))
  texts = sample.sample(trained.load(path), [PROMPT], max_new_tokens=20, sampling=GREEDY)
  assert texts[0] == _hf_greedy(out, PROMPT, 20)


def test_a_tokenizer_json_of_a_kind_nanodo_cannot_decode_is_refused(tmp_path):
  import tokenizers

  words = tokenizers.Tokenizer(tokenizers.models.WordLevel({'a': 0, '[UNK]': 1}, '[UNK]'))
  words.save(str(tmp_path / 'tokenizer.json'))
  with pytest.raises(ValueError, match='is a WordLevel tokenizer, whose ids need not decode'):
    tokenizer.load(str(tmp_path / 'tokenizer.json'))


@pytest.mark.parametrize(
  'changes, error',
  [
    ({'vocab_size': 32_000}, 'vocab_size=32000 is smaller than the 49152 tokens of'),
    ({'mlp_bias': True}, 'attention_bias=False and mlp_bias=True: both or neither'),
    ({'rope_scaling': {'rope_type': 'linear', 'factor': 2.0}}, r'\(plain RoPE, or llama3\)'),
  ],
)
def test_a_smollm2_nanodo_computes_differently_is_refused_before_any_write(
  smollm2, tmp_path, changes, error
):
  bad = tmp_path / 'hf'
  shutil.copytree(smollm2, bad, ignore=shutil.ignore_patterns('*.safetensors'))
  config = json.loads((bad / 'config.json').read_text())
  (bad / 'config.json').write_text(json.dumps(config | changes))
  c = _config(str(tmp_path / 'run'), str(bad))
  with pytest.raises(ValueError, match=error):
    train.train_and_evaluate(c)
  assert not os.path.exists(tmp_path / 'run')
