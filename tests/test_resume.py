"""Training end to end: a restarted run continues with the same numbers; restore, divergence."""

import json
import os
import re

import pytest
from conftest import VOCAB, cli, tiny_config

from nanodo import train
from nanodo.corpora import builtin
from nanodo.infra import validate


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def _run(workdir: str, num_steps: int) -> dict[str, float]:
  # A constant schedule, so that stopping at 6 of 9 does not change the learning rates.
  c = tiny_config(workdir, checkpoint_every_steps=3)
  c.opt.update(num_train_steps=num_steps, warmup_steps=0, decay_type='constant')
  return train.train_and_evaluate(c)


def _bytes(workdir: str, name: str) -> bytes:
  with open(os.path.join(workdir, name), 'rb') as f:
    return f.read()


def test_restart_continues_from_the_checkpoint_with_the_same_data(tmp_path, capsys):
  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  _run(straight, 9)
  first = _run(interrupted, 6)
  assert sorted(os.listdir(os.path.join(interrupted, 'checkpoints'))) == ['3', '6']
  assert first['bits_per_byte'] > 0
  before = _bytes(interrupted, 'metrics.jsonl')
  capsys.readouterr()
  _run(interrupted, 9)
  # It started at the checkpoint, not from scratch: it says so, its start is recorded at step 6,
  # and the rows the first run wrote stay as they were, byte for byte, before those of 7-9.
  assert 'resumed from checkpoint 6 in' in capsys.readouterr().out
  starts = [json.loads(line)['step'] for line in _bytes(interrupted, 'hparams.jsonl').splitlines()]
  assert starts == [0, 6]
  after = _bytes(interrupted, 'metrics.jsonl')
  assert after.startswith(before)
  assert [json.loads(line)['step'] for line in after[len(before) :].splitlines()] == [7, 8, 9, 9]
  a, b = _losses(straight), _losses(interrupted)
  assert sorted(b) == list(range(1, 10))
  assert a == b  # float32 on CPU: bit-identical


def test_seed_command_line_trains_and_a_second_call_resumes(tmp_path):
  workdir = str(tmp_path / 'run')
  args = [
    f'--config.workdir={workdir}',
    '--config.model.L=128',
    '--config.batch_size=2',
    '--config.model.D=32',
    '--config.model.H=2',
    '--config.model.N=1',
    '--config.model.F=64',
    '--config.opt.num_train_steps=4',
    '--config.checkpoint_every_steps=2',
    f'--config.vocab_path={VOCAB}',
  ]
  out = cli(*args, cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'bits_per_byte' in out.stdout
  # Not a terminal: plain lines, no cursor control.
  assert '\x1b' not in out.stdout and '\r' not in out.stdout
  steps = re.findall(r'^step +(\d+)/4 \| loss \S+ \| learning_rate ', out.stdout, re.M)
  assert steps == ['1', '4']  # the first step, then every log_every_steps=10 and the last
  assert re.search(
    r'^model: 0\.\d\dM parameters \(0\.\d\dM embedding, 0\.\d\dM non-embedding\)', out.stdout, re.M
  )
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  again = cli(
    *args[:-2],
    '--config.opt.num_train_steps=6',
    '--config.checkpoint_every_steps=2',
    f'--config.vocab_path={VOCAB}',
    cwd=str(tmp_path),
  )
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'starting at step 4 of 6' in again.stdout
  assert sorted(_losses(workdir)) == list(range(1, 7))


def test_checkpoint_restore_dir_starts_from_another_run(tmp_path, capsys):
  _run(str(tmp_path / 'a'), 3)
  capsys.readouterr()
  c = tiny_config(str(tmp_path / 'b'), checkpoint_restore_dir=str(tmp_path / 'a'))
  c.opt.update(num_train_steps=5, warmup_steps=0, decay_type='constant')
  train.train_and_evaluate(c)
  assert sorted(_losses(str(tmp_path / 'b'))) == [4, 5]
  other = tmp_path / 'a' / 'checkpoints'
  lines = capsys.readouterr().out.splitlines()
  assert f'starting from checkpoint 3 in {other} (model, optimizer, data position)' in lines


def test_a_resumed_run_names_its_checkpoint_and_a_finished_one_says_nothing_is_left(
  tmp_path, capsys
):
  workdir = str(tmp_path / 'run')
  _run(workdir, 3)
  lines = capsys.readouterr().out.splitlines()
  assert 'starting at step 0 of 3.' in lines
  assert not any(line.startswith(('resumed', 'starting from')) for line in lines)
  _run(workdir, 3)
  lines = capsys.readouterr().out.splitlines()
  checkpoints = os.path.join(workdir, 'checkpoints')
  restored = f'resumed from checkpoint 3 in {checkpoints} (model, optimizer, data position)'
  nothing_left = 'step 3 of 3: nothing left to train; evaluating.'
  assert restored in lines and nothing_left in lines
  assert not any(line.startswith('starting at') for line in lines)
  evaluation = next(i for i, line in enumerate(lines) if line.startswith('eval at step 3 |'))
  assert lines.index(restored) < lines.index(nothing_left) < evaluation


def test_nan_stops_with_the_step_named_and_saves_nothing_over_the_good_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  _run(workdir, 3)
  checkpoint_3 = os.path.join(workdir, 'checkpoints', '3')
  before = {
    f: os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(checkpoint_3) for f in fs
  }
  # A checkpoint every step: the diverged state would be saved if anything let it through.
  c = tiny_config(workdir, checkpoint_every_steps=1)
  c.opt.update(
    num_train_steps=12,
    warmup_steps=0,
    decay_type='constant',
    peak_learning_rate=1e35,
    clip_by_global_norm=0.0,
  )
  with pytest.raises(FloatingPointError, match=r'^Training diverged at step 4: .*(nan|inf)'):
    train.train_and_evaluate(c)
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['3']
  assert before == {
    f: os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(checkpoint_3) for f in fs
  }
  assert max(_losses(workdir)) == 3  # the diverged step is not logged as a good one


def test_trains_on_local_jsonl_files_and_a_resumed_run_reuses_the_token_cache(tmp_path, capsys):
  plays = builtin.shakespeare()[1]
  for name, docs in (
    ('train', plays[0].split('\n\n')[:300]),
    ('eval', plays[1].split('\n\n')[:50]),
  ):
    with open(tmp_path / f'{name}.jsonl', 'w', encoding='utf-8') as f:
      f.writelines(json.dumps({'text': d}) + '\n' for d in docs if d)
  c = tiny_config(
    str(tmp_path / 'run'),
    ds_name='jsonl',
    packing='concat',
    train_split=str(tmp_path / 'train.jsonl'),
    eval_split=str(tmp_path / 'eval.jsonl'),
  )
  c.opt.num_train_steps = 3
  validate.check(c)
  assert train.train_and_evaluate(c)['bits_per_byte'] > 0
  assert capsys.readouterr().out.count('Building the token cache') == 2
  c.opt.num_train_steps = 5
  train.train_and_evaluate(c)
  out = capsys.readouterr().out
  assert 'starting at step 3 of 5' in out and 'Building the token cache' not in out
  assert sorted(_losses(c.workdir)) == [1, 2, 3, 4, 5]
