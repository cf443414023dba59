"""train_minutes: the step count a budget buys, on an injected clock; kept for a resumed run."""

import itertools
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import tiny_config

from nanodo import step, train
from nanodo.infra import budget, validate, workdir


@pytest.fixture
def fake_clock(monkeypatch):
  """A clock that moves 1 s each time it is read, from 0, and a launch at 0 - launch_ago."""

  def install(launch_ago: float = 0.0) -> None:
    monkeypatch.setattr(budget, 'clock', itertools.count().__next__)
    monkeypatch.setattr(budget, 'launched', lambda: -launch_ago)

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
