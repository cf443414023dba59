"""train_minutes: the step count a budget buys, on an injected clock; kept for a resumed run."""

import itertools
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import tiny_config

from nanodo import optimizer, step, train
from nanodo.infra import budget, validate, workdir


@pytest.fixture
def fake_clock(monkeypatch):
  """A clock that moves 1 s each time it is read, from 0, and a launch at 0 - launch_ago; the
  loop's pace (1 s a step) is taken as on time unless paced."""

  def install(launch_ago: float = 0.0, paced: bool = False) -> None:
    monkeypatch.setattr(budget, 'clock', itertools.count().__next__)
    monkeypatch.setattr(budget, 'launched', lambda: -launch_ago)
    if not paced:
      monkeypatch.setattr(budget, 'BAND', (0.0, float('inf')))

  return install


def _losses(path: str) -> dict[int, float]:
  with open(os.path.join(path, workdir.METRICS), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def _budgeted(path: str, minutes: float) -> dict[str, float]:
  return train.train_and_evaluate(tiny_config(path, train_minutes=minutes, eval_batch_size=128))


def test_the_launch_is_read_from_the_process_start_not_from_when_nanodo_loaded():
  # The process sleeps before it imports nanodo: only /proc's start time is that early.
  code = 'import time; time.sleep(2); from nanodo.infra import budget; print(budget.launched())'
  spawned = time.time()
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  launched = float(out.stdout)
  # Within the rounding of /proc's clock ticks; the import came 2 s later.
  assert spawned - 1.0 < launched < spawned + 1.0


def test_steps_within_counts_steps_and_evaluations():
  # 10 + n + 5·ceil(n / 20) <= 100 holds up to n = 70 (10 + 70 + 4·5 = 100).
  assert budget.steps_within(100, 10, 1.0, 5, 20) == 70
  assert budget.steps_within(100, 10, 1.0, 5, 1000) == 85  # one evaluation, the final one
  assert budget.steps_within(100, 10, 0.5, 0, 1) == 180
  assert budget.steps_within(100, 99, 1.0, 5, 20) == 0
  assert budget.steps_within(100, 120, 1.0, 5, 20) == 0


def test_budget_fixes_the_steps_and_lays_the_schedule_over_them(fake_clock, tmp_path, capsys):
  # Timing reads the clock 6 times from 0: a compile of 1 s, 10 steps in 1 s, an evaluation
  # batch in 1 s (41 batches: 41 s); start = 5 s, plus 1 s for the decided step's compile.
  # 6 + 0.1·n + 41 <= 0.85 · 60 · 0.95 = 48.45 holds up to n = 14.
  fake_clock()
  result = _budgeted(str(tmp_path / 'budgeted'), 0.85)
  decision = budget.read(str(tmp_path / 'budgeted'))
  assert (decision.step_seconds, decision.start_seconds) == (0.1, 6.0)
  assert decision.eval_seconds == 41
  n = decision.num_train_steps
  assert n == 14
  assert f'budget 0.85 min: {n} steps at 0.1 s/step' in capsys.readouterr().out
  assert sorted(_losses(str(tmp_path / 'budgeted'))) == list(range(1, n + 1))
  saved = workdir.read_config(str(tmp_path / 'budgeted'))
  assert saved['opt']['num_train_steps'] == n and saved['train_minutes'] == 0.85
  # The same as a run told the count: warmup and cosine decay over n steps, the same data.
  plain = tiny_config(str(tmp_path / 'plain'), eval_batch_size=128)
  plain.opt.num_train_steps = n
  assert train.train_and_evaluate(plain) == result
  assert _losses(str(tmp_path / 'plain')) == _losses(str(tmp_path / 'budgeted'))


def test_a_resumed_budget_keeps_its_steps(fake_clock, tmp_path, monkeypatch, capsys):
  fake_clock()
  _budgeted(str(tmp_path / 'straight'), 0.85)
  n = budget.read(str(tmp_path / 'straight')).num_train_steps
  # The same run, its decided train step failing before step 5 (the last checkpoint: 3).
  fake_clock()
  real, made = step.jit_train_step, []

  def failing(*args):
    step_fn = real(*args)
    made.append(step_fn)
    if len(made) == 1:  # the step that timing runs
      return step_fn
    return lambda state, batch: step_fn(state, batch) if state['step'] < 4 else 1 / 0

  monkeypatch.setattr(step, 'jit_train_step', failing)
  path = str(tmp_path / 'failed')
  with pytest.raises(ZeroDivisionError):
    _budgeted(path, 0.85)
  assert sorted(os.listdir(os.path.join(path, 'checkpoints'))) == ['3']
  monkeypatch.setattr(step, 'jit_train_step', real)
  # Launched 30 s earlier: timing again would refuse the budget; the kept count stands.
  fake_clock(launch_ago=30)
  capsys.readouterr()
  _budgeted(path, 0.85)
  assert f'budget 0.85 min: {n} steps at 0.1 s/step (kept in {path}/budget.json)' in (
    capsys.readouterr().out
  )
  assert _losses(path) == _losses(str(tmp_path / 'straight'))


def test_a_budget_too_small_for_one_step_is_refused_before_training(fake_clock, tmp_path):
  fake_clock(launch_ago=100)
  path = str(tmp_path / 'run')
  with pytest.raises(
    ValueError, match=r'^train_minutes=1.5 is not valid: it cannot fit one step'
  ) as e:
    _budgeted(path, 1.5)
  # (106 + 0.1 + 41) / 60 / 0.95 = 2.5807 minutes
  assert 'Starting took 106.0 s, a step takes 0.100 s and an evaluation 41.0 s' in str(e.value)
  assert str(e.value).endswith('give at least 2.59.') and '\n' not in str(e.value)
  assert not os.path.exists(os.path.join(path, 'checkpoints', '1'))
  assert not os.path.exists(os.path.join(path, workdir.METRICS))
  assert budget.read(path) is None


def test_bad_and_changed_budgets_are_refused(tmp_path):
  with pytest.raises(validate.ConfigError, match=r'train_minutes=-1.0 is not valid: must be >= 0'):
    validate.check(tiny_config(str(tmp_path / 'a'), train_minutes=-1.0))
  c = tiny_config(str(tmp_path / 'b'), train_minutes=10.0)
  os.makedirs(c.workdir)
  workdir.write_config(c)
  with pytest.raises(validate.ConfigError, match=r'train_minutes: 10.0 -> 20.0'):
    validate.check_resume(tiny_config(str(tmp_path / 'b'), train_minutes=20.0))


# Decided: 5 s to start, 100 steps of 0.5 s, an evaluation (1 s) every 50 and at the end: 57 s,
# the budget of 1 minute less 5%. The loop's steps then take `seconds` each from step `first`.
DECIDED = budget.Decision(1.0, 100, 0.5, 1.0, 5.0, 1.0)


def _paced(monkeypatch, *seconds: float, first: int = 1) -> list[budget.Decision | None]:
  """The Pace's decisions at its looks (every 5 steps from step first + 5), the loop's steps
  taking seconds[0] each until the first look, seconds[1] until the next, and so on."""
  durations = [s for s in seconds for _ in range(5)]
  times = iter(5 + 0.5 * (first - 1) + t for t in itertools.accumulate(durations))
  monkeypatch.setattr(budget, 'clock', times.__next__)
  monkeypatch.setattr(budget, 'launched', lambda: 0.0)
  pace = budget.Pace(DECIDED, 50)
  assert pace.check_every == 5
  looks = [pace.after_step(k) for k in range(first, first + len(durations))]
  assert not any(looks[:5])
  return looks[5::5]


def test_the_pace_decides_the_count_again_when_the_machines_speed_moves_the_end(monkeypatch):
  assert _paced(monkeypatch, 0.5, 0.5)[0] is None  # on time: ends at 57 s
  # 0.625 s a step: 70 s projected. Again, from 8.75 s + 1 s to compile: 71 more steps and two
  # evaluations (1.25 s, slowed as the steps) end at 56.625 s; 72 would end at 57.25 s.
  slow = _paced(monkeypatch, 0.625, 0.625)[0]
  assert (slow.num_train_steps, slow.step_seconds, slow.eval_seconds) == (77, 0.625, 1.25)
  assert (slow.train_minutes, slow.start_seconds, slow.compile_seconds) == (1.0, 5.0, 1.0)
  # 0.375 s a step: 44 s projected, short of the band (54 s): 130 steps end at 57.0 s.
  assert _paced(monkeypatch, 0.375, 0.375)[0].num_train_steps == 130
  # Past a quarter of the count the schedule is too far on to be stretched: no steps are added.
  assert _paced(monkeypatch, 0.375, 0.375, first=26)[0] is None
  assert _paced(monkeypatch, 0.625, 0.625, first=76)[0].num_train_steps < 100  # cut, in time
  # Steps that speed up after a look on time raise the count at the next; once cut, it is not
  # raised again.
  on_time, raised = _paced(monkeypatch, 0.5, 0.25, 0.25)
  assert on_time is None and raised.num_train_steps > 100
  cut, after = _paced(monkeypatch, 0.625, 0.25, 0.25)
  assert cut.num_train_steps < 100 and after is None


def test_a_run_slower_than_timed_decides_its_count_again_and_resumes_with_it(
  fake_clock, tmp_path, capsys
):
  # Timing reads the clock as before: 0.1 s a step, one held-out batch of 1 s, a start of 6 s:
  # 200 steps and 2 evaluations in 0.5 min less 5% (6 + 200·0.1 + 2 = 28 <= 28.5). The loop then
  # reads the clock once a step: 1 s a step. At step 11 (16 s) the count is decided again: 17 s
  # with the compile, one more step and the final evaluation (10 s, slowed as the steps): 28 s.
  fake_clock(paced=True)
  path = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(path, train_minutes=0.5, eval_batch_size=8192))
  out = capsys.readouterr().out
  assert 'budget 0.5 min: 200 steps at 0.1 s/step' in out
  assert 'budget 0.5 min: 12 steps at 1 s/step (decided again at step 11' in out
  decision = budget.read(path)
  assert (decision.num_train_steps, decision.step_seconds, decision.eval_seconds) == (12, 1, 10)
  assert workdir.read_config(path)['opt']['num_train_steps'] == 12
  assert sorted(_losses(path)) == list(range(1, 13))
  assert {11, 12} <= set(map(int, os.listdir(os.path.join(path, 'checkpoints'))))
  # From step 12 on the learning rate is the schedule over 12 steps.
  with open(os.path.join(path, workdir.METRICS), encoding='utf-8') as f:
    last = [json.loads(line) for line in f if '"learning_rate"' in line][-1]
  c = tiny_config(path)
  c.opt.num_train_steps = 12
  assert last['learning_rate'] == pytest.approx(float(optimizer.get_schedule(c.opt)(11)))
  # Resumed from its checkpoint at step 11, the run keeps the count decided last, neither timing
  # nor pacing again, and trains step 12 as before.
  before = _losses(path)
  shutil.rmtree(os.path.join(path, 'checkpoints', '12'))
  fake_clock(launch_ago=1000, paced=True)
  train.train_and_evaluate(tiny_config(path, train_minutes=0.5, eval_batch_size=8192))
  assert 'budget 0.5 min: 12 steps at 1 s/step (kept in' in capsys.readouterr().out
  assert _losses(path) == before
