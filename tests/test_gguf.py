"""GGUF export: transformers' own GGUF loader computes nanodo's logits; the tokenizer; refusals."""

import dataclasses
import os
import shutil
import subprocess
import sys

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import HF_RUNS, MAIN, once, text_config
from flax import nnx

from nanodo import train
from nanodo.corpora import builtin
from nanodo.infra import workdir
from nanodo.model import TransformerDecoder
from nanodo.tools import gguf_export, trained

HELD_OUT = builtin.shakespeare()[1][0][:5000]
# transformers reads no head dimension from a qwen3 GGUF: it takes Qwen3's 128.
QWEN3 = {**HF_RUNS['qwen3'], 'D': 256, 'H': 2, 'F': 128, 'dtype': 'float32'}


@pytest.fixture(scope='module')
def runs(tmp_path_factory, hf_exports):
  """family -> a tiny trained run of it."""
  qwen3 = tmp_path_factory.getbasetemp() / 'gguf_qwen3'
  once(qwen3, lambda d: train.train_and_evaluate(text_config(str(d / 'run'), QWEN3)))
  return {'llama': hf_exports('llama')[0], 'qwen3': str(qwen3 / 'run')}


def _logits(path: str, file: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """nanodo's logits of 4 rows of held-out text, transformers' from file, and those rows."""
  run = trained.load(path)
  cfg = dataclasses.replace(run.cfg, dtype='float32')
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: TransformerDecoder(cfg, nnx.Rngs(0))))
  ids = [run.sp.bos_id(), *run.sp.encode(HELD_OUT)]
  x_BxL = np.array(ids[: 4 * cfg.L]).reshape(4, cfg.L)
  folder, name = os.path.split(file)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
  with torch.no_grad():
    theirs_BxLxV = model(torch.tensor(x_BxL)).logits.float().numpy()
  return np.asarray(nnx.merge(graphdef, run.params)(jnp.asarray(x_BxL))), theirs_BxLxV, x_BxL


@pytest.mark.parametrize('name', ['llama', 'qwen3'])
def test_transformers_loads_the_gguf_with_nanodos_logits(runs, name, tmp_path):
  path, f32, f16 = runs[name], str(tmp_path / 'f32.gguf'), str(tmp_path / 'f16.gguf')
  assert gguf_export.export(path, f32) == name
  assert gguf_export.export(path, f16, 'float16') == name
  ours, theirs, _ = _logits(path, f32)
  diff = np.abs(ours - theirs).max()
  print(f'{name} float32 GGUF: max |logits difference| {diff:.2e}')
  assert diff < 1e-4
  ours, theirs, _ = _logits(path, f16)
  diff16 = np.abs(ours - theirs).max()
  print(f'{name} float16 GGUF: max |logits difference| {diff16:.2e}')
  assert diff < diff16 < 0.05  # rounded weights, not another model
  types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(f16).tensors}
  assert types['blk.0.attn_q.weight'] == 'F16' and types['blk.0.attn_norm.weight'] == 'F32'


def test_the_gguf_holds_the_sentencepiece_tokenizer(runs, tmp_path):
  path, file = runs['llama'], str(tmp_path / 'model.gguf')
  gguf_export.export(path, file)
  sp, fields = trained.load(path).sp, gguf.GGUFReader(file).fields
  value = lambda key: fields[key].contents()
  assert value('general.architecture') == 'llama' and value('tokenizer.ggml.model') == 'llama'
  assert value('tokenizer.ggml.tokens') == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
  assert np.allclose(value('tokenizer.ggml.scores'), [sp.get_score(i) for i in range(len(sp))])
  kinds = value('tokenizer.ggml.token_type')
  assert kinds[sp.bos_id()] == kinds[sp.eos_id()] == gguf.TokenType.CONTROL
  assert kinds[sp.unk_id()] == gguf.TokenType.UNKNOWN
  assert value('tokenizer.ggml.bos_token_id') == sp.bos_id()
  assert value('tokenizer.ggml.eos_token_id') == sp.eos_id()
  assert value('tokenizer.ggml.add_space_prefix') is False
  assert value('tokenizer.ggml.add_bos_token') is True


def test_what_gguf_export_cannot_write_is_refused_writing_nothing(hf_exports, runs, tmp_path):
  gpt2, file = hf_exports('gpt2')[0], str(tmp_path / 'model.gguf')
  with pytest.raises(ValueError, match='writes the llama and qwen3 families; this run is gpt2'):
    gguf_export.export(gpt2, file)
  with pytest.raises(ValueError, match='writes the llama and qwen3 families; this run is qwen2'):
    gguf_export.export(hf_exports('qwen2')[0], file)
  c = workdir.run_config(runs['llama'])
  for key, value, error in [
    ('bias', 'all', "without biases; this run has model.bias='all'"),
    ('rope_scaling', 'llama3:8,1,4,16', "plain RoPE; this run has model.rope_scaling='llama3"),
  ]:
    c.model[key] = value
    c.workdir = str(tmp_path / key)
    os.makedirs(c.workdir)
    workdir.write_config(c)  # a run's config is all export reads before it refuses
    with pytest.raises(ValueError, match=error):
      gguf_export.export(c.workdir, file)
    c.model[key] = workdir.run_config(runs['llama']).model[key]
    shutil.rmtree(c.workdir)
  with pytest.raises(ValueError, match=r"dtype='bfloat16' is not valid: one of \['float32'"):
    gguf_export.export(runs['llama'], file, 'bfloat16')
  assert not os.listdir(tmp_path)
  (tmp_path / 'model.gguf').write_text('mine')
  with pytest.raises(ValueError, match='exists; give a new file name'):
    gguf_export.export(runs['llama'], file)
  assert (tmp_path / 'model.gguf').read_text() == 'mine'


def test_nanodo_export_format_gguf_on_the_command_line(runs, tmp_path):
  file = str(tmp_path / 'model.gguf')
  command = [sys.executable, MAIN, 'export', f'--workdir={runs["qwen3"]}', f'--out={file}']
  done = subprocess.run([*command, '--format=gguf'], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'wrote {file}: a qwen3 GGUF file (float32)' in done.stdout
  assert gguf.GGUFReader(file).fields['general.architecture'].contents() == 'qwen3'
  bad = subprocess.run([*command, '--format=gguf'], capture_output=True, text=True)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines() == [f"error: out='{file}' exists; give a new file name."]
  out = str(tmp_path / 'hf')
  stray = subprocess.run(
    [*command[:-1], f'--out={out}', '--dtype=float16'], capture_output=True, text=True
  )
  assert stray.returncode != 0 and not os.path.exists(out)
  assert stray.stderr.strip().splitlines() == [
    'error: --dtype sets the weights of a GGUF file: give it with --format=gguf'
  ]
