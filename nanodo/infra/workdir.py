"""A run on disk: the workdir's names, its lock and config; a refused start leaves no trace."""

import contextlib
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator

import jax
import ml_collections

from nanodo.configs import default
from nanodo.ground import files

# What a workdir holds (README, "What the default run does").
CHECKPOINTS, CONFIG, LOCK = 'checkpoints', 'config.json', 'lock'
METRICS, HPARAMS, WANDB_ID = 'metrics.jsonl', 'hparams.jsonl', 'wandb_run_id'
TOKENIZER, TOKEN_CACHE, COMPILE_CACHE = 'tokenizer.model', 'token_cache', 'compile_cache'
BUDGET = 'budget.json'  # train_minutes' step count (nanodo/infra/budget.py)
# A Hugging Face model's own files but its weights (its tokenizer.json, configs, chat template),
# kept by a run started from it (hf_init_dir) for its evaluation, sampling and export.
HF_FILES, TOKENIZER_JSON = 'hf_files', 'tokenizer.json'


def _entries(path: str) -> set[str]:
  """Every file and directory under path, relative to it."""
  entries = set()
  for d, dirs, names in os.walk(path):
    entries.update(os.path.relpath(os.path.join(d, n), path) for n in dirs + names)
  return entries


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


class Claim:
  """A workdir made (with its parents) and locked for a run; see claim."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    parent = files.existing_parent(self.workdir)
    # The outermost directory that the run makes for its workdir, if it makes one.
    self.made = os.path.join(parent, os.path.relpath(self.workdir, parent).split(os.sep)[0])
    self.before = _entries(workdir) if os.path.isdir(workdir) else None

  @contextlib.contextmanager
  def refusable(self) -> Iterator[None]:
    """Removes what the run wrote in the workdir if the block raises ValueError (a refused start).

    A new workdir goes, with the parents made for it; an existing one keeps what it held.
    """
    try:
      yield
    except ValueError:
      if jax.process_index() == 0:  # the other processes of a run write nothing there
        _remove_new(self.workdir, self.made, self.before)
      raise


def _lock(workdir: str) -> object:
  """The workdir's lock file, locked; ValueError naming its holder if another run has it."""
  f = open(os.path.join(workdir, LOCK), 'a+', encoding='utf-8')
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or 'another process'
    f.close()
    hint = 'wait for it to end or give another workdir'
    raise ValueError(
      f'workdir={workdir!r} is in use by another nanodo run ({holder}); {hint}.'
    ) from None
  f.truncate(0)
  f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
  f.flush()
  return f


@contextlib.contextmanager
def claim(workdir: str) -> Iterator[Claim]:
  """Makes workdir and holds an exclusive lock on it for the block.

  The OS drops the lock when the process ends, however it ends. Process 0 holds it for the
  run: the others of a run share its workdir.
  """
  held = Claim(workdir)
  with held.refusable():
    os.makedirs(workdir, exist_ok=True)
    lock = None if jax.process_index() else _lock(workdir)
  try:
    yield held
  finally:
    if lock is not None:
      lock.close()  # closing the file releases its lock


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


def with_defaults(saved: dict) -> dict:
  """A saved config with the keys added since it was written at their defaults: the behaviour
  before them."""
  d = default.get_config().to_dict()
  groups = {k: {**v, **saved.get(k, {})} for k, v in d.items() if isinstance(v, dict)}
  return {**d, **saved, **groups}


def write_config(c: ml_collections.ConfigDict) -> None:
  """Writes c to workdir/config.json whole: a crash leaves the old file or the new one."""
  files.write_text(os.path.join(c.workdir, CONFIG), c.to_json_best_effort(indent=2))


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of a trained run, its workdir set to where it is now."""
  if not os.path.isdir(workdir):
    raise ValueError(f'workdir={workdir!r} does not exist.')
  saved = read_config(workdir)
  if saved is None:
    raise ValueError(f'workdir={workdir!r} has no {CONFIG}: not a nanodo training directory.')
  return ml_collections.ConfigDict({**with_defaults(saved), 'workdir': workdir})


def cache_dir(cache_dir: str, workdir: str) -> str:
  """Where a run's token caches are: cache_dir, else the workdir's."""
  return cache_dir or os.path.join(workdir, TOKEN_CACHE)


def tokenizer_path(vocab_path: str, *dirs: str) -> str | None:
  """vocab_path; else the tokenizer of the first of dirs (workdir, restore dirs) holding one:
  its SentencePiece model, else its Hugging Face tokenizer.json."""
  if vocab_path:
    return vocab_path
  names = (TOKENIZER, os.path.join(HF_FILES, TOKENIZER_JSON), TOKENIZER_JSON)
  found = [os.path.join(d, name) for d in dirs if d for name in names]
  return next((p for p in found if os.path.exists(p)), None)


def no_room(e: OSError, directory: str) -> str | None:
  """The line of a write that found no room (a full disk, a quota, a size limit), naming the
  last complete checkpoint in directory; None for another error."""
  if e.errno not in files.NO_SPACE:
    return None
  steps = (
    sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []
  )
  kept = f'the last complete checkpoint is step {steps[-1]} in {directory}' if steps else ''
  kept = kept or f'{directory} holds no complete checkpoint yet'
  why = f'{e.filename or "a file"} could not be written (OSError: [Errno {e.errno}] '
  why += f'{os.strerror(e.errno)}); {kept}.'
  return f'{why} Free some space and run the same command to resume.'
