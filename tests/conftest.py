"""Shared test helpers: a tiny config, the shipped tokenizer, a finished run, the command line."""

import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from nanodo import train
from nanodo.configs import default
from nanodo.model import ModelConfig
from nanodo.token_cache import Tokens

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')
VOCAB = os.path.join(TESTDATA, 'shakespeare_1024.model')
MAIN = os.path.join(os.path.dirname(train.__file__), 'main.py')
CONFIG = os.path.join(os.path.dirname(train.__file__), 'configs', 'default.py')


def tiny_model_config(**overrides) -> ModelConfig:
  """A model small enough to compile and run in a second; the other keys as configs/default.py."""
  tiny = {'D': 32, 'H': 2, 'L': 16, 'N': 2, 'V': 97, 'F': 64}
  return ModelConfig(**{**default.get_config().model, **tiny, **overrides})


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
