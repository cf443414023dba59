"""train_minutes: the steps a wall-clock budget buys, decided at the start, kept to while the
loop runs, and kept in the workdir.

The run times its step (after the one that compiles) and an evaluation batch on copies of its
state, then fixes the step count so that training, its evaluations and the final one end within
the budget counted from the process's launch. The schedule is laid over that count. While the
loop runs, Pace projects the end from the loop's own step times and decides the count again
when the machine's speed moved it out of the budget's band. A resumed run reads the count back
from workdir/budget.json: the same steps, the same learning rates.
"""

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from nanodo import data
from nanodo.ground import files
from nanodo.ground.console import log
from nanodo.ground.tree import PyTree
from nanodo.infra import workdir
from nanodo.step import Steps

# Steps timed after the compiling one; the budget's share kept for saves, logs and the machine's
# speed drifting (keeping 2%, runs here ended up to 22 s past the budget).
TIMED_STEPS, SAFETY = 10, 0.05
# The loop looks at its pace CHECKS times over the decided steps, and decides the count again
# when the end it projects leaves BAND (shares of the budget): past it, or short by a whole
# SAFETY. Each new count costs a compile and a checkpoint (10 s here), so the projection takes
# the slower of two medians: of every step so far and of the steps since the last look.
CHECKS, BAND = 20, (1 - 2 * SAFETY, 1 - SAFETY / 2)
clock = time.time  # replaced by tests
_IMPORTED = time.time()


@dataclasses.dataclass(frozen=True)
class Decision:
  """How many steps train_minutes buys, and the timings it was worked out from (seconds)."""

  train_minutes: float
  num_train_steps: int
  step_seconds: float
  eval_seconds: float  # one full evaluation
  start_seconds: float  # launch to the first step of the decided count, its compile included
  compile_seconds: float = 0.0  # the train step's, paid again by a count decided anew


def launched() -> float:
  """The wall-clock time this process started (from /proc on Linux; else when nanodo loaded)."""
  try:
    with open('/proc/self/stat', encoding='ascii') as f:
      ticks = int(f.read().rsplit(')', 1)[1].split()[19])  # field 22, starttime
    with open('/proc/uptime', encoding='ascii') as f:
      uptime = float(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    return _IMPORTED
  return time.time() - uptime + ticks / os.sysconf('SC_CLK_TCK')


def steps_within(
  budget: float, start: float, step: float, evaluation: float, eval_every: int
) -> int:
  """The most steps n with start + n·step + ceil(n / eval_every)·evaluation ≤ budget."""
  cost = lambda n: start + n * step + math.ceil(n / eval_every) * evaluation
  n = max(math.floor((budget - start) / step), 0)
  while n > 0 and cost(n) > budget:
    n -= 1
  return n


def decide(
  train_minutes: float,
  eval_every: int,
  train_step: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]],
  state: PyTree,
  batch: PyTree,
  evaluate_one: Callable[[], PyTree],
  num_eval_batches: int,
) -> Decision:
  """The step count that ends within the budget, timed on a copy of state (which steps donate)
  and by evaluate_one, a held-out batch's evaluation.

  Process 0's timings decide for every process of the run. ValueError if the budget cannot fit
  one step and the final evaluation.
  """
  probe = jax.tree.map(lambda a: a.copy(), state)
  t0 = clock()
  probe, _ = train_step(probe, batch)
  jax.block_until_ready(probe)
  t1 = clock()
  for _ in range(TIMED_STEPS):
    probe, step_metrics = train_step(probe, batch)
    jax.device_get(step_metrics)  # as the loop's logger reads them
  jax.block_until_ready(probe)
  t2 = clock()
  jax.block_until_ready(evaluate_one())  # compiles
  t3 = clock()
  jax.block_until_ready(evaluate_one())
  compile_seconds, step_seconds = t1 - t0, (t2 - t1) / TIMED_STEPS
  eval_seconds = (clock() - t3) * num_eval_batches
  # The decided count's train step compiles again before it starts.
  start_seconds = clock() - launched() + compile_seconds
  timings = np.array([step_seconds, eval_seconds, start_seconds, compile_seconds])
  if jax.process_count() > 1:
    timings = multihost_utils.broadcast_one_to_all(timings)
  step_seconds, eval_seconds, start_seconds, compile_seconds = (float(t) for t in timings)
  budget = train_minutes * 60 * (1 - SAFETY)
  n = steps_within(budget, start_seconds, step_seconds, eval_seconds, eval_every)
  if n < 1:
    least = (start_seconds + step_seconds + eval_seconds) / 60 / (1 - SAFETY)
    raise ValueError(
      f'train_minutes={train_minutes} is not valid: it cannot fit one step. Starting took '
      f'{start_seconds:.1f} s, a step takes {step_seconds:.3f} s and an evaluation '
      f'{eval_seconds:.1f} s; give at least {math.ceil(least * 100) / 100}.'
    )
  done = int(state['step'])
  return Decision(
    train_minutes, done + n, step_seconds, eval_seconds, start_seconds, compile_seconds
  )


def read(path: str) -> Decision | None:
  """The decision kept in the workdir at path; None if there is none; ValueError naming the file
  if it is damaged or edited into one that no timing gives."""
  file = os.path.join(path, workdir.BUDGET)
  if not os.path.exists(file):
    return None
  try:
    with open(file, encoding='utf-8') as f:
      d = json.load(f)
    decision = Decision(**d) if isinstance(d, dict) else None
  except (OSError, ValueError, TypeError) as e:
    problem = f'unreadable ({e})'
  else:
    values = dataclasses.asdict(decision).values() if decision else [None]
    if all(type(v) in (int, float) and v >= 0 for v in values):
      if type(decision.num_train_steps) is int:
        return decision
    problem = f'not a decision of train_minutes: {json.dumps(d)[:200]}'
  fix = 'delete it to time the steps again, or give another workdir'
  raise ValueError(f'{file} is {problem}; it keeps the steps this run bought: {fix}.')


def write(path: str, decision: Decision) -> None:
  """Keeps decision in the workdir at path, whole."""
  text = json.dumps(dataclasses.asdict(decision), indent=2)
  files.write_text(os.path.join(path, workdir.BUDGET), text)


class Pace:
  """Keeps a decided count to the budget: every 1/CHECKS of the count, the loop's step times
  project the end; outside BAND the count is decided again. It is raised only before any cut and
  while three quarters of it are left to train (a schedule near its end would rise again)."""

  def __init__(self, decision: Decision, eval_every: int):
    self.decision, self.eval_every = decision, eval_every
    self.check_every = max(decision.num_train_steps // CHECKS, 2)
    self.times: list[float] = []  # the clock after each step
    self.looked = 0  # the index in times of the last look's clock
    self.cut = False
    self.launch = launched()

  def after_step(self, step: int) -> Decision | None:
    """A new decision, if the count no longer ends within the band; else None."""
    self.times.append(clock())
    if len(self.times) - self.looked <= self.check_every:
      return None
    # Medians leave out the steps that also evaluated, saved or compiled.
    seconds = np.diff(self.times)
    step_seconds = max(np.median(seconds), np.median(seconds[self.looked :]))
    self.looked = len(self.times) - 1
    timings = np.array([step_seconds, self.times[-1] - self.launch])
    if jax.process_count() > 1:  # process 0's timings decide for every process
      timings = multihost_utils.broadcast_one_to_all(timings)
    step_seconds, now = (float(t) for t in timings)
    d = self.decision
    # Evaluations slow down with the steps: the machine's speed moves both.
    eval_seconds = d.eval_seconds * step_seconds / d.step_seconds
    budget = d.train_minutes * 60
    end = lambda n, start: (
      start + (n - step) * step_seconds + self.evaluations(step, n) * eval_seconds
    )
    if BAND[0] * budget <= end(d.num_train_steps, now) <= BAND[1] * budget:
      return None
    target, start = budget * (1 - SAFETY), now + d.compile_seconds
    n = step + max(math.floor((target - start) / step_seconds), 1)
    while n > step + 1 and end(n, start) > target:
      n -= 1
    more = n > d.num_train_steps
    if n == d.num_train_steps or (more and (self.cut or step > d.num_train_steps / 4)):
      return None
    self.cut = self.cut or not more
    self.decision = dataclasses.replace(
      d, num_train_steps=n, step_seconds=step_seconds, eval_seconds=eval_seconds
    )
    return self.decision

  def evaluations(self, step: int, n: int) -> int:
    """The evaluations of steps step + 1 to n: every eval_every-th, and the last one."""
    return math.ceil(n / self.eval_every) - step // self.eval_every


def describe(d: Decision, pinned: str = '', decided_at: int = 0) -> str:
  """'budget 10 min: 1,640 steps at 0.33 s/step', where the count was kept or when it changed."""
  minutes = f'{d.train_minutes:g}'
  line = f'budget {minutes} min: {d.num_train_steps:,} steps at {d.step_seconds:.3g} s/step'
  if decided_at:
    line += f" (decided again at step {decided_at:,}, from the loop's step times)"
  return line + (f' (kept in {pinned})' if pinned else '')


def apply(
  path: str,
  train_minutes: float,
  eval_every: int,
  steps: Steps,
  state: PyTree,
  batches: grain.DatasetIterator,
  eval_data: data.EvalData,
  batch_sharding: jax.sharding.NamedSharding,
) -> tuple[int, Pace | None]:
  """The steps train_minutes buys: kept in the workdir at path, else timed and kept there; and
  the Pace that keeps a count timed now to the budget (None for a kept count: a resumed run's
  launch is not the budget's).

  Timing runs steps on a copy of state (the run's first) and a peek at the next batch.
  """
  decision, kept = read(path), os.path.join(path, workdir.BUDGET)
  if decision is None:
    position = batches.get_state()
    batch = next(batches)
    batches.set_state(position)
    # Each held-out batch is put on the devices as the evaluation goes.
    first = lambda: data.global_batch(eval_data.batches[0], batch_sharding)
    evaluate_one = lambda: steps.eval_step(state['params'], first())
    n = len(eval_data.batches)
    decision = decide(train_minutes, eval_every, steps.train_step, state, batch, evaluate_one, n)
    if jax.process_index() == 0:
      write(path, decision)
    kept = ''
  log(describe(decision, kept))
  return decision.num_train_steps, None if kept else Pace(decision, eval_every)
