"""No pickle: a run writes none; training, sampling and evaluation unpickle nothing."""

import json
import os
import pickle
import pickletools
import subprocess
import sys

import numpy as np
from conftest import MAIN, NO_UNPICKLING, NUM_STEPS


def _is_pickle(content: bytes) -> bool:
  """Whether content is one whole pickle (any protocol): its opcodes run exactly to STOP."""
  try:
    ops = list(pickletools.genops(content))
  except Exception:  # not a valid opcode stream
    return False
  return ops[-1][0].name == 'STOP' and ops[-1][2] == len(content) - 1


def test_a_run_writes_no_pickle(reference):
  reference_dir, _ = reference
  paths = [os.path.join(d, n) for d, _, names in os.walk(reference_dir) for n in names]
  assert any('checkpoints' in p for p in paths) and any('compile_cache' in p for p in paths)
  assert any(p.endswith('.tokens.npy') for p in paths)
  for path in paths:
    assert not path.endswith(('.pkl', '.pickle', '.npz')), path
    if path.endswith('.npy'):  # a NumPy file of numbers, never of objects (which it pickles)
      assert np.load(path, allow_pickle=False).dtype.kind in 'iu', path
    with open(path, 'rb') as f:
      content = f.read()
    assert not _is_pickle(content), path


def _guarded(*args: str) -> subprocess.CompletedProcess:
  """main.py with args, under the audit hook that reports any unpickling."""
  cmd = [sys.executable, '-c', NO_UNPICKLING, MAIN, *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_sampling_from_a_checkpoint_unpickles_nothing(reference):
  reference_dir, _ = reference
  out = _guarded(
    'sample',
    f'--workdir={reference_dir}',
    '--prompt=ROMEO:',
    '--max_new_tokens=4',
    '--temperature=0',
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith('ROMEO:')
  assert 'UNPICKLED' not in out.stderr, out.stderr


def test_evaluating_a_checkpoint_unpickles_nothing(reference):
  reference_dir, _ = reference
  out = _guarded('eval', f'--workdir={reference_dir}')
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith(f'step {NUM_STEPS} held-out (shakespeare): loss ')
  assert 'UNPICKLED' not in out.stderr, out.stderr


def test_is_pickle_recognises_every_protocol():
  for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
    assert _is_pickle(pickle.dumps({'step': 3, 'params': [1.0, 2.0]}, protocol=protocol))
  assert not _is_pickle(json.dumps({'step': 3}).encode())
  assert not _is_pickle(b'\x28\xb5\x2f\xfd' + bytes(range(256)))  # a zstd frame
