"""Faults end to end: real processes killed, stopped and restarted with the same command."""

import json
import os
import pickle
import pickletools
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import VOCAB

from nanodo import train

NUM_STEPS = 12
MAIN = os.path.join(os.path.dirname(train.__file__), 'main.py')
CONFIG = os.path.join(os.path.dirname(train.__file__), 'configs', 'default.py')
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


def _command(workdir: str, num_steps: int = NUM_STEPS) -> list[str]:
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
  }
  return [
    sys.executable,
    '-c',
    NO_UNPICKLING,
    MAIN,
    f'--config={CONFIG}',
    *(f'--config.{k}={v}' for k, v in flags.items()),
  ]


def _run(workdir: str, num_steps: int = NUM_STEPS) -> subprocess.CompletedProcess:
  out = subprocess.run(_command(workdir, num_steps), capture_output=True, text=True, timeout=900)
  assert 'UNPICKLED' not in out.stderr, out.stderr
  return out


def _default_sigint() -> None:
  signal.signal(signal.SIGINT, signal.SIG_DFL)  # as from a terminal, even if pytest ignores it


def _start(workdir: str) -> subprocess.Popen:
  return subprocess.Popen(
    _command(workdir),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    preexec_fn=_default_sigint,
  )


def _rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  return [json.loads(line) for line in lines if line.endswith('\n')]


def _losses(workdir: str) -> list[tuple[int, float]]:
  """(step, loss) of every train row, in the order written."""
  return [(r['step'], r['loss']) for r in _rows(workdir) if 'loss' in r]


def _wait_until(p: subprocess.Popen, ready, timeout: float = 600) -> None:
  deadline = time.time() + timeout
  while not ready():
    assert p.poll() is None, p.communicate()
    assert time.time() < deadline, 'timed out'
    time.sleep(0.002)


def _tmp_checkpoints(workdir: str) -> list[str]:
  directory = os.path.join(workdir, 'checkpoints')
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return [n for n in names if 'orbax-checkpoint-tmp' in n]


@pytest.fixture(scope='module')
def reference(tmp_path_factory) -> tuple[str, list[tuple[int, float]]]:
  """An uninterrupted run: its workdir and its per-step losses."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  out = _run(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  losses = _losses(workdir)
  assert [s for s, _ in losses] == list(range(1, NUM_STEPS + 1))
  return workdir, losses


def _new_workdir(reference_dir: str, tmp_path) -> str:
  """An empty workdir holding only the reference's compiled steps, so restarts are quick."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(
    os.path.join(reference_dir, 'compile_cache'), os.path.join(workdir, 'compile_cache')
  )
  return workdir


def _kill(workdir: str, ready, delay: float = 0.0) -> None:
  """Starts the run, SIGKILLs it delay seconds after ready() holds."""
  p = _start(workdir)
  _wait_until(p, ready)
  time.sleep(delay)
  p.kill()
  p.communicate()


def _kill_at_random_moments(workdir: str, rng: random.Random, kills: int) -> list[str]:
  """SIGKILLs the run that many times, each after a random step plus a random delay."""
  moments = []
  for _ in range(kills):
    logged = max((r['step'] for r in _rows(workdir)), default=0)
    after_step, delay = rng.randint(logged + 1, NUM_STEPS - 2), rng.uniform(0, 0.5)
    _kill(workdir, lambda s=after_step: any(r['step'] >= s for r in _rows(workdir)), delay)
    moments.append(f'{delay:.3f} s after step {after_step}')
  return moments


def test_sigkill_at_random_moments_changes_no_loss(reference, tmp_path):
  reference_dir, expected = reference
  workdir = _new_workdir(reference_dir, tmp_path)
  # While an asynchronous checkpoint (of step 4 or later) is being written.
  _kill(workdir, lambda: any(int(n.split('.')[0]) >= 4 for n in _tmp_checkpoints(workdir)))
  assert _tmp_checkpoints(workdir), 'the kill came after the save had finished'
  moments = _kill_at_random_moments(workdir, random.Random(0), kills=1)
  out = _run(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  # Each step once, with bit-identical float32 losses.
  assert _losses(workdir) == expected, moments
  assert not _tmp_checkpoints(workdir)  # the unfinished save was cleaned up


@pytest.mark.slow
def test_sigkill_at_many_random_moments_changes_no_loss(reference, tmp_path):
  reference_dir, expected = reference
  workdir = _new_workdir(reference_dir, tmp_path)
  rng = random.Random(1)
  moments = []
  for _ in range(3):  # anywhere in the start-up: imports, data, restore, compile
    delay = rng.uniform(0, 8)
    _kill(workdir, lambda: True, delay)
    moments.append(f'{delay:.3f} s after the start')
  moments += _kill_at_random_moments(workdir, rng, kills=5)
  out = _run(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert _losses(workdir) == expected, moments


def _stop_with(sig: signal.Signals, workdir: str) -> int:
  """Sends sig to a run after its third step; checks it stopped cleanly and returns its step."""
  p = _start(workdir)
  _wait_until(p, lambda: any(r['step'] >= 3 for r in _rows(workdir)))
  p.send_signal(sig)
  stdout, stderr = p.communicate(timeout=300)
  assert p.returncode == 0, stderr[-3000:]
  assert 'Traceback' not in stderr
  stopped = re.search(
    rf'Stopped by {sig.name} at step (\d+), checkpoint saved\. Run the same '
    r'command to resume\.',
    stdout,
  )
  assert stopped, stdout
  step = int(stopped[1])
  assert 3 <= step < NUM_STEPS
  assert str(step) in os.listdir(os.path.join(workdir, 'checkpoints'))
  return step


def test_sigterm_finishes_the_step_checkpoints_exits_0_and_the_run_resumes(reference, tmp_path):
  reference_dir, expected = reference
  workdir = _new_workdir(reference_dir, tmp_path)
  step = _stop_with(signal.SIGTERM, workdir)
  assert _losses(workdir) == expected[:step]
  out = _run(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'starting at step {step} of {NUM_STEPS}' in out.stdout
  assert _losses(workdir) == expected


def test_sigint_finishes_the_step_checkpoints_and_exits_0(reference, tmp_path):
  reference_dir, expected = reference
  workdir = _new_workdir(reference_dir, tmp_path)
  step = _stop_with(signal.SIGINT, workdir)
  assert _losses(workdir) == expected[:step]


def test_a_damaged_latest_checkpoint_is_skipped_and_the_run_ends_the_same(reference, tmp_path):
  reference_dir, expected = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference_dir, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
    f.write('{"step": 13, "lo')  # a line torn by a kill
  latest = os.path.join(workdir, 'checkpoints', str(NUM_STEPS))
  data = max(
    (
      os.path.join(d, n)
      for d, _, names in os.walk(os.path.join(latest, 'state'))
      for n in names
      if os.path.basename(d) == 'd'
    ),
    key=os.path.getsize,
  )
  with open(data, 'r+b') as f:
    f.truncate(os.path.getsize(data) // 3)
  out = _run(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  reports = [line for line in out.stdout.splitlines() if 'unreadable' in line]
  assert len(reports) == 1 and reports[0].startswith(f'Checkpoint {NUM_STEPS} is unreadable')
  assert f'starting at step {NUM_STEPS - 2} of {NUM_STEPS}' in out.stdout
  assert os.path.exists(data.replace(latest, latest + '.unreadable'))
  assert _losses(workdir) == expected


def _is_pickle(content: bytes) -> bool:
  """Whether content is one whole pickle (any protocol): its opcodes run exactly to STOP."""
  try:
    ops = list(pickletools.genops(content))
  except Exception:  # not a valid opcode stream
    return False
  return ops[-1][0].name == 'STOP' and ops[-1][2] == len(content) - 1


def test_a_run_writes_no_pickle(reference):
  reference_dir, _ = reference
  paths = [os.path.join(d, n) for d, _, names in os.walk(reference_dir) for n in names]
  assert any('checkpoints' in p for p in paths) and any('compile_cache' in p for p in paths)
  for path in paths:
    assert not path.endswith(('.pkl', '.pickle', '.npy', '.npz')), path
    with open(path, 'rb') as f:
      content = f.read()
    assert not _is_pickle(content), path


def test_sampling_from_a_checkpoint_unpickles_nothing(reference):
  reference_dir, _ = reference
  out = subprocess.run(
    [
      sys.executable,
      '-c',
      NO_UNPICKLING,
      MAIN,
      'sample',
      f'--workdir={reference_dir}',
      '--prompt=ROMEO:',
      '--max_new_tokens=4',
      '--temperature=0',
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith('ROMEO:')
  assert 'UNPICKLED' not in out.stderr, out.stderr


def test_is_pickle_recognises_every_protocol():
  for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
    assert _is_pickle(pickle.dumps({'step': 3, 'params': [1.0, 2.0]}, protocol=protocol))
  assert not _is_pickle(json.dumps({'step': 3}).encode())
  assert not _is_pickle(b'\x28\xb5\x2f\xfd' + bytes(range(256)))  # a zstd frame
