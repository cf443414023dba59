"""Shared test helpers: a tiny config, the shipped tokenizer, the command line, finished runs."""

import fcntl
import functools
import json
import os
import pathlib
import socket
import subprocess
import sys
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import pytest

from nanodo import sharding, step, train
from nanodo.configs import default
from nanodo.corpora import builtin
from nanodo.data import Tokens
from nanodo.model import ModelConfig
from nanodo.tools import hf_export

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')
VOCAB = os.path.join(TESTDATA, 'shakespeare_1024.model')
MAIN = os.path.join(os.path.dirname(train.__file__), 'main.py')
CONFIG = os.path.join(os.path.dirname(train.__file__), 'configs', 'default.py')


# Biases, heads wider than D / H, Llama 3's RoPE scaling: what the hub's families need.
HUB_OPTIONS = {'bias': 'all', 'K': 24, 'positions': 'rope', 'rope_scaling': 'llama3:4,1,4,8'}


def tiny_model_config(**overrides) -> ModelConfig:
  """A model small enough to compile and run in a second; the other keys as configs/default.py."""
  tiny = {'D': 32, 'H': 2, 'L': 16, 'N': 2, 'V': 97, 'F': 64}
  return ModelConfig(**{**default.get_config().model, **tiny, **overrides})


def tiny_steps(
  cfg: ModelConfig, c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> step.Steps:
  """The state and steps of the model cfg under the run config c, on every device by default."""
  mesh = mesh or sharding.make_mesh(1, -1)
  return step.build_steps(cfg, step.StepConfig.of(c), c.opt, c.seed, mesh)


def tiny_config(workdir: str, **overrides) -> ml_collections.ConfigDict:
  """The default config shrunk to a few seconds of training."""
  c = default.get_config()
  c.workdir = workdir
  c.vocab_path = VOCAB
  c.batch_size = 4
  c.eval_batch_size = 8
  c.model.update(D=32, H=2, L=32, N=2, F=64)
  c.opt.update(num_train_steps=6, warmup_steps=2)
  c.log_every_steps = 1
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 3
  c.peak_tflops = 1.0  # for the MFU; 0 would measure a matmul at every start
  c.update(overrides)
  return c


def tokens_of(docs: list[np.ndarray]) -> Tokens:
  """A split's tokens held in memory, as the token cache would give them."""
  offsets = np.cumsum([0, *map(len, docs)])
  return Tokens(np.concatenate(docs).astype(np.uint16), offsets, num_bytes=0)


def free_port() -> int:
  """A localhost port no one listens on, for a jax.distributed coordinator."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def finish(*procs: subprocess.Popen) -> list[str]:
  """The stdout of each process, once all have exited 0 (else their stderr's end)."""
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outs]


def cli(*args: str, cwd: str) -> subprocess.CompletedProcess:
  """main.py with the default config and args, run from cwd; its output captured."""
  cmd = [sys.executable, MAIN, f'--config={CONFIG}', *args]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture
def workdir(tmp_path) -> str:
  return str(tmp_path / 'run')


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory) -> str:
  """A finished 6-step run: checkpoints at 3 and 6, per-layer statistics, steps 2-3 profiled."""
  workdir = str(tmp_path_factory.mktemp('tiny') / 'run')
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(sys.modules, 'wandb', None)  # `import wandb` fails: W&B is off by default.
    train.train_and_evaluate(tiny_config(workdir, profile_steps=2, log_internal_metrics=True))
  return workdir


# A command-line run of NUM_STEPS steps, for test_reliability and test_pickle.
NUM_STEPS = 12
# Runs main.py with an audit hook that reports every class or function a pickle would load:
# the only way unpickling runs code. Loading checkpoints, caches or anything else must not.
# The one exception is in memory: tensorboardX hands its own events to its writer thread through
# a multiprocessing.Queue, which pickles them; its files on disk are protobuf records.
NO_UNPICKLING = """
import os, runpy, sys
def hook(event, args):
  if event != 'pickle.find_class':
    return
  frame = sys._getframe(1)
  while frame and not frame.f_code.co_filename.endswith('tensorboardX/event_file_writer.py'):
    frame = frame.f_back
  if frame is None:
    os.write(2, b'UNPICKLED %r\\n' % (args,))
sys.addaudithook(hook)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def guarded_command(workdir: str, num_steps: int = NUM_STEPS, **overrides) -> list[str]:
  """A tiny model's training command, under NO_UNPICKLING; a checkpoint every 2 steps."""
  # A constant learning rate: the losses of the first steps do not depend on num_steps.
  flags = {
    'workdir': workdir,
    'vocab_path': VOCAB,
    'batch_size': 2,
    'eval_batch_size': 64,
    'model.D': 32,
    'model.H': 2,
    'model.N': 1,
    'model.F': 64,
    'model.L': 32,
    'opt.num_train_steps': num_steps,
    'opt.warmup_steps': 0,
    'opt.decay_type': 'constant',
    'checkpoint_every_steps': 2,
    'log_every_steps': 100,
    'eval_every_steps': 1000,
    'peak_tflops': 1.0,
    **overrides,
  }
  return [
    sys.executable,
    '-c',
    NO_UNPICKLING,
    MAIN,
    f'--config={CONFIG}',
    *(f'--config.{k}={v}' for k, v in flags.items()),
  ]


def run_guarded(
  workdir: str, num_steps: int = NUM_STEPS, **overrides
) -> subprocess.CompletedProcess:
  command = guarded_command(workdir, num_steps, **overrides)
  out = subprocess.run(command, capture_output=True, text=True, timeout=900)
  assert 'UNPICKLED' not in out.stderr, out.stderr
  return out


def metric_rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  return [json.loads(line) for line in lines if line.endswith('\n')]


def step_losses(workdir: str) -> list[tuple[int, float]]:
  """(step, loss) of every train row, in the order written."""
  return [(r['step'], r['loss']) for r in metric_rows(workdir) if 'loss' in r]


@pytest.fixture(scope='session')
def reference(tmp_path_factory) -> tuple[str, list[tuple[int, float]]]:
  """An uninterrupted guarded run: its workdir and its per-step losses (built once: costly)."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  out = run_guarded(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  losses = step_losses(workdir)
  assert [s for s, _ in losses] == list(range(1, NUM_STEPS + 1))
  return workdir, losses


@functools.cache
def _first_play() -> str:
  return builtin.shakespeare()[0][0]


# For the Hugging Face tests (test_hf*.py), a run of each family: Llama with shared key/value
# heads, an untied head, another epsilon and RoPE base; Qwen3 trained in bfloat16 (its float32
# weights are exported).
_ROPE = {'positions': 'rope', 'norm': 'rmsnorm', 'mlp': 'swiglu'}
HF_RUNS = {
  'gpt2': {},
  'llama': {**_ROPE, 'KV': 1, 'tied': False, 'norm_eps': 1e-5, 'rope_base': 500.0},
  'qwen3': {**_ROPE, 'qk_norm': True, 'dtype': 'bfloat16'},
  # Biased q, k and v, heads wider than D / H, Llama 3's RoPE scaling (beyond 8 positions).
  'qwen2': {**_ROPE, 'bias': 'qkv', 'K': 24, 'rope_scaling': 'llama3:4,1,4,32'},
}


def text_config(path: str, model: dict, **overrides) -> ml_collections.ConfigDict:
  """tiny_config with these model keys and overrides, on two short texts beside path (fast)."""
  files, play = {'train_split': f'{path}.train', 'eval_split': f'{path}.eval'}, _first_play()
  for file, text in zip(files.values(), (play[:100_000], play[100_000:105_000]), strict=True):
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
def hf_exports(tmp_path_factory):
  """family -> (a tiny trained run of it, its export), made once for all pytest-xdist workers."""
  shared = tmp_path_factory.getbasetemp()
  shared = shared.parent if os.environ.get('PYTEST_XDIST_WORKER') else shared  # the session's

  def make(directory: pathlib.Path, name: str) -> None:
    train.train_and_evaluate(text_config(str(directory / 'run'), HF_RUNS[name]))
    assert hf_export.export(str(directory / 'run'), str(directory / 'hf')) == name

  def get(name: str) -> tuple[str, str]:
    directory = once(shared / f'hf_{name}', lambda d: make(d, name))
    return str(directory / 'run'), str(directory / 'hf')

  return get
