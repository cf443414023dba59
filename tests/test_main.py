"""End to end: the command line, resume, bad input."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import VOCAB, tiny_config

from nanodo import train

TINY = ['--config.model.D=32', '--config.model.H=2', '--config.model.N=1', '--config.model.F=64',
        '--config.model.L=32', '--config.batch_size=2', '--config.eval_batch_size=2',
        f'--config.vocab_path={VOCAB}']


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def _run(workdir: str, num_steps: int) -> dict[str, float]:
  # A constant schedule, so that stopping at 6 of 9 does not change the learning rates.
  c = tiny_config(workdir, checkpoint_every_steps=3)
  c.opt.update(num_train_steps=num_steps, warmup_steps=0, decay_type='constant')
  return train.train_and_evaluate(c)


def test_restart_continues_from_the_checkpoint_with_the_same_data(tmp_path):
  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  _run(straight, 9)
  first = _run(interrupted, 6)
  assert sorted(os.listdir(os.path.join(interrupted, 'checkpoints'))) == ['3', '6']
  assert first['bits_per_byte'] > 0
  _run(interrupted, 9)
  a, b = _losses(straight), _losses(interrupted)
  assert sorted(b) == list(range(1, 10))  # steps 7-9 only once: the run resumed at 6
  for step in range(1, 10):
    assert a[step] == pytest.approx(b[step], rel=1e-6), step


def _cli(*args: str, cwd: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, os.path.join(os.path.dirname(train.__file__), 'main.py'),
         f'--config={os.path.join(os.path.dirname(train.__file__), "configs", "default.py")}', *args]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)


def test_seed_command_line_trains_and_a_second_call_resumes(tmp_path):
  workdir = str(tmp_path / 'run')
  args = [f'--config.workdir={workdir}', '--config.model.L=128', '--config.batch_size=2', *TINY[:4],
          '--config.opt.num_train_steps=4', '--config.checkpoint_every_steps=2',
          f'--config.vocab_path={VOCAB}']
  out = _cli(*args, cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'bits_per_byte' in out.stdout
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  again = _cli(*args[:-2], '--config.opt.num_train_steps=6', '--config.checkpoint_every_steps=2',
               f'--config.vocab_path={VOCAB}', cwd=str(tmp_path))
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'starting at step 4 of 6' in again.stdout
  assert sorted(_losses(workdir)) == list(range(1, 7))


@pytest.mark.parametrize('override,message', [
    ('--config.model.D=31', 'model.D=31 is not valid: must be divisible by model.H=2'),
    ('--config.batch_size=0', 'batch_size=0 is not valid: must be a positive integer'),
    ('--config.model.N=-1', 'model.N=-1 is not valid: must be a positive integer'),
    ('--config.ds_name=lm2b', "ds_name='lm2b' is not valid: one of ['shakespeare']"),
    ('--config.vocab_path=/no/such.model', "vocab_path='/no/such.model' is not a readable"),
    ('--config.opt.optimizer=sgdx',
     "opt.optimizer='sgdx' is not valid: one of ('adamw', 'lion', 'adafactor', 'muon')"),
    ('--config.opt.decay_type=cosinus', "opt.decay_type='cosinus' is not valid: one of"),
    ('--config.model.dtype=float8', "model.dtype='float8' is not valid: one of"),
    ('--config.model.KV=3', 'model.KV=3 is not valid: must divide model.H=2'),
    ('--config.model.positions=alibi', "model.positions='alibi' is not valid: one of ('learned',"),
    ('--config.model.mlp=relu', "model.mlp='relu' is not valid: one of ('gelu', 'swiglu')"),
    ('--config.model.positions=rope --config.model.D=6 --config.model.H=2',
     "model.positions='rope' is not valid: rope needs an even head dimension"),
    ('--config.opt.lr_multipliers=embed', "opt.lr_multipliers='embed' is not valid: give"),
    ('--config.mesh.data=2', 'mesh.data=2, mesh.fsdp=-1 is not valid: their product must be the '
     'device count, 1'),
    ('--config.mesh.fsdp=0', 'mesh.fsdp=0 is not valid: must be a positive integer or -1'),
    ('--config.grad_accumulation_steps=3',
     'batch_size=16 is not valid: must be divisible by grad_accumulation_steps=3'),
    ('--config.distributed.coordinator_address=localhost',
     "distributed.coordinator_address='localhost' is not valid: '' or host:port"),
])
def test_bad_input_fails_fast_with_one_clear_line_and_writes_nothing(tmp_path, override, message):
  workdir = tmp_path / 'run'
  out = _cli(f'--config.workdir={workdir}', *override.split(), cwd=str(tmp_path))
  assert out.returncode != 0
  assert message in out.stderr
  assert 'Traceback' not in out.stderr
  assert not workdir.exists()


@pytest.mark.parametrize('overrides,message', [
    (['--config.batch_size=12'], 'batch_size=12 is not valid: each of the '
     'grad_accumulation_steps=1 micro-batches must be divisible by the 8 devices'),
    (['--config.batch_size=16', '--config.grad_accumulation_steps=4'], 'batch_size=16 is not '
     'valid: each of the grad_accumulation_steps=4 micro-batches must be divisible by the 8'),
    (['--config.mesh.data=3', '--config.mesh.fsdp=4'],
     'mesh.data=3, mesh.fsdp=4 is not valid: their product must be the device count, 8'),
])
def test_mesh_and_batch_must_fit_the_8_devices(tmp_path, overrides, message):
  workdir = tmp_path / 'run'
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  cmd = [sys.executable, os.path.join(os.path.dirname(train.__file__), 'main.py'),
         f'--config={os.path.join(os.path.dirname(train.__file__), "configs", "default.py")}',
         f'--config.workdir={workdir}', *overrides]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode != 0
  assert message in out.stderr
  assert not workdir.exists()


def test_an_unreachable_coordinator_fails_within_the_timeout(tmp_path):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  workdir = tmp_path / 'run'
  start = time.monotonic()
  out = _cli(f'--config.workdir={workdir}',
             f'--config.distributed.coordinator_address=localhost:{port}',
             '--config.distributed.num_processes=2', '--config.distributed.process_id=1',
             '--config.distributed.initialization_timeout=3', cwd=str(tmp_path))
  assert out.returncode != 0
  assert (f"distributed.coordinator_address='localhost:{port}' could not be reached within 3 s"
          in out.stderr)
  assert 'Traceback' not in out.stderr
  assert time.monotonic() - start < 60
  assert not workdir.exists()


def test_checkpoint_restore_dir_starts_from_another_run(tmp_path):
  _run(str(tmp_path / 'a'), 3)
  c = tiny_config(str(tmp_path / 'b'), checkpoint_restore_dir=str(tmp_path / 'a'))
  c.opt.update(num_train_steps=5, warmup_steps=0, decay_type='constant')
  train.train_and_evaluate(c)
  assert sorted(_losses(str(tmp_path / 'b'))) == [4, 5]


def test_nan_loss_stops_with_the_step_named_and_keeps_earlier_checkpoints(tmp_path):
  workdir = str(tmp_path / 'run')
  _run(workdir, 3)
  c = tiny_config(workdir, checkpoint_every_steps=3)
  c.opt.update(num_train_steps=12, warmup_steps=0, decay_type='constant', peak_learning_rate=1e35,
               clip_by_global_norm=0.0)
  with pytest.raises(FloatingPointError, match=r'Loss is (nan|inf) at step \d+'):
    train.train_and_evaluate(c)
  assert '3' in os.listdir(os.path.join(workdir, 'checkpoints'))
