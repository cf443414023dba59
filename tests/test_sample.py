"""Generation: the KV cache equals the full forward; sampling rules; checkpoints; the CLI."""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import HUB_OPTIONS, tiny_config, tiny_model_config
from flax import nnx

from nanodo import train
from nanodo.ground.tree import path_str
from nanodo.model import TransformerDecoder
from nanodo.tools import sample
from nanodo.tools.sample import init_cache
from nanodo.tools.trained import load as load_run

GREEDY = sample.Sampling(temperature=0.0)
NO_EOS = -1


def _model(seed=0, **options):
  cfg = tiny_model_config(**options)
  return cfg, TransformerDecoder(cfg, nnx.Rngs(seed))


def _generate(
  model,
  prompt_BxP,
  length_B,
  max_new_tokens=10,
  sampling=GREEDY,
  eos_id=NO_EOS,
  seed=0,
  on_token=None,
):
  graphdef, params = nnx.split(model)
  out_BxN = sample.generate(
    graphdef,
    params,
    jnp.asarray(prompt_BxP),
    jnp.asarray(length_B),
    sample.row_keys(seed, len(length_B)),
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    eos_id=eos_id,
    on_token=on_token,
  )
  return np.asarray(out_BxN)


def _prompts(cfg, B=2, P=4):
  return np.asarray(jax.random.randint(jax.random.key(1), (B, P), 4, cfg.V)), np.full(B, P)


@jax.jit
def _forward(model, x_BxL):
  return model(x_BxL)


@jax.jit
def _decode(model, x_BxL, pos_BxL, cache):
  return model.decode(x_BxL, pos_BxL, cache)


# mfp at 4x its base width: the blocks' and the logits' multipliers, attention as 1/K.
MFP = {'parameterization': 'mfp', 'base_width': 16, 'D': 64}


@pytest.mark.parametrize('options', [{}, HUB_OPTIONS, MFP])
def test_cached_decoding_gives_the_full_forward_logits_at_every_position(options):
  cfg, model = _model(**options)
  graphdef, params = nnx.split(model)
  bias = lambda path: path_str(path).split('/')[-1].startswith('b')
  shifted = jax.tree_util.tree_map_with_path(lambda k, p: p + 0.1 * bias(k), params)
  model = nnx.merge(graphdef, shifted)  # biases away from their zeros
  x_BxL = jax.random.randint(jax.random.key(1), (2, cfg.L), 0, cfg.V)
  P = 5
  logits, cache = _decode(
    model, x_BxL[:, :P], jnp.broadcast_to(jnp.arange(P), (2, P)), init_cache(cfg, 2)
  )
  steps = [logits]
  for t in range(P, cfg.L):
    logits, cache = _decode(model, x_BxL[:, t : t + 1], jnp.full((2, 1), t), cache)
    steps.append(logits)
  np.testing.assert_allclose(
    jnp.concatenate(steps, 1), _forward(model, x_BxL), rtol=1e-5, atol=1e-5
  )


def test_greedy_equals_a_naive_loop_without_cache():
  cfg, model = _model()
  prompt_BxP, length_B = _prompts(cfg)
  # Rows of length L, filled as they grow: causality makes the padding after t irrelevant.
  x_BxL = jnp.zeros((2, cfg.L), jnp.int32).at[:, :4].set(prompt_BxP)
  for t in range(4, 14):
    x_BxL = x_BxL.at[:, t].set(jnp.argmax(_forward(model, x_BxL)[:, t - 1], axis=-1))
  np.testing.assert_array_equal(_generate(model, prompt_BxP, length_B), x_BxL[:, 4:14])


def test_top_k_1_and_a_tiny_top_p_are_greedy():
  cfg, model = _model()
  prompt_BxP, length_B = _prompts(cfg)
  greedy = _generate(model, prompt_BxP, length_B)
  for sampling in (sample.Sampling(2.0, top_k=1), sample.Sampling(2.0, top_p=1e-6)):
    np.testing.assert_array_equal(_generate(model, prompt_BxP, length_B, sampling=sampling), greedy)
  assert not np.array_equal(
    _generate(model, prompt_BxP, length_B, sampling=sample.Sampling(2.0)), greedy
  )


class _Steps:
  """An on_token callback that records the steps it sees."""

  def __init__(self):
    self.steps = []

  def __call__(self, step, token_B):
    self.steps.append(int(step))


def test_eos_ends_a_row_and_the_loop_ends_when_every_row_has():
  cfg, model = _model()
  prompt_BxP, length_B = _prompts(cfg, B=1)
  greedy = _generate(model, prompt_BxP, length_B)[0]
  eos = int(greedy[3])
  end = list(greedy).index(eos) + 1
  recorder = _Steps()
  out = _generate(model, prompt_BxP, length_B, eos_id=eos, on_token=recorder)[0]
  np.testing.assert_array_equal(out[:end], greedy[:end])
  assert (out[end:] == sample.NO_TOKEN).all()
  assert sorted(recorder.steps) == list(range(end))


def test_batched_prompts_of_different_lengths_equal_one_at_a_time():
  cfg, model = _model()
  lengths = [3, 7]
  prompt_BxP = np.zeros((2, 7), np.int32)
  for b, n in enumerate(lengths):
    prompt_BxP[b, :n] = jax.random.randint(jax.random.key(b), (n,), 4, cfg.V)
  sampling = sample.Sampling(1.0)
  batched = _generate(model, prompt_BxP, lengths, sampling=sampling, seed=3)
  keys_B = sample.row_keys(3, 2)
  graphdef, params = nnx.split(model)
  for b, n in enumerate(lengths):
    alone = sample.generate(
      graphdef,
      params,
      prompt_BxP[b : b + 1, :n],
      np.asarray([n]),
      keys_B[b : b + 1],
      max_new_tokens=10,
      sampling=sampling,
      eos_id=NO_EOS,
    )
    np.testing.assert_array_equal(batched[b], alone[0])
  assert not np.array_equal(batched[0], batched[1])


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp('sample') / 'run')
  c = tiny_config(workdir, checkpoint_every_steps=1)
  c.opt.update(num_train_steps=2, warmup_steps=1)
  train.train_and_evaluate(c)
  return workdir


def test_load_restores_the_trained_parameters_of_a_step(trained):
  with open(os.path.join(trained, 'metrics.jsonl'), encoding='utf-8') as f:
    param_norm = {r['step']: r['param_norm'] for r in map(json.loads, f) if 'param_norm' in r}
  for step in (1, None):
    model = load_run(trained, step)
    assert model.step == (step or 2)
    norm = float(optax.tree.norm(model.params))
    assert norm == pytest.approx(param_norm[model.step], rel=1e-5)


def test_streamed_text_is_the_returned_text(trained):
  model = load_run(trained)
  out = io.StringIO()
  kwargs = {'max_new_tokens': 12, 'sampling': sample.Sampling(1.0, top_k=50), 'num_samples': 2}
  texts = sample.sample(model, ['ROMEO:', 'O'], **kwargs, printer=sample.Printer(model.sp, out))
  assert texts == sample.sample(model, ['ROMEO:', 'O'], **kwargs)
  shown = [s.split('\n', 1)[1] for s in out.getvalue().split('--- sample ')[1:]]
  assert shown == [p + t + '\n' for p, t in zip(['ROMEO:'] * 2 + ['O'] * 2, texts, strict=True)]
  room = model.cfg.L - 1 - len(model.sp.encode('ROMEO:'))
  assert len(sample.sample(model, ['ROMEO:'], max_new_tokens=room, sampling=GREEDY)) == 1
  with pytest.raises(ValueError, match=f'exceed the context L=32.*at most {room} new tokens'):
    sample.sample(model, ['ROMEO:'], max_new_tokens=room + 1, sampling=GREEDY)


def _cli(*args: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, os.path.join(os.path.dirname(train.__file__), 'main.py'), 'sample', *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_command_line_prints_the_greedy_sample(trained):
  out = _cli(f'--workdir={trained}', '--prompt=ROMEO:', '--max_new_tokens=8', '--temperature=0')
  assert out.returncode == 0, out.stderr[-2000:]
  text = sample.sample(load_run(trained), ['ROMEO:'], max_new_tokens=8, sampling=GREEDY)[0]
  assert out.stdout == f'ROMEO:{text}\n'
  # Progress goes to stderr, plain off a terminal: the sample's count of new tokens.
  assert re.search(r'^sample 1/1 \| tokens [1-8] \| elapsed ', out.stderr, re.M), out.stderr


def test_command_line_bad_input_fails_with_one_clear_line(trained, tmp_path):
  no_checkpoint = tmp_path / 'empty'
  no_checkpoint.mkdir()
  shutil.copy(os.path.join(trained, 'config.json'), no_checkpoint)
  w = f'--workdir={trained}'
  for args, message in [
    ([f'--workdir={tmp_path / "none"}', '--prompt=a'], 'does not exist'),
    ([f'--workdir={no_checkpoint}', '--prompt=a'], 'has no checkpoint yet'),
    ([w, '--prompt=a', '--step=5'], 'step=5 has no checkpoint in'),
    ([w, '--prompt='], 'The prompt is empty'),
    ([w, '--prompt=' + 'To be, or not to be ' * 8], 'longer than the context L=32'),
    ([w, '--prompt=a', '--temperature=-0.5'], 'temperature=-0.5 is not valid'),
    ([w, '--prompt=a', '--top_p=1.5'], 'top_p=1.5 is not valid: must be in (0, 1]'),
  ]:
    out = _cli(*args)
    assert out.returncode != 0, args
    assert message in out.stderr, (args, out.stderr[-2000:])
    assert 'Traceback' not in out.stderr
