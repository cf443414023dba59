"""A run's workdir: one writer at a time, and the config the run was started with."""

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator

import ml_collections

LOCK_FILE = 'lock'
CONFIG_FILE = 'config.json'


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on workdir; the OS drops it when the process ends, however it ends."""
  with open(os.path.join(workdir, LOCK_FILE), 'a+', encoding='utf-8') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      raise ValueError(
        f'workdir={workdir!r} is in use by another nanodo run ({holder}); wait for '
        'it to end or give another workdir.'
      ) from None
    f.truncate(0)
    f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def read_config(workdir: str) -> dict | None:
  """The config a run in workdir was started with, as a nested dict; None if there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(
      f'{path} is unreadable ({e}); it records the config of the run in this '
      'workdir: restore it, or give another workdir.'
    ) from None


def write_config(c: ml_collections.ConfigDict) -> None:
  """Writes c to workdir/config.json atomically: a crash leaves the old file or the new one."""
  path = os.path.join(c.workdir, CONFIG_FILE)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(c.to_json_best_effort(indent=2))
  os.replace(path + '.tmp', path)
