"""Does the best learning rate carry across width? A sweep of learning rates at each width.

  python benchmarks/lr_transfer.py [--parameterizations=sp,mup] [--widths=64,128,256,512]
      [--lrs=2^-11..2^-4] [--steps=150] [--png=lr_transfer.png] [--workdir=DIR]

For each width D, one `nanodo` command trains a sweep of the parameterizations × the learning
rates (a factor 2 apart), each parameterization one stack: 4 layers of 4 heads, F = 4D, context
64, batch 16 of the built-in Shakespeare corpus with the shipped 1,024-piece tokenizer, AdamW
with a 10% warmup and cosine decay, base width the first width. Prints the CPU, the final
held-out loss of every variant, each parameterization's best learning rate at each width and how
far it moved (in grid steps) across the widths, and the wall time of the whole; writes a PNG of
held-out loss against learning rate, a panel per parameterization and a line per width. With
--workdir, a width whose sweep already wrote its report there is read rather than trained again.
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


def _finished(workdir: str, grid: str, steps: int) -> bool:
  """Whether workdir holds the report of this very sweep (grid, steps)."""
  paths = [os.path.join(workdir, f) for f in ('report.json', 'sweep.json')]
  if not all(map(os.path.exists, paths)):
    return False
  with open(paths[1], encoding='utf-8') as f:
    planned = json.load(f)
  return planned['sweep'] == grid and planned['config']['opt']['num_train_steps'] == steps


def sweep(workdir: str, D: int, base: int, parameterizations: list[str], lrs: list[float], steps):
  """Final held-out loss of each (parameterization, learning rate) at width D, from report.json."""
  keys = {'workdir': workdir, 'vocab_path': VOCAB, 'batch_size': 16, 'peak_tflops': 1.0}
  keys |= {'model.D': D, 'model.H': 4, 'model.N': 4, 'model.F': 4 * D, 'model.L': 64}
  keys |= {'model.base_width': base, 'opt.num_train_steps': steps}
  keys |= {'opt.warmup_steps': steps // 10, 'eval_every_steps': 10**6, 'log_every_steps': 50}
  keys |= {'checkpoint_every_steps': 10**6}
  grid = f'model.parameterization={",".join(parameterizations)} '
  grid += f'opt.peak_learning_rate={",".join(f"{lr:g}" for lr in lrs)}'
  cmd = [sys.executable, MAIN, f'--config={CONFIG}', f'--config.sweep={grid}']
  cmd += [f'--config.{k}={v}' for k, v in keys.items()]
  if not _finished(workdir, grid, steps):  # a kept workdir's finished sweep is read
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
      sys.exit(out.stderr[-3000:])
  with open(os.path.join(workdir, 'report.json'), encoding='utf-8') as f:
    report = json.load(f)
  loss = {}
  for v in report['variants']:
    p, lr = v['values']['model.parameterization'], v['values']['opt.peak_learning_rate']
    loss[p, lr] = v['eval_loss'] if v['diverged_at'] is None else float('nan')
  return loss


def plot(path: str, losses: dict, widths: list[int], parameterizations: list[str], lrs) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(parameterizations), figsize=(5 * len(parameterizations), 4))
  for ax, p in zip(np.atleast_1d(axes), parameterizations, strict=True):
    for D in widths:
      ax.plot(lrs, [losses[D][p, lr] for lr in lrs], marker='o', label=f'D{D}')
    ax.set(xscale='log', xlabel='peak learning rate', ylabel='final held-out loss', title=p)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--parameterizations', default='sp,mup')
  parser.add_argument('--widths', default='64,128,256,512')
  parser.add_argument('--lrs', default='-11,-4', help='the exponents of 2 of the first and last')
  parser.add_argument('--steps', type=int, default=150)
  parser.add_argument('--png', default='lr_transfer.png')
  parser.add_argument('--workdir', default='', help='keep the runs here (default: a temporary one)')
  args = parser.parse_args()
  parameterizations = args.parameterizations.split(',')
  widths = [int(w) for w in args.widths.split(',')]
  first, last = (int(e) for e in args.lrs.split(','))
  lrs = [float(f'{2.0**e:g}') for e in range(first, last + 1)]  # as the sweep's values read
  print(f'CPU: {cpu()}')
  start, losses = time.perf_counter(), {}
  with tempfile.TemporaryDirectory() as tmp:
    for D in widths:
      t, path = time.perf_counter(), f'{args.workdir or tmp}/D{D}'
      losses[D] = sweep(path, D, widths[0], parameterizations, lrs, args.steps)
      print(f'D{D}: {time.perf_counter() - t:.0f} s')
  print(f'\n{"":6}' + ''.join(f'{lr:>9.2g}' for lr in lrs))
  best = {}
  for p in parameterizations:
    for D in widths:
      row = [losses[D][p, lr] for lr in lrs]
      best[p, D] = int(np.nanargmin(row))
      print(f'{p:4} D{D:<4}' + ''.join(f'{x:9.4f}' for x in row) + f'   best {lrs[best[p, D]]:.2g}')
  print()
  for p in parameterizations:
    at = [best[p, D] for D in widths]
    moves = ' -> '.join(f'{lrs[i]:.2g}' for i in at)
    print(f'{p}: best learning rate {moves}; moved {max(at) - min(at)} grid steps (2x each)')
  print(f'wall time {time.perf_counter() - start:.0f} s')
  plot(args.png, losses, widths, parameterizations, lrs)
  print(f'figure: {args.png}')


if __name__ == '__main__':
  main()
