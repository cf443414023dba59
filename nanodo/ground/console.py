"""Process 0's console: log lines and counted loops (rich bars on a terminal, else plain lines)."""

import itertools
import math
import os
import sys
import time
from typing import TextIO

import jax
from rich import console as rich_console
from rich import progress as rich_progress


def fmt(v: float) -> str:
  """A number in four significant digits, or in scientific notation when far from 1."""
  v = float(v)
  if v == 0 or not math.isfinite(v):
    return str(v)
  return f'{v:.4g}' if 1e-3 <= abs(v) < 1e5 else f'{v:.3e}'


def _duration(seconds: float) -> str:
  m, s = divmod(round(seconds), 60)
  h, m = divmod(m, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def log(line: str) -> None:
  """Prints a line from process 0: above the live bars if there are any, else on stdout."""
  if _active is not None:
    _active.log(line)  # on the other processes, a Progress writes to os.devnull
  elif jax.process_index() == 0:
    print(line, flush=True)


class Progress:
  """Counted loops with step / total, numbers, elapsed time and ETA: live bars on a terminal."""

  def __init__(self, file: TextIO | None = None, bar: bool | None = None):
    global _active
    _active = self
    self.file = file or sys.stdout
    if jax.process_index():
      self.file, bar = open(os.devnull, 'w'), False
    self.bar = self.file.isatty() if bar is None else bar
    self._plain: dict[int, tuple[str, int, int, float]] = {}  # name, total, every, start time
    # Each plain loop's count and time at its first update: its rate leaves out compiling.
    self._first: dict[int, tuple[int, float]] = {}
    self._ids = itertools.count()
    self._rich = None
    if self.bar:
      self._rich = rich_progress.Progress(
        rich_progress.TextColumn('{task.description}'),
        rich_progress.BarColumn(),
        rich_progress.MofNCompleteColumn(),
        rich_progress.TextColumn('{task.fields[info]}'),
        rich_progress.TimeElapsedColumn(),
        rich_progress.TextColumn('eta'),
        rich_progress.TimeRemainingColumn(),
        console=rich_console.Console(file=self.file, force_terminal=True, highlight=False),
        redirect_stdout=False,
        redirect_stderr=False,
      )
      self._rich.start()

  def __enter__(self) -> 'Progress':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def add(self, name: str, total: int, done: int = 0, every: int = 0) -> int:
    """Starts a loop of total steps, done already; a plain line every `every` steps (0: none)."""
    if self._rich is not None:
      return self._rich.add_task(name, total=total, completed=done, info='')
    task = next(self._ids)
    self._plain[task] = (name, total, every, time.time())
    return task

  def update(self, task: int, done: int, info: dict[str, float] | None = None) -> None:
    """Sets the loop's count and the numbers shown next to it."""
    text = ' | '.join(f'{k} {fmt(v)}' for k, v in (info or {}).items())
    if self._rich is not None:
      self._rich.update(task, completed=done, info=text)
      return
    (name, total, every, start_time), now = self._plain[task], time.time()
    first = task not in self._first
    first_done, first_time = self._first.setdefault(task, (done, now))
    if not every or not (first or done % every == 0 or done == total):
      return
    rate = (done - first_done) / (now - first_time) if done > first_done else 0.0
    eta = f'eta {_duration((total - done) / rate)}' if rate else ''
    count = f'{done:>{len(str(total))}}/{total}'
    parts = [f'{name} {count}', text, f'elapsed {_duration(now - start_time)}', eta]
    self.log(' | '.join(filter(None, parts)))

  def retotal(self, task: int, total: int) -> None:
    """Changes the loop's total."""
    if self._rich is not None:
      self._rich.update(task, total=total)
    else:
      name, _, every, start_time = self._plain[task]
      self._plain[task] = (name, total, every, start_time)

  def remove(self, task: int) -> None:
    """Stops showing a loop."""
    if self._rich is not None:
      self._rich.remove_task(task)
    else:
      self._plain.pop(task)
      self._first.pop(task, None)

  def log(self, line: str) -> None:
    """Prints a line (above the bars on a terminal)."""
    if self._rich is not None:
      self._rich.console.print(line, markup=False, highlight=False, soft_wrap=True)
    else:
      print(line, file=self.file, flush=True)

  def close(self) -> None:
    """Leaves the bars as they are on the terminal."""
    global _active
    _active = None if _active is self else _active
    if self._rich is not None:
      self._rich.stop()
      self._rich = None


# The Progress whose bars are live: log lines go above them.
_active: Progress | None = None
