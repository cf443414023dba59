"""Faults end to end: real processes killed, stopped and restarted with the same command."""

import os
import random
import re
import shutil
import signal
import subprocess
import time

import pytest
from conftest import NUM_STEPS, guarded_command, metric_rows, run_guarded, step_losses


def _default_sigint() -> None:
  signal.signal(signal.SIGINT, signal.SIG_DFL)  # as from a terminal, even if pytest ignores it


def _start(workdir: str, *flags: str, num_steps: int = NUM_STEPS) -> subprocess.Popen:
  return subprocess.Popen(
    guarded_command(workdir, num_steps) + list(flags),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    preexec_fn=_default_sigint,
  )


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
    logged = max((r['step'] for r in metric_rows(workdir)), default=0)
    after_step, delay = rng.randint(logged + 1, NUM_STEPS - 2), rng.uniform(0, 0.5)
    _kill(workdir, lambda s=after_step: any(r['step'] >= s for r in metric_rows(workdir)), delay)
    moments.append(f'{delay:.3f} s after step {after_step}')
  return moments


def test_sigkill_at_random_moments_changes_no_loss(reference, tmp_path):
  reference_dir, expected = reference
  workdir = _new_workdir(reference_dir, tmp_path)
  # While an asynchronous checkpoint (of step 4 or later) is being written.
  _kill(workdir, lambda: any(int(n.split('.')[0]) >= 4 for n in _tmp_checkpoints(workdir)))
  assert _tmp_checkpoints(workdir), 'the kill came after the save had finished'
  moments = _kill_at_random_moments(workdir, random.Random(0), kills=1)
  out = run_guarded(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  # Each step once, with bit-identical float32 losses.
  assert step_losses(workdir) == expected, moments
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
  out = run_guarded(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert step_losses(workdir) == expected, moments


def _stop_with(sig: signal.Signals, workdir: str) -> int:
  """Sends sig to a run after its third step; checks it stopped cleanly and returns its step."""
  p = _start(workdir)
  _wait_until(p, lambda: any(r['step'] >= 3 for r in metric_rows(workdir)))
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
  assert step_losses(workdir) == expected[:step]
  out = run_guarded(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'starting at step {step} of {NUM_STEPS}' in out.stdout
  assert step_losses(workdir) == expected


def test_sigint_finishes_the_step_checkpoints_and_exits_0(reference, tmp_path):
  reference_dir, expected = reference
  workdir = _new_workdir(reference_dir, tmp_path)
  step = _stop_with(signal.SIGINT, workdir)
  assert step_losses(workdir) == expected[:step]


def test_a_second_sigint_stops_at_once_without_a_checkpoint(tmp_path):
  """Over 30 s: a run of its own, with steps long enough to send a second signal during one."""
  workdir = str(tmp_path / 'run')
  # Checkpoints only at the end: any checkpoint would be the graceful stop's. Later flags win.
  slow = ('--config.batch_size=1024', '--config.checkpoint_every_steps=1000')
  p = _start(workdir, *slow, num_steps=1000)
  _wait_until(p, lambda: any(r['step'] >= 2 for r in metric_rows(workdir)))
  p.send_signal(signal.SIGINT)
  # The second signal only once the first is handled: two sent together may arrive as one.
  handled = next((line for line in p.stderr if 'SIGINT: stopping after this step' in line), None)
  assert handled, p.communicate()
  p.send_signal(signal.SIGINT)
  sent = time.time()
  stdout, stderr = p.communicate(timeout=300)
  assert time.time() - sent < 30  # the rest of the run, not stopped, would take minutes
  assert p.returncode == 1, stderr[-3000:]
  assert 'Interrupted; the checkpoints written so far are kept.' in stderr
  assert 'Traceback' not in stderr
  assert 'checkpoint saved' not in stdout
  assert not [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()]
  assert max(r['step'] for r in metric_rows(workdir)) < 1000


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
  out = run_guarded(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  reports = [line for line in out.stdout.splitlines() if 'unreadable' in line]
  assert len(reports) == 1 and reports[0].startswith(f'Checkpoint {NUM_STEPS} is unreadable')
  assert f'starting at step {NUM_STEPS - 2} of {NUM_STEPS}' in out.stdout
  assert os.path.exists(data.replace(latest, latest + '.unreadable'))
  assert step_losses(workdir) == expected
