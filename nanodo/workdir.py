"""A run on disk: the workdir's layout, its lock, its config, its tokenizer, its trained model."""

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterable, Iterator

import jax
import ml_collections
import sentencepiece as spm
from flax import nnx
from jax.experimental import multihost_utils

from nanodo import checkpoint, sharding, tokenizer
from nanodo.configs import default
from nanodo.model import ModelConfig, TransformerDecoder
from nanodo.progress import log
from nanodo.tree import PyTree

# What a workdir holds (README, "What the default run does").
CHECKPOINTS, CONFIG, LOCK = 'checkpoints', 'config.json', 'lock'
METRICS, HPARAMS, WANDB_ID = 'metrics.jsonl', 'hparams.jsonl', 'wandb_run_id'
TOKENIZER, TOKEN_CACHE, COMPILE_CACHE = 'tokenizer.model', 'token_cache', 'compile_cache'
BUDGET = 'budget.json'  # train_minutes' step count (nanodo/budget.py)


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on workdir; the OS drops it when the process ends, however it ends.

  Process 0 holds it for the run: the others of a run share its workdir.
  """
  if jax.process_index():
    yield
    return
  with open(os.path.join(workdir, LOCK), 'a+', encoding='utf-8') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      hint = 'wait for it to end or give another workdir'
      raise ValueError(
        f'workdir={workdir!r} is in use by another nanodo run ({holder}); {hint}.'
      ) from None
    f.truncate(0)
    f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _entries(path: str) -> set[str]:
  """Every file and directory under path, relative to it."""
  entries = set()
  for d, dirs, files in os.walk(path):
    entries.update(os.path.relpath(os.path.join(d, n), path) for n in dirs + files)
  return entries


@contextlib.contextmanager
def undone_if_refused(workdir: str) -> Iterator[None]:
  """Removes what the block wrote in workdir if it raises ValueError (a refused start).

  A new workdir goes, with the parents made for it; an existing one keeps what it held.
  """
  made = os.path.abspath(workdir)  # the outermost directory that does not exist yet
  while not os.path.exists(os.path.dirname(made)):
    made = os.path.dirname(made)
  before = _entries(workdir) if os.path.isdir(workdir) else None
  try:
    yield
  except ValueError:
    if jax.process_index() == 0:  # the other processes of a run write nothing there
      _remove_new(workdir, made, before)
    raise


def _remove_new(workdir: str, made: str, before: set[str] | None) -> None:
  """Removes made if workdir did not exist before, else what is in workdir but not in before."""
  if before is None:
    shutil.rmtree(made, ignore_errors=True)
    return
  new = _entries(workdir) - before
  for path in (os.path.join(workdir, p) for p in new if os.path.dirname(p) not in new):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)


def read_config(workdir: str) -> dict | None:
  """The config a run in workdir was started with, as a nested dict; None if there is none."""
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    what = 'it records the config of the run in this workdir: restore it, or give another workdir'
    raise ValueError(f'{path} is unreadable ({e}); {what}.') from None


def write_config(c: ml_collections.ConfigDict) -> None:
  """Writes c to workdir/config.json atomically: a crash leaves the old file or the new one."""
  path = os.path.join(c.workdir, CONFIG)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(c.to_json_best_effort(indent=2))
  os.replace(path + '.tmp', path)


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of a trained run, its workdir set to where it is now."""
  if not os.path.isdir(workdir):
    raise ValueError(f'workdir={workdir!r} does not exist.')
  saved = read_config(workdir)
  if saved is None:
    raise ValueError(f'workdir={workdir!r} has no {CONFIG}: not a nanodo training directory.')
  # Keys added since the run was made take their defaults: the behaviour before them.
  d = default.get_config().to_dict()
  groups = {k: {**v, **saved.get(k, {})} for k, v in d.items() if isinstance(v, dict)}
  return ml_collections.ConfigDict({**d, **saved, **groups, 'workdir': workdir})


def cache_dir(c: ml_collections.ConfigDict) -> str:
  """Where the token caches of the run c are: cache_dir, else the workdir's."""
  return c.cache_dir or os.path.join(c.workdir, TOKEN_CACHE)


def tokenizer_path(c: ml_collections.ConfigDict) -> str | None:
  """vocab_path; else the workdir's (or restore or init dir's) tokenizer; None if none yet."""
  if c.vocab_path:
    return c.vocab_path
  for d in (c.workdir, c.checkpoint_restore_dir, c.hf_init_dir):
    if d and os.path.exists(os.path.join(d, TOKENIZER)):
      return os.path.join(d, TOKENIZER)
  return None


def get_tokenizer(
  c: ml_collections.ConfigDict, train_docs: Iterable[str]
) -> spm.SentencePieceProcessor:
  """The tokenizer of tokenizer_path; else one trained on train_docs into the workdir.

  Process 0 trains it; the other processes wait for it, then load it.
  """
  if not tokenizer_path(c) and jax.process_index() == 0:
    log(f'Training a {c.vocab_size}-piece SentencePiece tokenizer on {c.ds_name}...')
    tokenizer.train(train_docs, c.vocab_size, os.path.join(c.workdir, TOKENIZER))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('tokenizer saved')
  path = tokenizer_path(c)
  sp = tokenizer.load(path)
  if not c.vocab_path and sp.vocab_size() != c.vocab_size:
    held = f'{os.path.dirname(path)} holds a tokenizer of {sp.vocab_size()} pieces'
    fix = f'set vocab_size={sp.vocab_size()}'
    raise ValueError(f'vocab_size={c.vocab_size} is not valid: {held}; {fix}.')
  return sp


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run's checkpoint: model config, graph, parameters, tokenizer, step, run config."""

  cfg: ModelConfig
  graphdef: nnx.GraphDef
  params: PyTree
  sp: spm.SentencePieceProcessor
  step: int
  config: ml_collections.ConfigDict


def load(workdir: str, step: int | None = None) -> Run:
  """The parameters of a checkpoint (default: the latest) on a mesh of every device."""
  c = run_config(workdir)
  mngr = checkpoint.manager(os.path.join(workdir, CHECKPOINTS))
  try:
    steps = sorted(mngr.all_steps()) if os.path.isdir(mngr.directory) else []
    if not steps:
      raise ValueError(f'workdir={workdir!r} has no checkpoint yet; train first.')
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ValueError(f'step={step} has no checkpoint in {workdir!r}; saved steps: {steps}.')
    if tokenizer_path(c) is None:
      raise ValueError(f'workdir={workdir!r} has neither {TOKENIZER} nor a vocab_path.')
    sp = tokenizer.load(tokenizer_path(c))
    cfg = ModelConfig(V=sp.vocab_size(), **c.model)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TransformerDecoder(cfg, nnx.Rngs(0))))
    mesh = sharding.make_mesh(1, jax.device_count())
    params = checkpoint.restore_params(
      mngr, step, abstract, sharding.state_shardings(abstract, mesh)
    )
  finally:
    mngr.close()
  return Run(cfg, graphdef, params, sp, step, c)
