"""End to end: the command line, resume, bad input."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import VOCAB, tiny_config

from nanodo import sources, train, validate, workdir

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
  assert a == b  # float32 on CPU: bit-identical


def _cli(*args: str, cwd: str) -> subprocess.CompletedProcess:
  source = os.path.dirname(train.__file__)
  cmd = [
    sys.executable,
    os.path.join(source, 'main.py'),
    f'--config={os.path.join(source, "configs", "default.py")}',
    *args,
  ]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)


def test_seed_command_line_trains_and_a_second_call_resumes(tmp_path):
  workdir = str(tmp_path / 'run')
  args = [
    f'--config.workdir={workdir}',
    '--config.model.L=128',
    '--config.batch_size=2',
    *TINY[:4],
    '--config.opt.num_train_steps=4',
    '--config.checkpoint_every_steps=2',
    f'--config.vocab_path={VOCAB}',
  ]
  out = _cli(*args, cwd=str(tmp_path))
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
  again = _cli(
    *args[:-2],
    '--config.opt.num_train_steps=6',
    '--config.checkpoint_every_steps=2',
    f'--config.vocab_path={VOCAB}',
    cwd=str(tmp_path),
  )
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'starting at step 4 of 6' in again.stdout
  assert sorted(_losses(workdir)) == list(range(1, 7))


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
      "opt.optimizer='sgdx' is not valid: one of ('adamw', 'lion', 'adafactor', 'muon')",
    ),
    ('--config.opt.decay_type=cosinus', "opt.decay_type='cosinus' is not valid: one of"),
    ('--config.model.dtype=float8', "model.dtype='float8' is not valid: one of"),
    ('--config.model.KV=3', 'model.KV=3 is not valid: must divide model.H=2'),
    ('--config.model.positions=alibi', "model.positions='alibi' is not valid: one of ('learned',"),
    ('--config.model.mlp=relu', "model.mlp='relu' is not valid: one of ('gelu', 'swiglu')"),
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
  out = _cli(f'--config.workdir={workdir}', *override.split(), cwd=str(tmp_path))
  assert out.returncode != 0
  assert message in out.stderr
  assert 'Traceback' not in out.stderr
  assert not workdir.exists()


def test_a_config_file_that_does_not_exist_is_one_line(tmp_path):
  cmd = [
    sys.executable,
    os.path.join(os.path.dirname(train.__file__), 'main.py'),
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
  with workdir.lock(str(workdir_)):
    out = _cli(f'--config.workdir={workdir_}', *TINY, cwd=str(tmp_path))
  assert out.returncode != 0
  assert f"workdir='{workdir_}' is in use by another nanodo run (pid {os.getpid()}" in out.stderr
  assert 'Traceback' not in out.stderr
  assert sorted(os.listdir(workdir_)) == ['lock']


def test_resuming_with_another_model_is_refused_and_the_run_left_as_it_was(tmp_path):
  workdir_ = tmp_path / 'run'
  workdir_.mkdir()
  workdir.write_config(tiny_config(str(workdir_)))
  before = (workdir_ / 'config.json').read_text()
  out = _cli(f'--config.workdir={workdir_}', *TINY, cwd=str(tmp_path))
  assert out.returncode != 0
  assert 'resuming may not change the model shape, tokenizer or data: ' in out.stderr
  assert 'model.N: 2 -> 1' in out.stderr and 'batch_size: 4 -> 2' in out.stderr
  assert 'Traceback' not in out.stderr
  assert (workdir_ / 'config.json').read_text() == before
  assert sorted(os.listdir(workdir_)) == ['config.json', 'lock']


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
    os.path.join(os.path.dirname(train.__file__), 'main.py'),
    f'--config={os.path.join(os.path.dirname(train.__file__), "configs", "default.py")}',
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
  out = _cli(
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


def test_checkpoint_restore_dir_starts_from_another_run(tmp_path):
  _run(str(tmp_path / 'a'), 3)
  c = tiny_config(str(tmp_path / 'b'), checkpoint_restore_dir=str(tmp_path / 'a'))
  c.opt.update(num_train_steps=5, warmup_steps=0, decay_type='constant')
  train.train_and_evaluate(c)
  assert sorted(_losses(str(tmp_path / 'b'))) == [4, 5]


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


def _nanodo(*args: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, os.path.join(os.path.dirname(train.__file__), 'main.py'), *args]
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


def test_trains_on_local_jsonl_files_and_a_resumed_run_reuses_the_token_cache(tmp_path, capsys):
  plays = sources.shakespeare()[1]
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
