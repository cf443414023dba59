"""The console: log lines and counted loops (rich bars on a terminal, plain lines otherwise).

Only process 0 of a run prints: the others would repeat it.
"""

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
  if jax.process_index():
    return
  if _active is not None:
    _active.log(line)
  else:
    print(line, flush=True)


class _Plain:
  """A loop shown as plain lines; its rate is measured from its first update (after compiling)."""

  def __init__(self, name: str, total: int, every: int):
    self.name, self.total, self.every = name, total, every
    self.start_time = time.time()
    self.first: tuple[int, float] | None = None  # count and time at the first update


class Progress:
  """Counted loops, each shown with step / total, its numbers, the elapsed time and an ETA.

  On a terminal (or with bar=True) the loops are live rich bars and log lines print above them;
  otherwise a loop prints a plain line at its first update, every `every` steps and at its end
  (every=0: none), and log lines print as they are.
  """

  def __init__(self, file: TextIO | None = None, bar: bool | None = None):
    global _active
    _active = self
    self.file = file or sys.stdout
    if jax.process_index():
      self.file, bar = open(os.devnull, 'w'), False
    self.bar = self.file.isatty() if bar is None else bar
    self._plain: dict[int, _Plain] = {}
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
    """Starts showing a loop of total steps, done of them already; returns its id."""
    if self._rich is not None:
      return self._rich.add_task(name, total=total, completed=done, info='')
    task = next(self._ids)
    self._plain[task] = _Plain(name, total, every)
    return task

  def update(self, task: int, done: int, info: dict[str, float] | None = None) -> None:
    """Sets the loop's count and the numbers shown next to it."""
    text = ' | '.join(f'{k} {fmt(v)}' for k, v in (info or {}).items())
    if self._rich is not None:
      self._rich.update(task, completed=done, info=text)
      return
    p, now = self._plain[task], time.time()
    first = p.first is None
    if first:
      p.first = (done, now)
    if not p.every or not (first or done % p.every == 0 or done == p.total):
      return
    rate = (done - p.first[0]) / (now - p.first[1]) if done > p.first[0] else 0.0
    count = f'{done:>{len(str(p.total))}}/{p.total}'
    parts = [
      f'{p.name} {count}',
      text,
      f'elapsed {_duration(now - p.start_time)}',
      f'eta {_duration((p.total - done) / rate)}' if rate else '',
    ]
    self.log(' | '.join(filter(None, parts)))

  def remove(self, task: int) -> None:
    """Stops showing a loop."""
    if self._rich is not None:
      self._rich.remove_task(task)
    else:
      self._plain.pop(task)

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
