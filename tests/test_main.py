"""The command line: bad input fails fast with one clear line and writes nothing; `eval`."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import CONFIG, MAIN, VOCAB, cli, tiny_config

from nanodo.infra import workdir

TINY = [
  '--config.model.D=32',
  '--config.model.H=2',
  '--config.model.N=1',
  '--config.model.F=64',
  '--config.model.L=32',
  '--config.batch_size=2',
  '--config.eval_batch_size=2',
  f'--config.vocab_path={VOCAB}',
]


@pytest.mark.parametrize(
  'override,message',
  [
    ('--config.model.D=31', 'model.D=31 is not valid: must be divisible by model.H=2'),
    ('--config.batch_size=0', 'batch_size=0 is not valid: must be a positive integer'),
    ('--config.model.N=-1', 'model.N=-1 is not valid: must be a positive integer'),
    ('--config.ds_name=lm2b', "ds_name='lm2b' is not valid: one of ['shakespeare', 'pystdlib'"),
    ('--config.ds_name=jsonl', "train_split='train' matches no file"),
    ('--config.packing=pack', "packing='pack' is not valid: one of ('packed', 'concat')"),
    ('--config.vocab_path=/no/such.model', "vocab_path='/no/such.model' is not a readable"),
    (
      '--config.opt.optimizer=sgdx',
      "opt.optimizer='sgdx' is not valid: one of ('adamw', 'adam_atan2', 'lion', 'adafactor', "
      "'muon')",
    ),
    ('--config.opt.decay_type=cosinus', "opt.decay_type='cosinus' is not valid: one of"),
    ('--config.model.dtype=float8', "model.dtype='float8' is not valid: one of"),
    ('--config.model.KV=3', 'model.KV=3 is not valid: must divide model.H=2'),
    ('--config.model.positions=alibi', "model.positions='alibi' is not valid: one of ('learned',"),
    (
      '--config.model.mlp=relu',
      "model.mlp='relu' is not valid: one of ('gelu', 'swiglu', 'relu2')",
    ),
    (
      '--config.model.positions=rope --config.model.D=6 --config.model.H=2',
      "model.positions='rope' is not valid: rope needs an even head dimension",
    ),
    ('--config.opt.lr_multipliers=embed', "opt.lr_multipliers='embed' is not valid: give"),
    (
      '--config.opt.peak_learning_rate=inf',
      'opt.peak_learning_rate=inf is not valid: must be a finite number',
    ),
    (
      '--config.opt.peak_learnin_rate=1',
      'error: --config.opt.peak_learnin_rate is not a config key; did you mean peak_learning_rate?',
    ),
    ('--config.foo=1', 'error: --config.foo is not a config key.'),
    ('--config.batch_size=two', 'flag --config.batch_size=two: invalid literal for int()'),
    (
      '--config.mesh.data=2',
      'mesh.data=2, mesh.fsdp=-1 is not valid: their product must be the device count, 1',
    ),
    ('--config.mesh.fsdp=0', 'mesh.fsdp=0 is not valid: must be a positive integer or -1'),
    (
      '--config.grad_accumulation_steps=3',
      'batch_size=16 is not valid: must be divisible by grad_accumulation_steps=3',
    ),
    (
      '--config.distributed.coordinator_address=localhost',
      "distributed.coordinator_address='localhost' is not valid: '' or host:port",
    ),
  ],
)
def test_bad_input_fails_fast_with_one_clear_line_and_writes_nothing(tmp_path, override, message):
  workdir = tmp_path / 'run'
  out = cli(f'--config.workdir={workdir}', *override.split(), cwd=str(tmp_path))
  assert out.returncode != 0
  assert message in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert 'Traceback' not in out.stderr
  assert not workdir.exists()


def test_a_config_file_that_does_not_exist_is_one_line(tmp_path):
  cmd = [
    sys.executable,
    MAIN,
    '--config=/no/such/config.py',
    f'--config.workdir={tmp_path / "run"}',
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert out.returncode != 0
  assert 'error: the --config file cannot be loaded' in out.stderr
  assert 'Traceback' not in out.stderr


def test_a_second_run_on_an_active_workdir_fails_at_once_and_writes_nothing(tmp_path):
  workdir_ = tmp_path / 'run'
  workdir_.mkdir()
  with workdir.claim(str(workdir_)):
    out = cli(f'--config.workdir={workdir_}', *TINY, cwd=str(tmp_path))
  assert out.returncode != 0
  assert f"workdir='{workdir_}' is in use by another nanodo run (pid {os.getpid()}" in out.stderr
  assert 'Traceback' not in out.stderr
  assert sorted(os.listdir(workdir_)) == ['lock']


def test_resuming_with_another_model_is_refused_and_the_run_left_as_it_was(tmp_path):
  workdir_ = tmp_path / 'run'
  workdir_.mkdir()
  workdir.write_config(tiny_config(str(workdir_)))
  before = (workdir_ / 'config.json').read_text()
  out = cli(f'--config.workdir={workdir_}', *TINY, cwd=str(tmp_path))
  assert out.returncode != 0
  refusal = 'resuming may not change the model shape, tokenizer, data or weight average: '
  assert refusal in out.stderr
  assert 'model.N: 2 -> 1' in out.stderr and 'batch_size: 4 -> 2' in out.stderr
  assert 'Traceback' not in out.stderr
  assert (workdir_ / 'config.json').read_text() == before
  assert os.listdir(workdir_) == ['config.json']  # not even the lock it took


@pytest.mark.parametrize(
  'overrides,message',
  [
    (
      ['--config.batch_size=12'],
      'batch_size=12 is not valid: each of the '
      'grad_accumulation_steps=1 micro-batches must be divisible by the 8 devices',
    ),
    (
      ['--config.batch_size=16', '--config.grad_accumulation_steps=4'],
      'batch_size=16 is not '
      'valid: each of the grad_accumulation_steps=4 micro-batches must be divisible by the 8',
    ),
    (
      ['--config.mesh.data=3', '--config.mesh.fsdp=4'],
      'mesh.data=3, mesh.fsdp=4 is not valid: their product must be the device count, 8',
    ),
  ],
)
def test_mesh_and_batch_must_fit_the_8_devices(tmp_path, overrides, message):
  workdir = tmp_path / 'run'
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  cmd = [
    sys.executable,
    MAIN,
    f'--config={CONFIG}',
    f'--config.workdir={workdir}',
    *overrides,
  ]
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
  out = cli(
    f'--config.workdir={workdir}',
    f'--config.distributed.coordinator_address=localhost:{port}',
    '--config.distributed.num_processes=2',
    '--config.distributed.process_id=1',
    '--config.distributed.initialization_timeout=3',
    cwd=str(tmp_path),
  )
  assert out.returncode != 0
  assert (
    f"distributed.coordinator_address='localhost:{port}' could not be reached within 3 s"
    in out.stderr
  )
  assert 'Traceback' not in out.stderr
  assert time.monotonic() - start < 60
  assert not workdir.exists()


def _nanodo(*args: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, MAIN, *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_eval_command_prints_the_held_out_metrics_of_a_checkpoint(tiny_run):
  with open(os.path.join(tiny_run, 'metrics.jsonl'), encoding='utf-8') as f:
    [logged] = [r for r in map(json.loads, f) if 'eval_loss' in r]
  pattern = (
    r'^step (\d) held-out \(shakespeare\): loss (\S+) ± (\S+), perplexity (\S+), '
    r'bits per byte (\S+)$'
  )
  out = _nanodo('eval', f'--workdir={tiny_run}')
  assert out.returncode == 0, out.stderr[-2000:]
  step, loss, stderr, perplexity, bpb = map(float, re.match(pattern, out.stdout.strip()).groups())
  assert step == 6  # the latest checkpoint, evaluated when training ended
  assert loss == pytest.approx(logged['eval_loss'], abs=1e-4)
  assert stderr == pytest.approx(logged['eval_loss_stderr'], abs=1e-4)
  assert perplexity == pytest.approx(logged['eval_perplexity'], abs=1e-2)
  assert bpb == pytest.approx(logged['eval_bits_per_byte'], abs=1e-4)
  earlier = _nanodo('eval', f'--workdir={tiny_run}', '--step=3')
  assert earlier.returncode == 0, earlier.stderr[-2000:]
  step, loss3 = map(float, re.match(pattern, earlier.stdout.strip()).groups()[:2])
  assert step == 3 and loss3 > loss


def test_eval_command_bad_input_fails_with_one_clear_line(tiny_run, tmp_path):
  no_checkpoint = tmp_path / 'empty'
  no_checkpoint.mkdir()
  shutil.copy(os.path.join(tiny_run, 'config.json'), no_checkpoint)
  for args, message in [
    ([], 'give one training workdir'),
    ([f'--workdir={tmp_path / "none"}'], 'does not exist'),
    ([f'--workdir={no_checkpoint}'], 'has no checkpoint yet'),
    ([f'--workdir={tiny_run}', '--step=5'], 'step=5 has no checkpoint in'),
  ]:
    out = _nanodo('eval', *args)
    assert out.returncode != 0, args
    assert message in out.stderr, (args, out.stderr[-2000:])
    assert 'Traceback' not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
