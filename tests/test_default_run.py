"""The real default run: the promise of the README, checked end to end (slow)."""

import json
import os
import subprocess
import sys

import pytest

from nanodo import train


@pytest.mark.slow
def test_default_run_beats_the_bigram_baseline_on_held_out_plays(tmp_path):
  workdir = tmp_path / 'run'
  main = os.path.join(os.path.dirname(train.__file__), 'main.py')
  config = os.path.join(os.path.dirname(train.__file__), 'configs', 'default.py')
  out = subprocess.run(
    [sys.executable, main, f'--config={config}', f'--config.workdir={workdir}'],
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    evals = [r for r in map(json.loads, f) if 'eval_bits_per_byte' in r]
  assert evals[-1]['eval_bits_per_byte'] <= 1.95
