"""Sweeps in processes of their own: killed and resumed, and spread over eight devices."""

import os
import subprocess
import sys
import time

import numpy as np
from conftest import CONFIG, MAIN, tiny_config
from test_sweep import _losses, _rows


def test_a_sweep_killed_mid_run_resumes_with_the_same_losses(tmp_path):
  tiny = tiny_config('')
  args = [f'--config.vocab_path={tiny.vocab_path}', '--config.peak_tflops=1']
  args += ['--config.sweep=opt.peak_learning_rate=1e-3,1e-2', '--config.opt.num_train_steps=200']
  args += ['--config.checkpoint_every_steps=20', '--config.batch_size=4']
  args += [f'--config.model.{k}={v}' for k, v in dict(D=32, L=32, N=2, F=64).items()]
  command = lambda w: [sys.executable, MAIN, f'--config={CONFIG}', f'--config.workdir={w}', *args]
  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  assert subprocess.run(command(straight), capture_output=True, timeout=600).returncode == 0
  rows = os.path.join(killed, 'groups', '0', 'metrics.jsonl')
  p = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and p.poll() is None:
    try:
      if max((r['step'] for r in _rows(os.path.dirname(rows))), default=0) >= 50:
        break
    except (OSError, ValueError):  # not written yet, or a line being written
      pass
    time.sleep(0.01)
  assert p.poll() is None, 'the sweep ended before it could be killed'
  p.kill()
  p.wait()
  out = subprocess.run(command(killed), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resumed from checkpoint' in out.stdout
  for v in (0, 1):
    a, b = (_losses(os.path.join(w, 'groups', '0'), v) for w in (straight, killed))
    assert sorted(b) == list(range(1, 201)) and a == b


def test_eight_devices_each_train_one_variant_with_the_same_losses(tmp_path):
  lrs = ','.join(f'{lr:g}' for lr in np.geomspace(1e-3, 1e-1, 8))
  tiny = tiny_config('')
  args = [f'--config.vocab_path={tiny.vocab_path}', f'--config.sweep=opt.peak_learning_rate={lrs}']
  args += ['--config.opt.num_train_steps=3', '--config.batch_size=8', '--config.peak_tflops=1']
  args += [f'--config.model.{k}={v}' for k, v in dict(D=32, L=32, N=2, F=64).items()]
  runs = {}
  for n in (1, 8):
    workdir = str(tmp_path / str(n))
    env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}
    cmd = [sys.executable, MAIN, f'--config={CONFIG}', f'--config.workdir={workdir}', *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f'8 variants stacked, {8 // n} per device of {n}, 8 at a time.' in out.stdout
    runs[n] = workdir
  for v in range(8):
    one, eight = (_losses(os.path.join(runs[n], 'groups', '0'), v) for n in (1, 8))
    assert sorted(one) == [1, 2, 3]
    np.testing.assert_allclose([eight[s] for s in one], list(one.values()), rtol=1e-5)
