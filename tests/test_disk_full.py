"""A checkpoint that cannot be written: named in one line, the ones before it kept, then resumed."""

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import (
  NUM_STEPS,
  guarded_command,
  metric_rows,
  run_guarded,
  step_losses,
  tiny_config,
  tiny_steps,
  tokens_of,
)
from etils import epath

from nanodo import data, step, train
from nanodo.infra import checkpoint
from nanodo.model import ModelConfig

TMP = '.orbax-checkpoint-tmp'  # Orbax writes a checkpoint under this suffix, then renames it


def _no_space(monkeypatch, marker: str) -> None:
  """Orbax's file writes whose path holds marker fail as on a full disk (ENOSPC)."""
  write_text = epath.gpath.PosixGPath.write_text

  def full(path, *args, **kwargs):
    if marker in str(path):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write_text(path, *args, **kwargs)

  monkeypatch.setattr(epath.gpath.PosixGPath, 'write_text', full)


def _contents(directory: str) -> dict[str, str]:
  """Every file under directory: its path and a hash of its bytes."""
  files = {}
  for d, _, names in os.walk(directory):
    for n in names:
      with open(os.path.join(d, n), 'rb') as f:
        files[os.path.relpath(os.path.join(d, n), directory)] = hashlib.sha256(f.read()).hexdigest()
  return files


@functools.cache
def _setup() -> step.Steps:
  """A tiny model's initial state and shardings, built once."""
  c = tiny_config('/unused')
  return tiny_steps(ModelConfig(V=97, **c.model), c)


def _complete(directory: str) -> list[str]:
  return sorted(n for n in os.listdir(directory) if TMP not in n)


def _no_space_line(step: int, last: int, directory: str, why: str) -> str:
  kept = f'the last complete checkpoint is step {last} in {directory}'
  resume = 'Free some space and run the same command to resume.'
  return f'checkpoint {step} could not be written (OSError: {why}); {kept}. {resume}'


# The files of save 6 that cannot be written: all of them ('': the save fails as it starts), or
# its metadata only, written in the background (the failure comes out at the next save or close).
@pytest.mark.parametrize(
  'failing, then',
  [('', 'save'), ('_CHECKPOINT_METADATA', 'save'), ('_CHECKPOINT_METADATA', 'close')],
)
def test_a_failed_save_is_named_with_the_last_complete_checkpoint_which_stays(
  tmp_path, monkeypatch, failing, then
):
  directory = str(tmp_path / 'checkpoints')
  run = _setup()
  data_iter = iter(data.train_dataset(tokens_of([np.arange(4000) % 90 + 4]), 32, 4, 0, 'packed'))
  with pytest.raises(checkpoint.SaveError) as e:
    # max_to_keep=1: a save that went on after the failure would delete checkpoint 3.
    with checkpoint.opened(directory, max_to_keep=1) as mngr:
      checkpoint.save(mngr, 3, run.state, data_iter)
      checkpoint.wait(mngr)
      kept = _contents(os.path.join(directory, '3'))
      _no_space(monkeypatch, os.path.join(f'6{TMP}', failing))
      checkpoint.save(mngr, 6, jax.tree.map(lambda x: x + 1, run.state), data_iter)
      if then == 'save':
        checkpoint.save(mngr, 9, run.state, data_iter)
  why = '[Errno 28] No space left on device'
  assert str(e.value) == _no_space_line(6, 3, directory, why)
  monkeypatch.undo()
  assert _complete(directory) == ['3'] and _contents(os.path.join(directory, '3')) == kept
  with contextlib.closing(checkpoint.manager(directory)) as mngr:
    restored = checkpoint.restore(mngr, run.state, run.shardings, data_iter)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, restored, run.state)))  # saved as 3


def test_a_failed_last_save_ends_the_run_with_its_error_and_the_next_run_redoes_it(
  tmp_path, monkeypatch
):
  """Two training runs in this process: 20 to 50 s on 2 cores."""
  workdir = str(tmp_path / 'run')
  c = tiny_config(workdir)  # checkpoints at 3 and 6, the last step
  # Only the last save's metadata cannot be written. Written in the background, its failure
  # comes out as the run closes, after the final evaluation.
  _no_space(monkeypatch, os.path.join(f'6{TMP}', '_CHECKPOINT_METADATA'))
  with pytest.raises(Exception, match=r'^checkpoint 6 could not be written \(OSError: \[Errno 28'):
    train.train_and_evaluate(c)
  monkeypatch.undo()
  unbroken = step_losses(workdir)
  assert [s for s, _ in unbroken] == list(range(1, 7))
  assert _complete(os.path.join(workdir, 'checkpoints')) == ['3']
  assert train.train_and_evaluate(c)['bits_per_byte'] > 0
  assert step_losses(workdir) == unbroken  # steps 4-6 once more, with the same losses
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']


# Runs argv with files that stop growing past 64 KiB, as on a full disk: a write past it fails
# with EFBIG (SIGXFSZ ignored). The other files of the run stay under it; a checkpoint's arrays
# do not.
SIZE_LIMIT = 1 << 16
SMALL_FILES_ONLY = f"""
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, ({SIZE_LIMIT}, limit))
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def _stopped_at(reference_dir: str, workdir: str, stopped: int) -> str:
  """A copy of the reference's workdir as if its run had stopped after checkpoint `stopped`;
  returns its checkpoint directory."""
  shutil.copytree(reference_dir, workdir)
  checkpoints = os.path.join(workdir, 'checkpoints')
  for name in _complete(checkpoints):
    if int(name) > stopped:
      shutil.rmtree(os.path.join(checkpoints, name))
  return checkpoints


def test_a_full_disk_stops_the_command_in_one_line_and_the_same_command_resumes(
  reference, tmp_path
):
  """Two runs of the command line after the reference run: 20 s to over a minute on 2 cores."""
  reference_dir, expected = reference
  workdir, stopped = str(tmp_path / 'run'), NUM_STEPS - 4
  checkpoints = _stopped_at(reference_dir, workdir, stopped)
  rows = [r for r in metric_rows(workdir) if r['step'] <= stopped]
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  kept = _contents(os.path.join(checkpoints, str(stopped)))
  # Its command, on a disk without room for a checkpoint's arrays (TensorStore writes them).
  command = guarded_command(workdir, NUM_STEPS, max_to_keep=1)
  command = [sys.executable, '-c', SMALL_FILES_ONLY, *command[1:]]
  # JAX's compile cache warns of an entry it cannot write and goes on: it writes none here.
  quiet_cache = {**os.environ, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '1e9'}
  full = subprocess.run(command, capture_output=True, text=True, timeout=900, env=quiet_cache)
  assert full.returncode == 1, full.stderr[-3000:]
  why = re.escape(f'[Errno {errno.EFBIG}] {os.strerror(errno.EFBIG)}')
  line = re.escape(_no_space_line(stopped + 2, stopped, checkpoints, 'WHY')).replace('WHY', why)
  assert re.fullmatch(f'error: {line}\n', full.stderr), full.stderr[-3000:]
  # max_to_keep=1: had the failed save gone on, it would have deleted checkpoint `stopped`.
  assert _complete(checkpoints) == [str(stopped)]
  assert _contents(os.path.join(checkpoints, str(stopped))) == kept
  out = run_guarded(workdir, NUM_STEPS, max_to_keep=1)  # with room again
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'starting at step {stopped} of {NUM_STEPS}.' in out.stdout
  assert step_losses(workdir) == expected  # each step once, as in an unbroken run
  assert os.listdir(checkpoints) == [str(NUM_STEPS)]  # the failed save's files removed


def test_a_full_disk_while_metrics_are_written_ends_in_one_line_and_the_same_command_resumes(
  reference, tmp_path
):
  """metrics.jsonl a row short of the size limit: the next row finds no room, before a save."""
  reference_dir, expected = reference
  workdir, stopped = str(tmp_path / 'run'), NUM_STEPS - 4
  checkpoints = _stopped_at(reference_dir, workdir, stopped)
  rows = [json.dumps(r) + '\n' for r in metric_rows(workdir) if r['step'] <= stopped]
  padding = [rows[0]] * ((SIZE_LIMIT - 100 - len(''.join(rows))) // len(rows[0]))
  metrics = os.path.join(workdir, 'metrics.jsonl')
  with open(metrics, 'w', encoding='utf-8') as f:
    f.writelines(padding + rows)  # rows of steps up to `stopped`: a resume keeps them all
  command = [sys.executable, '-c', SMALL_FILES_ONLY, *guarded_command(workdir, NUM_STEPS)[1:]]
  quiet_cache = {**os.environ, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '1e9'}
  full = subprocess.run(command, capture_output=True, text=True, timeout=900, env=quiet_cache)
  why = f'[Errno {errno.EFBIG}] {os.strerror(errno.EFBIG)}'
  kept = f'the last complete checkpoint is step {stopped} in {checkpoints}'
  line = f'{metrics} could not be written (OSError: {why}); {kept}. Free some space and run the '
  assert full.stderr == f'error: {line}same command to resume.\n', full.stderr[-3000:]
  assert full.returncode == 1 and _complete(checkpoints) == [str(stopped)]
  with open(metrics, encoding='utf-8') as f:
    lines = f.readlines()
  assert lines[: len(padding + rows)] == padding + rows  # a torn row at most after them
  out = run_guarded(workdir, NUM_STEPS)  # with room again
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'starting at step {stopped} of {NUM_STEPS}.' in out.stdout
  assert step_losses(workdir)[len(padding) :] == expected  # each step once, as unbroken
