"""`nanodo plot`: an image of a run's curves, several runs overlaid."""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from nanodo import train
from nanodo.tools import plot  # matplotlib: the test extra has it


def _png_size(path: str) -> tuple[int, int]:
  with open(path, 'rb') as f:
    head = f.read(24)
  assert head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR'
  return struct.unpack('>II', head[16:24])


def _cli(*args: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, os.path.join(os.path.dirname(train.__file__), 'main.py'), 'plot', *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_command_line_writes_a_png_of_the_expected_size(tiny_run, tmp_path):
  out = _cli(f'--workdir={tiny_run}', f'--out={tmp_path / "run.png"}')
  assert out.returncode == 0, out.stderr[-2000:]
  assert _png_size(tmp_path / 'run.png') == (plot.WIDTH * plot.DPI, plot.HEIGHT * plot.DPI)


def test_runs_are_overlaid_and_a_resumed_runs_repeated_steps_count_once(tiny_run, tmp_path):
  other = tmp_path / 'other'
  shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns('checkpoints', 'compile_cache'))
  with open(other / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write(json.dumps({'step': 4, 'time': 0.0, 'loss': 123.0}) + '\n')  # step 4 again
    f.write('{"step": 7, "lo')  # a line cut short by a crash
  run = plot.read_run(str(other), 'other')
  steps, loss = run.get('loss')
  assert steps.tolist() == [1, 2, 3, 4, 5, 6] and loss[3] == 123.0
  assert run.get('eval_bits_per_byte')[0].tolist() == [6]
  assert run.tokens_per_step == 4 * 32
  assert plot._names([tiny_run, str(other)]) == ['run', 'other']
  plot.plot([tiny_run, str(other)], str(tmp_path / 'both.png'))
  assert _png_size(tmp_path / 'both.png') == (1500, 850)
  assert np.isfinite(loss).all()
  # Both runs are drawn: named in the legend, each one's own train losses a line against steps.
  fig = plot.figure([tiny_run, str(other)])
  [legend] = fig.legends
  assert [t.get_text() for t in legend.get_texts()] == ['run', 'other']
  loss_axes = fig.axes[0]
  assert loss_axes.get_xlabel() == 'step' and loss_axes.get_ylabel() == 'loss (nats per token)'
  lines = [(x.tolist(), y.tolist()) for x, y in (ln.get_data() for ln in loss_axes.get_lines())]
  for drawn in (plot.read_run(tiny_run, 'run'), run):
    assert tuple(a.tolist() for a in drawn.get('loss')) in lines, drawn.name


def test_bad_input_is_refused_naming_it(tiny_run, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  for workdirs, out, message in [
    ([str(tmp_path / 'none')], 'a.png', 'does not exist'),
    ([str(empty)], 'a.png', 'has no metrics.jsonl'),
    ([tiny_run], str(tmp_path / 'no' / 'a.png'), 'cannot be written'),
  ]:
    with pytest.raises(ValueError, match=message):
      plot.plot(workdirs, out)


def test_command_line_bad_input_fails_with_one_clear_line(tmp_path):
  for args, message in [
    ([f'--out={tmp_path / "a.png"}'], 'give a training workdir'),
    ([f'--workdir={tmp_path / "none"}', f'--out={tmp_path / "a.png"}'], 'does not exist'),
  ]:
    out = _cli(*args)
    assert out.returncode != 0, args
    assert out.stderr.strip().splitlines()[-1].startswith('error: ')
    assert message in out.stderr and 'Traceback' not in out.stderr, (args, out.stderr[-2000:])
