"""Hugging Face export: transformers computes what nanodo does, on its ids; refusals."""

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import HF_RUNS, MAIN, tiny_config
from flax import nnx
from safetensors import numpy as safetensors_numpy

from nanodo.corpora import builtin
from nanodo.ground import tree
from nanodo.infra import workdir
from nanodo.model import TransformerDecoder
from nanodo.tools import hf_export, hf_families, hf_import, hf_tensors, sample, trained

HELD_OUT = builtin.shakespeare()[1]
_QWEN3 = {'positions': 'rope', 'norm': 'rmsnorm', 'mlp': 'swiglu', 'qk_norm': True}


@pytest.mark.parametrize('name', HF_RUNS)
def test_transformers_gives_nanodos_logits_and_greedy_tokens(hf_exports, name):
  path, out = hf_exports(name)
  run, model = trained.load(path), transformers.AutoModelForCausalLM.from_pretrained(out)
  assert type(model).__name__ == hf_families.FAMILIES[name][2] and model.dtype == torch.float32
  cfg = dataclasses.replace(run.cfg, dtype='float32')  # a bfloat16 run's weights are float32
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: TransformerDecoder(cfg, nnx.Rngs(0))))
  ids = [run.sp.bos_id(), *run.sp.encode(HELD_OUT[0][:5000])]
  x_BxL = np.array(ids[: 4 * run.cfg.L]).reshape(4, run.cfg.L)
  with torch.no_grad():
    logits_BxLxV = model(torch.tensor(x_BxL)).logits.numpy()
  diff = np.abs(logits_BxLxV - nnx.merge(graphdef, run.params)(jnp.asarray(x_BxL))).max()
  print(f'{name}: max |logits difference| {diff:.2e}')
  assert diff < 1e-4
  prompt = [ids[100:108]]
  kwargs = dict(max_new_tokens=20, sampling=sample.Sampling(temperature=0), eos_id=run.sp.eos_id())
  inputs = (*sample.pad_prompts(prompt, run.cfg.L, 20), sample.row_keys(0, 1))
  greedy = sample.generate(graphdef, run.params, *inputs, **kwargs)[0].tolist()
  theirs = model.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False)[0, 8:].tolist()
  assert greedy[: len(theirs)] == theirs and (len(theirs) == 20 or theirs[-1] == run.sp.eos_id())


def test_the_tokenizer_gives_nanodos_ids_on_any_text(hf_exports):
  path, out = hf_exports('gpt2')
  sp, tok = trained.load(path).sp, transformers.AutoTokenizer.from_pretrained(out)
  odd = '<s>not special</s>  ▁\t12345 日本語 \U0001f600 \x00\n'  # spaces, digits, bytes
  for text in [*HELD_OUT, odd, '', ' ']:
    assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
  assert tok('ROMEO:').input_ids == [sp.bos_id(), *sp.encode('ROMEO:')]  # BOS, as in a prompt


@pytest.mark.parametrize('name', HF_RUNS)
def test_export_import_export_round_trips_bit_for_bit(hf_exports, name, tmp_path):
  path, out = hf_exports(name)
  run = trained.load(path)
  c = hf_import.config(tiny_config(str(tmp_path / 'run'), vocab_path='', hf_init_dir=out))
  kept = (
    'D H L N F KV K bias tied rope_base rope_scaling norm_eps positions norm mlp qk_norm'.split()
  )
  assert {k: c.model[k] for k in kept} == {k: run.config.model[k] for k in kept}
  params = hf_import.params(out, run.cfg, run.params)
  same = lambda a, b: a.dtype == b.dtype and np.array_equal(a, b)
  assert all(map(same, *(tree.by_path(p).values() for p in (params, run.params))))
  tensors = safetensors_numpy.load_file(os.path.join(out, 'model.safetensors'))
  again = hf_tensors.to_hf(run.cfg, name, tree.by_path(params))
  assert set(again) == set(tensors) and all(same(np.asarray(again[k]), tensors[k]) for k in again)
  if name == 'gpt2':  # the context under both names other converters (llama.cpp's) look for
    config = json.loads(pathlib.Path(out, 'config.json').read_text())
    assert config['n_ctx'] == config['n_positions'] == run.cfg.L


@pytest.mark.parametrize(
  'model, error',
  [
    ({'positions': 'rope'}, r"model.positions='rope' \(with norm='layernorm', mlp='gelu'"),
    ({'mlp': 'swiglu', 'norm': 'rmsnorm'}, r"model.positions='learned' \(with norm='rmsnorm'"),
    ({'qk_norm': True}, r'model.qk_norm=True .* no Hugging Face counterpart'),
    ({'positions': 'none'}, r"model.positions='none'"),
    ({'KV': 1}, 'model.KV=1 with learned positions has no counterpart'),
    ({'mlp': 'relu2'}, r"model.mlp='relu2' \(with positions='learned'"),
    ({'logit_softcap': 15.0}, r'model.logit_softcap=15.0 has no Hugging Face counterpart'),
    ({'bias': 'qkv'}, r"model.bias='qkv' has no counterpart in gpt2: 'all' or 'none'"),
    ({'K': 24}, r'model.K=24 with learned positions has no counterpart: GPT-2 heads are .* 16'),
    ({**_QWEN3, 'bias': 'all'}, r"model.bias='all' has no counterpart in qwen3: 'none'"),
    ({'experts': 8}, r'model.experts=8 is unknown to export'),  # an option added later
  ],
)
def test_export_refuses_an_option_without_a_counterpart_writing_nothing(tmp_path, model, error):
  c = tiny_config(str(tmp_path / 'run'))
  c.model.update(model)
  os.makedirs(c.workdir)
  workdir.write_config(c)  # a run's config is all export reads before it refuses
  with pytest.raises(ValueError, match=error):
    hf_export.export(c.workdir, str(tmp_path / 'hf'))
  assert sorted(os.listdir(tmp_path)) == ['run']


# A Llama-family run trained on two devices, and how its checkpoint's weights load back on two.
TRAIN_ON_TWO = """
import sys
from conftest import HF_RUNS, text_config
from nanodo import train
from nanodo.ground import tree
from nanodo.tools import trained
train.train_and_evaluate(text_config(sys.argv[1], HF_RUNS['llama']))
for k, x in tree.by_path(trained.load(sys.argv[1]).params).items():
  print('weight', k, x.ndim, len(x.sharding.device_set), x.addressable_shards[0].data.size < x.size)
"""


def test_nanodo_export_of_a_sharded_run_on_the_command_line(tmp_path):
  """Two devices: the parameters are gathered from both shards. About 30 s: three processes."""
  path, out = str(tmp_path / 'run'), str(tmp_path / 'one_device')
  two = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  cwd = os.path.dirname(__file__)
  trained_on_two = subprocess.run(
    [sys.executable, '-c', TRAIN_ON_TWO, path], capture_output=True, text=True, env=two, cwd=cwd
  )
  assert trained_on_two.returncode == 0, trained_on_two.stderr[-3000:]
  weights = [
    line.split()[1:] for line in trained_on_two.stdout.splitlines() if line[:7] == 'weight '
  ]
  matrices = [w for w in weights if int(w[1]) > 1]
  assert len(matrices) >= 10 and all(w[2:] == ['2', 'True'] for w in matrices), weights
  assert hf_export.export(path, out) == 'llama'  # here, on one device
  (tmp_path / 'no_torch').mkdir()  # export needs neither torch nor transformers
  for module in ('torch', 'transformers'):
    (tmp_path / 'no_torch' / f'{module}.py').write_text(f'raise ImportError("{module}")')
  path_env = os.pathsep.join([str(tmp_path / 'no_torch'), os.environ.get('PYTHONPATH', '')])
  env = {
    **os.environ,
    'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
    'PYTHONPATH': path_env,
  }
  cli = functools.partial(subprocess.run, capture_output=True, text=True, env=env)
  command = [sys.executable, MAIN, 'export', f'--workdir={path}']
  os.makedirs(tmp_path / 'full')
  (tmp_path / 'full' / 'keep.txt').write_text('mine')
  bad = cli([*command, f'--out={tmp_path / "full"}'])
  assert bad.returncode != 0 and os.listdir(tmp_path / 'full') == ['keep.txt']
  assert bad.stderr.strip().splitlines() == [
    f"error: out='{tmp_path / 'full'}' exists and is not empty; give a new or empty directory."
  ]
  os.makedirs(tmp_path / 'empty')
  good = cli([*command, f'--out={tmp_path / "empty"}'])
  assert good.returncode == 0, good.stderr[-2000:]
  assert 'a llama model' in good.stdout
  assert 'empty' in os.listdir(tmp_path) and not [n for n in os.listdir(tmp_path) if 'tmp' in n]
  for file in os.listdir(out):
    with open(os.path.join(out, file), 'rb') as a, open(tmp_path / 'empty' / file, 'rb') as b:
      assert a.read() == b.read(), file


def test_an_export_that_fails_midway_leaves_out_as_it_was(hf_exports, tmp_path, monkeypatch):
  disk_full = mock.Mock(side_effect=OSError('No space left on device'))
  monkeypatch.setattr(safetensors_numpy, 'save_file', disk_full)
  os.makedirs(tmp_path / 'out')
  with pytest.raises(OSError, match='No space left'):
    hf_export.export(hf_exports('gpt2')[0], str(tmp_path / 'out'))
  assert os.listdir(tmp_path) == ['out'] and os.listdir(tmp_path / 'out') == []
