"""A sweep of K learning rates as one run, against the same K runs as separate commands.

  python benchmarks/sweep_speed.py [--shape=tiny|default] [--variants=8] [--steps=300]

Each side is timed from launch to exit, start-up, tokenizing and compiling included: the sweep
is one `nanodo` command with --config.sweep='opt.peak_learning_rate=...', the other side K
`nanodo` commands one after another, each with one of the learning rates. Both use the shipped
Shakespeare tokenizer of 1,024 pieces (tests/testdata) and no evaluation until the end. Prints
the CPU, the matmul ceiling before and after, each side's seconds, their ratio, and the largest
difference between a variant's final held-out loss and its own run's.

Shapes: tiny (D64 H2 N2 F256, context 64, batch 16) and default (configs/default.py's model).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from train_throughput import cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, 'nanodo', 'main.py')
CONFIG = os.path.join(ROOT, 'nanodo', 'configs', 'default.py')
VOCAB = os.path.join(ROOT, 'tests', 'testdata', 'shakespeare_1024.model')
SHAPES = {
  'tiny': {'model.D': 64, 'model.H': 2, 'model.N': 2, 'model.F': 256, 'model.L': 64},
  'default': {},
}


def ceiling() -> float:
  """GFLOP/s of the float32 1024² matmul, in a process of its own."""
  code = 'from nanodo.infra import peaks; print(peaks.matmul_flops_per_sec("float32")[0] / 1e9)'
  return float(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True).stdout)


def run(workdir: str, steps: int, shape: dict, extra: dict) -> float:
  """Seconds from launch to exit of one nanodo command."""
  keys = {'workdir': workdir, 'vocab_path': VOCAB, 'opt.num_train_steps': steps}
  keys |= {'eval_every_steps': 10**6, 'checkpoint_every_steps': 10**6, 'peak_tflops': 1.0}
  keys |= {'log_every_steps': 100, **shape, **extra}
  cmd = [
    sys.executable,
    MAIN,
    f'--config={CONFIG}',
    *(f'--config.{k}={v}' for k, v in keys.items()),
  ]
  start = time.perf_counter()
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode:
    sys.exit(out.stderr[-3000:])
  return time.perf_counter() - start


def final_loss(workdir: str, variant: int | None = None) -> float:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if 'eval_loss' in r and r.get('variant') == variant][-1]['eval_loss']


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--shape', default='tiny', choices=sorted(SHAPES))
  parser.add_argument('--variants', type=int, default=8)
  parser.add_argument('--steps', type=int, default=300)
  args = parser.parse_args()
  lrs = [f'{x:.3g}' for x in np.geomspace(3e-4, 3e-2, args.variants)]
  print(f'CPU: {cpu()}')
  print(
    f'{args.variants} learning rates {lrs[0]}..{lrs[-1]}, shape {args.shape}, {args.steps} steps'
  )
  before = ceiling()
  with tempfile.TemporaryDirectory() as tmp:
    shape = SHAPES[args.shape]
    swept = run(
      f'{tmp}/sweep', args.steps, shape, {'sweep': 'opt.peak_learning_rate=' + ','.join(lrs)}
    )
    print(f'one sweep: {swept:.1f} s')
    alone = [
      run(f'{tmp}/{i}', args.steps, shape, {'opt.peak_learning_rate': lr})
      for i, lr in enumerate(lrs)
    ]
    print(f'{args.variants} runs: {sum(alone):.1f} s ({", ".join(f"{t:.1f}" for t in alone)})')
    gap = max(
      abs(final_loss(f'{tmp}/sweep/groups/0', i) / final_loss(f'{tmp}/{i}') - 1)
      for i in range(len(lrs))
    )
  after = ceiling()
  print(f'ceiling {before:.1f} -> {after:.1f} GFLOP/s')
  print(
    f'sweep {sum(alone) / swept:.2f}x faster; largest relative gap in final held-out loss {gap:.1e}'
  )


if __name__ == '__main__':
  main()
