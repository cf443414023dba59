"""Hugging Face import: a run from an exported (or downloaded) model; what is refused."""

import json
import os
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import HF_RUNS, metric_rows, text_config, tiny_config
from safetensors import numpy as safetensors_numpy
from safetensors import torch as safetensors_torch

from nanodo import train
from nanodo.ground import tree
from nanodo.infra import validate, workdir
from nanodo.model import ModelConfig, abstract
from nanodo.tools import hf_import, trained


def test_an_import_reads_bfloat16_weights_in_shards(hf_exports, tmp_path):
  """As models on the hub are often stored: an index of shards, bfloat16 weights."""
  path, out = hf_exports('qwen3')
  shards = tmp_path / 'hf'
  shutil.copytree(out, shards, ignore=shutil.ignore_patterns('model.safetensors'))
  tensors = safetensors_numpy.load_file(os.path.join(out, 'model.safetensors'))
  weight_map = {k: f'model-{i % 2}.safetensors' for i, k in enumerate(sorted(tensors))}
  for file in set(weight_map.values()):
    shard = {k: torch.tensor(v).bfloat16() for k, v in tensors.items() if weight_map[k] == file}
    safetensors_torch.save_file(shard, shards / file, metadata={'format': 'pt'})
  (shards / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  run, c = trained.load(path), tiny_config(str(tmp_path / 'run'), hf_init_dir=str(shards))
  hf_import.config(c)
  params = tree.by_path(hf_import.params(str(shards), run.cfg, run.params))
  for k, x in tree.by_path(run.params).items():
    assert np.array_equal(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), params[k]), k


def test_hf_init_dir_and_checkpoint_restore_dir_exclude_each_other(hf_exports, tmp_path):
  path, out = hf_exports('gpt2')
  c = tiny_config(str(tmp_path / 'run'), hf_init_dir=out, checkpoint_restore_dir=path)
  with pytest.raises(validate.ConfigError, match='give it or checkpoint_restore_dir, not both'):
    validate.check(c)


def losses_of(path: str) -> tuple[list[float], list[float]]:
  """The training losses and held-out losses of a run, in the order logged."""
  rows = metric_rows(path)
  return tuple([r[k] for r in rows if k in r] for k in ('loss', 'eval_loss'))


def test_a_run_started_from_an_export_trains_and_resumes(hf_exports, tmp_path, capsys):
  source, out = hf_exports('llama')
  path = str(tmp_path / 'run')
  # A constant learning rate: the first 3 steps are the same whether the run has 3 or 6.
  c = text_config(path, {}, hf_init_dir=out, vocab_path='')  # its tokenizer too
  c.opt.update(num_train_steps=3, warmup_steps=0, decay_type='constant')
  train.train_and_evaluate(c)
  assert 'step 0 parameters: the weights of' in capsys.readouterr().out
  c.opt.num_train_steps = 6
  train.train_and_evaluate(c)
  assert 'starting at step 3 of 6.' in capsys.readouterr().out
  (losses, evals), (source_losses, source_evals) = map(losses_of, (path, source))
  assert len(losses) == 6 and losses[0] < source_losses[0]  # trained weights, not a fresh start
  assert evals[1] < evals[0] < source_evals[-1]  # held-out loss falls further
  assert workdir.read_config(path)['model'] == {**c.model, **HF_RUNS['llama']}


def copy_with(out: str, dest: str, config_changes: dict, drop: str = '') -> str:
  """A copy of an exported directory, its config.json changed and the file drop removed."""
  shutil.copytree(out, dest, ignore=shutil.ignore_patterns(drop or 'nothing'))
  config_json = pathlib.Path(dest, 'config.json')
  config_json.write_text(json.dumps(json.loads(config_json.read_text()) | config_changes))
  return dest


@pytest.mark.parametrize(
  'name, changes, drop, model, error',
  [
    ('gpt2', {'model_type': 'mistral'}, '', {}, r"holds a 'mistral' model; nanodo imports gpt2"),
    ('gpt2', {'n_inner': 128}, '', {'F': 128}, r'c_fc.bias is \[64\]; .* make it \[128\]'),
    ('gpt2', {}, '', {'D': 64}, r'model.D=64 is not valid: .* holds a model with model.D=32'),
    (
      'gpt2',
      {},
      'tokenizer.*',
      {},
      r'neither tokenizer.model \(SentencePiece\) nor tokenizer.json',
    ),
    ('gpt2', {}, 'model.safetensors', {}, 'no model.safetensors: nanodo reads weights from'),
    (
      'llama',
      {'rope_parameters': {'rope_type': 'llama3', 'rope_theta': 5e5}},
      '',
      {},
      "no 'factor'",
    ),
    ('llama', {'rope_parameters': {'rope_type': 'yarn'}}, '', {}, r'\(plain RoPE, or llama3\)'),
    ('llama', {'attention_bias': True}, '', {}, 'mlp_bias=False: both or neither'),
    ('qwen3', {'head_dim': 32}, '', {}, r'k_norm.weight is \[16\]; .* make it \[32\]'),
    ('qwen3', {'hidden_act': 'gelu'}, '', {}, "hidden_act='gelu' has no counterpart in nanodo"),
  ],
)
def test_an_import_dir_nanodo_cannot_use_is_refused_before_any_write(
  hf_exports, tmp_path, name, changes, drop, model, error
):
  bad = copy_with(hf_exports(name)[1], str(tmp_path / 'hf'), changes, drop)
  c = text_config(str(tmp_path / 'run'), model, hf_init_dir=bad, vocab_path='')
  with pytest.raises(ValueError, match=error):
    train.train_and_evaluate(c)
  assert not os.path.exists(tmp_path / 'run')


def test_a_gpt2_has_biases_unless_they_are_the_zeros_of_nanodos_export(hf_exports, tmp_path):
  out = hf_exports('gpt2')[1]
  assert (
    hf_import.config(tiny_config(str(tmp_path / 'run'), hf_init_dir=out, vocab_path='')).model.bias
    == 'none'
  )
  c = tiny_config(str(tmp_path / 'run'), hf_init_dir=out, vocab_path='')
  c.model.bias = 'all'  # asked for: zero biases to train
  assert hf_import.config(c).model.bias == 'all'
  biased = copy_with(out, str(tmp_path / 'hf'), {})
  tensors = safetensors_numpy.load_file(os.path.join(biased, 'model.safetensors'))
  tensors['transformer.h.1.mlp.c_fc.bias'][3] = 0.5
  safetensors_numpy.save_file(tensors, os.path.join(biased, 'model.safetensors'))
  c = hf_import.config(tiny_config(str(tmp_path / 'run'), hf_init_dir=biased, vocab_path=''))
  assert c.model.bias == 'all'
  cfg = ModelConfig(V=c.vocab_size, **c.model)
  params = tree.by_path(hf_import.params(biased, cfg, abstract(cfg)[1]))
  assert (
    params['blocks/1/mlp/bi_SxF'][0, 3] == 0.5 and np.sum(params['blocks/1/mlp/bi_SxF'] != 0) == 1
  )
