"""Hugging Face export and import: transformers computes what nanodo does; ids, weights, runs."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip('torch', reason='needs torch (the test extra) to run transformers')
transformers = pytest.importorskip('transformers', reason='needs transformers (the test extra)')
safetensors_numpy = pytest.importorskip('safetensors.numpy', reason='needs safetensors')

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
from conftest import MAIN, metric_rows, tiny_config  # noqa: E402
from flax import nnx  # noqa: E402

from nanodo import hf, hf_families, sample, sources, tokenizer, train, workdir  # noqa: E402
from nanodo.model import TransformerDecoder  # noqa: E402

# A run of each family: Llama with shared key/value heads, an untied head and another epsilon;
# Qwen3 trained in bfloat16 (its float32 weights are exported) with another RoPE base.
RUNS = {
  'gpt2': {},
  'llama': dict(positions='rope', norm='rmsnorm', mlp='swiglu', KV=1, tied=False, norm_eps=1e-5),
  'qwen3': dict(
    positions='rope', norm='rmsnorm', mlp='swiglu', qk_norm=True, dtype='bfloat16', rope_base=500.0
  ),
}
HELD_OUT = sources.shakespeare()[1]
# One worker runs them all: each family's run is trained once (about 75 s in all on 2 busy cores).
pytestmark = pytest.mark.xdist_group('hf')


def config(path: str, data: str, model: dict, **overrides):
  """tiny_config with these model keys and overrides, on the text files in data (fast)."""
  text = {'ds_name': 'text', 'cache_dir': os.path.join(data, 'cache')}
  text |= {
    'train_split': os.path.join(data, 'train.txt'),
    'eval_split': os.path.join(data, 'eval.txt'),
  }
  c = tiny_config(path, **text, **overrides)
  c.model.update(model)
  return c


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """family -> (a tiny trained run of it, its export); each made once, when first asked for."""
  made, data = {}, tmp_path_factory.mktemp('data')
  (data / 'train.txt').write_text(sources.shakespeare()[0][0][:100_000], encoding='utf-8')
  (data / 'eval.txt').write_text(sources.shakespeare()[0][1][:5000], encoding='utf-8')

  def get(name: str) -> tuple[str, str]:
    if name not in made:
      base = tmp_path_factory.mktemp(name)
      train.train_and_evaluate(config(str(base / 'run'), str(data), RUNS[name]))
      assert hf.export(str(base / 'run'), str(base / 'hf')) == name
      made[name] = str(base / 'run'), str(base / 'hf')
    return made[name]

  get.data = str(data)
  return get


def float32_model(run: workdir.Run) -> tuple[nnx.GraphDef, TransformerDecoder]:
  """The run's model computing in float32 (a bfloat16 run's weights are float32 already)."""
  cfg = dataclasses.replace(run.cfg, dtype='float32')
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: TransformerDecoder(cfg, nnx.Rngs(0))))
  return graphdef, nnx.merge(graphdef, run.params)


@pytest.mark.parametrize('name', RUNS)
def test_transformers_gives_nanodos_logits_and_greedy_tokens(exported, name):
  path, out = exported(name)
  run, model = workdir.load(path), transformers.AutoModelForCausalLM.from_pretrained(out)
  assert type(model).__name__ == hf_families.FAMILIES[name][1] and model.dtype == torch.float32
  graphdef, ours = float32_model(run)
  ids = [run.sp.bos_id(), *run.sp.encode(HELD_OUT[0][:5000])]
  x_BxL = np.array(ids[: 4 * run.cfg.L]).reshape(4, run.cfg.L)
  with torch.no_grad():
    logits_BxLxV = model(torch.tensor(x_BxL)).logits.numpy()
  diff = np.abs(logits_BxLxV - np.asarray(ours(jnp.asarray(x_BxL)))).max()
  print(f'{name}: max |logits difference| {diff:.2e}')
  assert diff < 1e-4
  prompt = ids[100:108]
  prompt_BxP, length_B = sample.pad_prompts([prompt], run.cfg.L, 20)
  kwargs = dict(max_new_tokens=20, sampling=sample.Sampling(temperature=0), eos_id=run.sp.eos_id())
  keys_B = sample.row_keys(0, 1)
  greedy = sample.generate(graphdef, run.params, prompt_BxP, length_B, keys_B, **kwargs)[0]
  theirs = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, 8:]
  assert np.asarray(greedy)[: len(theirs)].tolist() == theirs.tolist()


def test_the_tokenizer_gives_nanodos_ids_on_any_text(exported):
  path, out = exported('gpt2')
  sp, tok = workdir.load(path).sp, transformers.AutoTokenizer.from_pretrained(out)
  odd = '<s>not special</s>  ▁\t12345 日本語 \U0001f600 \x00\n'  # spaces, digits, bytes
  for text in [*HELD_OUT, odd, '', ' ']:
    assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
  assert tok('ROMEO:').input_ids == [sp.bos_id(), *sp.encode('ROMEO:')]  # BOS, as in a prompt


def train_sentencepiece(prefix: str, model_type: str) -> str:
  """A small SentencePiece model with a dummy prefix (as Llama's), trained on a held-out play."""
  kwargs = dict(vocab_size=400, byte_fallback=True, add_dummy_prefix=True, model_type=model_type)
  kwargs |= dict(normalization_rule_name='identity', remove_extra_whitespaces=False, minloglevel=2)
  lines = iter(HELD_OUT[1].splitlines())
  spm.SentencePieceTrainer.train(sentence_iterator=lines, model_prefix=prefix, **kwargs)
  return prefix + '.model'


def test_a_tokenizer_with_a_dummy_prefix_exports_too(tmp_path):
  path = train_sentencepiece(str(tmp_path / 'bpe'), 'bpe')
  with open(tmp_path / 'tokenizer.json', 'w', encoding='utf-8') as f:
    json.dump(tokenizer.hf_tokenizer(path), f)
  sp = spm.SentencePieceProcessor(model_file=path)
  tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / 'tokenizer.json'))
  for text in [HELD_OUT[2], '  two spaces first', '日本語 \U0001f600', '']:
    assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
  unigram = train_sentencepiece(str(tmp_path / 'unigram'), 'unigram')
  with pytest.raises(ValueError, match='other than BPE with identity normalisation'):
    tokenizer.hf_tokenizer(unigram)


@pytest.mark.parametrize('name', RUNS)
def test_export_import_export_round_trips_bit_for_bit(exported, name, tmp_path):
  path, out = exported(name)
  run = workdir.load(path)
  c = hf.import_config(tiny_config(str(tmp_path / 'run'), vocab_path='', hf_init_dir=out))
  kept = 'D H L N F KV tied rope_base norm_eps positions norm mlp qk_norm'.split()
  assert {k: c.model[k] for k in kept} == {k: run.config.model[k] for k in kept}
  params = hf.import_params(c, run.params)
  same = lambda a, b: a.dtype == b.dtype and np.array_equal(a, b)
  assert all(map(same, *(hf._flat(p).values() for p in (params, run.params))))
  tensors = safetensors_numpy.load_file(os.path.join(out, 'model.safetensors'))
  again = hf_families.to_hf(run.cfg, name, hf._flat(params))
  assert set(again) == set(tensors) and all(same(np.asarray(again[k]), tensors[k]) for k in again)


def losses_of(path: str) -> tuple[list[float], list[float]]:
  """The training losses and held-out losses of a run, in the order logged."""
  rows = metric_rows(path)
  return [r['loss'] for r in rows if 'loss' in r], [
    r['eval_loss'] for r in rows if 'eval_loss' in r
  ]


def test_a_run_started_from_an_export_trains_and_resumes(exported, tmp_path, capsys):
  source, out = exported('llama')
  path = str(tmp_path / 'run')
  # A constant learning rate: the first 3 steps are the same whether the run has 3 or 6.
  c = config(path, exported.data, {}, hf_init_dir=out, vocab_path='')  # its tokenizer too
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
  shutil.copytree(out, dest)
  with open(os.path.join(dest, 'config.json'), encoding='utf-8') as f:
    hf_config = json.load(f)
  with open(os.path.join(dest, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(hf_config | config_changes, f)
  if drop:
    os.remove(os.path.join(dest, drop))
  return dest


@pytest.mark.parametrize(
  'name, changes, drop, model, error',
  [
    ('gpt2', {'model_type': 'mistral'}, '', {}, r"holds a 'mistral' model; nanodo imports gpt2"),
    (
      'gpt2',
      {'n_inner': 128},
      '',
      {'F': 128},
      r'mlp.c_fc.bias is \[64\]; .* make it \[128\]',
    ),
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
  c = config(str(tmp_path / 'run'), exported.data, model, hf_init_dir=bad, vocab_path='')
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
  os.makedirs(c.workdir)
  workdir.write_config(c)
  with open(os.path.join(c.workdir, workdir.CONFIG), encoding='utf-8') as f:
    run_config = json.load(f)
  run_config['model'] |= model
  with open(os.path.join(c.workdir, workdir.CONFIG), 'w', encoding='utf-8') as f:
    json.dump(run_config, f)
  with pytest.raises(ValueError, match=error):
    hf.export(c.workdir, str(tmp_path / 'hf'))
  assert sorted(os.listdir(tmp_path)) == ['run']


def test_nanodo_export_of_a_sharded_run_on_the_command_line(exported, tmp_path):
  """Two devices: the parameters are gathered from both shards. About 15 s: two processes."""
  path, out = exported('llama')
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  cli = lambda dest: subprocess.run(
    [sys.executable, MAIN, 'export', f'--workdir={path}', f'--out={dest}'],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  os.makedirs(tmp_path / 'full')
  (tmp_path / 'full' / 'keep.txt').write_text('mine')
  bad = cli(tmp_path / 'full')
  assert bad.returncode != 0 and os.listdir(tmp_path / 'full') == ['keep.txt']
  assert bad.stderr.strip().splitlines() == [
    f"error: out='{tmp_path / 'full'}' exists and is not empty; give a new or empty directory."
  ]
  os.makedirs(tmp_path / 'empty')
  good = cli(tmp_path / 'empty')
  assert good.returncode == 0, good.stderr[-2000:]
  assert 'a llama model' in good.stdout
  assert sorted(os.listdir(tmp_path)) == ['empty', 'full']  # no temporary directory left
  for file in os.listdir(out):
    with open(os.path.join(out, file), 'rb') as a, open(tmp_path / 'empty' / file, 'rb') as b:
      assert a.read() == b.read(), file
