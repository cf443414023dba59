"""A process of a multi-process run is lost: the others stop in bounded time, and all resume."""

import os
import subprocess
import time

import numpy as np
import pytest
from conftest import finish, free_port
from test_sharding import _losses, _nanodo

from nanodo import sharding

HEARTBEAT = 5  # seconds: distributed.heartbeat_timeout of these runs
# Beyond the heartbeat timeout, for JAX's checks and a machine busy with other tests.
MARGIN = 20
NUM_STEPS = 16


def _start(workdir: str, port: int, num_steps: int) -> list[subprocess.Popen]:
  """Processes 0 and 1 of a tiny run on 2 fake CPU devices each; a checkpoint every 2 steps."""
  return [
    _nanodo(
      workdir,
      2,
      f'--config.opt.num_train_steps={num_steps}',
      f'--config.distributed.coordinator_address=localhost:{port}',
      '--config.distributed.num_processes=2',
      f'--config.distributed.process_id={i}',
      f'--config.distributed.heartbeat_timeout={HEARTBEAT}',
    )
    for i in range(2)
  ]


def _checkpoints(workdir: str) -> list[int]:
  """The complete checkpoints' steps: Orbax renames a save's directory to its step when done."""
  path = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(path) if s.isdigit()) if os.path.isdir(path) else []


def _kill_after_a_checkpoint(procs: list[subprocess.Popen], workdir: str) -> None:
  """SIGKILLs process 1 once the first checkpoint is complete."""
  while not _checkpoints(workdir):
    if any(p.poll() is not None for p in procs):
      raise AssertionError([p.communicate()[1][-3000:] for p in procs])
    time.sleep(0.02)
  procs[1].kill()


@pytest.fixture(scope='module')
def lost(tmp_path_factory) -> dict:
  """A two-process run whose process 1 is SIGKILLed after a checkpoint; what process 0 did."""
  workdir, port = str(tmp_path_factory.mktemp('lost') / 'run'), free_port()
  procs = _start(workdir, port, 10_000)  # far more steps than it can take before the kill
  _kill_after_a_checkpoint(procs, workdir)
  start = time.monotonic()
  try:
    out, err = procs[0].communicate(timeout=HEARTBEAT + MARGIN)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    out, err = procs[0].communicate()
  waited = time.monotonic() - start
  procs[1].communicate()
  return dict(workdir=workdir, port=port, waited=waited, process_0=procs[0], out=out, err=err)


def test_when_a_process_is_lost_the_other_stops_within_the_heartbeat_timeout(lost):
  assert lost['waited'] < HEARTBEAT + MARGIN, f'process 0 ran on {lost["waited"]:.0f} s'
  assert lost['process_0'].returncode != 0
  # JAX's own words: those nanodo quoted when the processes joined, and the rest of JAX's line.
  assert (
    sharding.LOST_PROCESS + '. This most likely indicates that another task died' in (lost['err'])
  ), lost['err'][-3000:]
  said = f'2 processes joined; if one stops answering for {HEARTBEAT} s, JAX stops the rest'
  assert said in lost['out']
  assert sharding.LOST_PROCESS in lost['out']
  print(f'process 0 stopped {lost["waited"]:.1f} s after process 1 was killed')


def test_restarting_both_resumes_two_steps_with_the_losses_of_an_unbroken_run(lost, tmp_path):
  """The README's promise, short: both processes resumed for two steps beside an unbroken run."""
  broken, unbroken = lost['workdir'], str(tmp_path / 'unbroken')
  last = _checkpoints(broken)[-1]
  # The same command on both processes, once process 0 has stopped too; the unbroken pair at once.
  pairs = [_start(broken, lost['port'], last + 2), _start(unbroken, free_port(), last + 2)]
  resumed = finish(*pairs[0])
  finish(*pairs[1])
  assert f'starting at step {last} of {last + 2}' in resumed[0]
  a, b = _losses(unbroken), _losses(broken)
  assert sorted(b) == list(range(1, last + 3))
  np.testing.assert_array_equal([b[s] for s in sorted(b)], [a[s] for s in sorted(b)])


@pytest.mark.slow
def test_restarting_both_resumes_with_the_losses_of_an_unbroken_run(lost, tmp_path):
  """Four more starts of nanodo, two at a time: over a minute of a 2-core CPU, mostly JAX's."""
  broken, unbroken = lost['workdir'], str(tmp_path / 'unbroken')
  last = _checkpoints(broken)[-1]
  assert last < NUM_STEPS
  # The same command on both processes, once process 0 has stopped too.
  resumed = finish(*_start(broken, lost['port'], NUM_STEPS))
  assert f'starting at step {last} of {NUM_STEPS}' in resumed[0]
  finish(*_start(unbroken, free_port(), NUM_STEPS))
  a, b = _losses(unbroken), _losses(broken)
  assert sorted(b) == list(range(1, NUM_STEPS + 1))
  np.testing.assert_array_equal([b[s] for s in sorted(b)], [a[s] for s in sorted(b)])
