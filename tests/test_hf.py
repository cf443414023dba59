"""Hugging Face export and import: transformers computes what nanodo does; ids, weights, runs."""

import dataclasses
import fcntl
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from unittest import mock

import pytest

torch = pytest.importorskip('torch', reason='needs torch (the test extra) to run transformers')
transformers = pytest.importorskip('transformers', reason='needs transformers (the test extra)')
safetensors_numpy = pytest.importorskip('safetensors.numpy', reason='needs safetensors')

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from conftest import MAIN, metric_rows, tiny_config  # noqa: E402
from flax import nnx  # noqa: E402

from nanodo import hf, hf_families, sample, sources, train, tree, workdir  # noqa: E402
from nanodo.model import TransformerDecoder  # noqa: E402

# A run of each family: Llama with shared key/value heads, an untied head, another epsilon and
# RoPE base; Qwen3 trained in bfloat16 (its float32 weights are exported).
ROPE = {'positions': 'rope', 'norm': 'rmsnorm', 'mlp': 'swiglu'}
RUNS = {
  'gpt2': {},
  'llama': {**ROPE, 'KV': 1, 'tied': False, 'norm_eps': 1e-5, 'rope_base': 500.0},
  'qwen3': {**ROPE, 'qk_norm': True, 'dtype': 'bfloat16'},
}
TRAIN, HELD_OUT = sources.shakespeare()[0][0], sources.shakespeare()[1]


def config(path: str, model: dict, **overrides):
  """tiny_config with these model keys and overrides, on two short texts beside path (fast)."""
  files = {'train_split': f'{path}.train', 'eval_split': f'{path}.eval'}
  for file, text in zip(files.values(), (TRAIN[:100_000], TRAIN[100_000:105_000]), strict=True):
    pathlib.Path(file).write_text(text, encoding='utf-8')
  c = tiny_config(path, ds_name='text', **files, **overrides)
  c.model.update(model)
  return c


def once(directory: pathlib.Path, make: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """directory, filled by make unless done before, by this process or another one."""
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist's other workers wait for the first
    if not (directory / 'done').exists():
      make(directory)
      (directory / 'done').touch()
  return directory


@pytest.fixture(scope='session')
def exported(tmp_path_factory):
  """family -> (a tiny trained run of it, its export), made once for all pytest-xdist workers."""
  shared = tmp_path_factory.getbasetemp()
  shared = shared.parent if os.environ.get('PYTEST_XDIST_WORKER') else shared  # the session's

  def make(directory: pathlib.Path, name: str) -> None:
    train.train_and_evaluate(config(str(directory / 'run'), RUNS[name]))
    assert hf.export(str(directory / 'run'), str(directory / 'hf')) == name

  def get(name: str) -> tuple[str, str]:
    directory = once(shared / f'hf_{name}', lambda d: make(d, name))
    return str(directory / 'run'), str(directory / 'hf')

  return get


@pytest.mark.parametrize('name', RUNS)
def test_transformers_gives_nanodos_logits_and_greedy_tokens(exported, name):
  path, out = exported(name)
  run, model = workdir.load(path), transformers.AutoModelForCausalLM.from_pretrained(out)
  assert type(model).__name__ == hf_families.FAMILIES[name][1] and model.dtype == torch.float32
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


def test_the_tokenizer_gives_nanodos_ids_on_any_text(exported):
  path, out = exported('gpt2')
  sp, tok = workdir.load(path).sp, transformers.AutoTokenizer.from_pretrained(out)
  odd = '<s>not special</s>  ▁\t12345 日本語 \U0001f600 \x00\n'  # spaces, digits, bytes
  for text in [*HELD_OUT, odd, '', ' ']:
    assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
  assert tok('ROMEO:').input_ids == [sp.bos_id(), *sp.encode('ROMEO:')]  # BOS, as in a prompt


@pytest.mark.parametrize('name', RUNS)
def test_export_import_export_round_trips_bit_for_bit(exported, name, tmp_path):
  path, out = exported(name)
  run = workdir.load(path)
  c = hf.import_config(tiny_config(str(tmp_path / 'run'), vocab_path='', hf_init_dir=out))
  kept = 'D H L N F KV tied rope_base norm_eps positions norm mlp qk_norm'.split()
  assert {k: c.model[k] for k in kept} == {k: run.config.model[k] for k in kept}
  params = hf.import_params(c, run.params)
  same = lambda a, b: a.dtype == b.dtype and np.array_equal(a, b)
  assert all(map(same, *(tree.by_path(p).values() for p in (params, run.params))))
  tensors = safetensors_numpy.load_file(os.path.join(out, 'model.safetensors'))
  again = hf_families.to_hf(run.cfg, name, tree.by_path(params))
  assert set(again) == set(tensors) and all(same(np.asarray(again[k]), tensors[k]) for k in again)


def losses_of(path: str) -> tuple[list[float], list[float]]:
  """The training losses and held-out losses of a run, in the order logged."""
  rows = metric_rows(path)
  return tuple([r[k] for r in rows if k in r] for k in ('loss', 'eval_loss'))


def test_a_run_started_from_an_export_trains_and_resumes(exported, tmp_path, capsys):
  source, out = exported('llama')
  path = str(tmp_path / 'run')
  # A constant learning rate: the first 3 steps are the same whether the run has 3 or 6.
  c = config(path, {}, hf_init_dir=out, vocab_path='')  # its tokenizer too
  c.opt.update(num_train_steps=3, warmup_steps=0, decay_type='constant')
  train.train_and_evaluate(c)
  assert 'step 0 parameters: the weights of' in capsys.readouterr().out
  c.opt.num_train_steps = 6
  train.train_and_evaluate(c)
  assert 'starting at step 3 of 6.' in capsys.readouterr().out
  (losses, evals), (source_losses, source_evals) = map(losses_of, (path, source))
  assert len(losses) == 6 and losses[0] < source_losses[0]  # trained weights, not a fresh start
  assert evals[1] < evals[0] < source_evals[-1]  # held-out loss falls further
  assert workdir.read_config(path)['model'] == {**c.model, **RUNS['llama']}


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
    ('gpt2', {}, 'tokenizer.model', {}, 'no tokenizer.model: nanodo reads SentencePiece'),
    ('gpt2', {}, 'model.safetensors', {}, 'no model.safetensors: nanodo reads weights from'),
    ('llama', {'rope_parameters': {'rope_type': 'llama3', 'rope_theta': 5e5}}, '', {}, 'llama3'),
    ('qwen3', {'head_dim': 32}, '', {}, 'head_dim=32 is not hidden_size / num_attention_heads'),
    ('qwen3', {'hidden_act': 'gelu'}, '', {}, "hidden_act='gelu' has no counterpart in nanodo"),
  ],
)
def test_an_import_dir_nanodo_cannot_use_is_refused_before_any_write(
  exported, tmp_path, name, changes, drop, model, error
):
  bad = copy_with(exported(name)[1], str(tmp_path / 'hf'), changes, drop)
  c = config(str(tmp_path / 'run'), model, hf_init_dir=bad, vocab_path='')
  with pytest.raises(ValueError, match=error):
    train.train_and_evaluate(c)
  assert not os.path.exists(tmp_path / 'run')


def test_an_import_dir_with_gpt2_biases_is_refused(exported, tmp_path):
  bad = copy_with(exported('gpt2')[1], str(tmp_path / 'hf'), {})
  tensors = safetensors_numpy.load_file(os.path.join(bad, 'model.safetensors'))
  tensors['transformer.h.1.mlp.c_fc.bias'][3] = 0.5
  safetensors_numpy.save_file(tensors, os.path.join(bad, 'model.safetensors'))
  c = tiny_config(str(tmp_path / 'run'), hf_init_dir=bad, vocab_path='')
  with pytest.raises(ValueError, match='h.1.mlp.c_fc.bias is not zero, and nanodo has no biases'):
    hf.import_config(c)


@pytest.mark.parametrize(
  'model, error',
  [
    ({'positions': 'rope'}, r"model.positions='rope' \(with norm='layernorm', mlp='gelu'"),
    ({'mlp': 'swiglu', 'norm': 'rmsnorm'}, r"model.positions='learned' \(with norm='rmsnorm'"),
    ({'qk_norm': True}, r'model.qk_norm=True .* no Hugging Face counterpart'),
    ({'positions': 'none'}, r"model.positions='none'"),
    ({'KV': 1}, 'model.KV=1 with learned positions has no counterpart'),
    ({'experts': 8}, r'model.experts=8 is unknown to export'),  # an option added later
  ],
)
def test_export_refuses_an_option_without_a_counterpart_writing_nothing(tmp_path, model, error):
  c = tiny_config(str(tmp_path / 'run'))
  c.model.update(model)
  os.makedirs(c.workdir)
  workdir.write_config(c)  # a run's config is all export reads before it refuses
  with pytest.raises(ValueError, match=error):
    hf.export(c.workdir, str(tmp_path / 'hf'))
  assert sorted(os.listdir(tmp_path)) == ['run']


def test_nanodo_export_of_a_sharded_run_on_the_command_line(exported, tmp_path):
  """Two devices: the parameters are gathered from both shards. About 15 s: two processes."""
  path, out = exported('llama')
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
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
  assert sorted(os.listdir(tmp_path)) == ['empty', 'full']  # no temporary directory left
  for file in os.listdir(out):
    with open(os.path.join(out, file), 'rb') as a, open(tmp_path / 'empty' / file, 'rb') as b:
      assert a.read() == b.read(), file


def test_an_export_that_fails_midway_leaves_out_as_it_was(exported, tmp_path, monkeypatch):
  disk_full = mock.Mock(side_effect=OSError('No space left on device'))
  monkeypatch.setattr(safetensors_numpy, 'save_file', disk_full)
  os.makedirs(tmp_path / 'out')
  with pytest.raises(OSError, match='No space left'):
    hf.export(exported('gpt2')[0], str(tmp_path / 'out'))
  assert os.listdir(tmp_path) == ['out'] and os.listdir(tmp_path / 'out') == []
