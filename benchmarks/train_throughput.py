"""Train-step speed against this machine's matmul ceiling.

  python benchmarks/train_throughput.py [--dtype=bfloat16] [--steps=20] [--configs=S,M]

Prints the ceiling (median GFLOP/s of a jitted 2048x2048 float32 matmul), then for each config:
ms/step, tokens/s, model GFLOP/s and its fraction of the ceiling, peak RSS, and the time from
launch to the end of the first step of `nanodo` on the default config (a fresh workdir: tokenizer
training and compiling included; then again in the same workdir, as a resumed run sees it).
The step is the one `nanodo` trains with (optimizer and metrics included) on random token ids.
Model FLOPs per step = 6·P·T + 12·N·L·D·T + 6·D·V·T (P: non-embedding parameters, T: tokens).
"""

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from nanodo import data, metrics, optimizer, sharding, train
from nanodo.configs import default
from nanodo.model import ModelConfig

CONFIGS = {
    'S': (ModelConfig(V=84, L=64, D=128, H=4, N=4, F=512), 12),
    'M': (ModelConfig(V=8192, L=256, D=512, H=8, N=6, F=2048), 8),
}


def bench(cfg: ModelConfig, batch_size: int, steps: int) -> dict[str, float]:
  """Median step time of nanodo's jitted train step, after two warm-up steps."""
  c = default.get_config()
  mesh = sharding.make_mesh()
  tx = optimizer.get_optimizer(c.opt)
  graphdef, state, shardings = train.init_state(cfg, tx, c.seed, mesh)
  step_fn = train.jit_train_step(graphdef, tx, optimizer.get_schedule(c.opt), shardings,
                                 sharding.batch_sharding(mesh))
  flops_per_token = metrics.model_flops_per_token(state['params'], cfg.D, cfg.L, cfg.N, cfg.V)
  rng = np.random.default_rng(0)
  batches = [data.as_batch(rng.integers(1, cfg.V, (batch_size, cfg.L), dtype=np.int32))
             for _ in range(4)]
  with jax.set_mesh(mesh):  # the model splits activations along B over the mesh
    state, m = step_fn(state, batches[0])
    jax.block_until_ready(m)
    state, m = step_fn(state, batches[1])
    jax.block_until_ready(m)
    times = []
    for i in range(steps):
      t = time.perf_counter()
      state, m = step_fn(state, batches[i % len(batches)])
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  tokens = batch_size * cfg.L
  seconds = statistics.median(times)
  return {'ms_per_step': 1e3 * seconds, 'tokens_per_s': tokens / seconds,
          'gflops': flops_per_token * tokens / seconds / 1e9}


def seconds_to_first_step(workdir: str) -> float:
  """Wall time from launching `nanodo` on the default config until it logs step 1."""
  main_py = os.path.join(os.path.dirname(train.__file__), 'main.py')
  config_py = os.path.join(os.path.dirname(train.__file__), 'configs', 'default.py')
  start = time.time()
  proc = subprocess.Popen(
      [sys.executable, main_py, f'--config={config_py}', f'--config.workdir={workdir}'],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    if re.match(r'step\s+1\b', line):
      seconds = time.time() - start
      proc.kill()
      proc.wait()
      return seconds
  raise RuntimeError(f'nanodo exited with {proc.wait()} before step 1.')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--configs', default='S,M')
  args = parser.parse_args()
  ceiling = metrics.matmul_flops_per_sec() / 1e9
  print(f'ceiling: {ceiling:.1f} GFLOP/s (float32 2048x2048 matmul, {jax.devices()[0].platform})')
  print(f'{"config":6} {"dtype":8} {"ms/step":>8} {"tokens/s":>9} {"GFLOP/s":>8} {"ceiling":>8} '
        f'{"peak RSS":>9}')
  for name in args.configs.split(','):
    cfg, batch_size = CONFIGS[name]
    cfg = ModelConfig(**{**cfg.__dict__, 'dtype': args.dtype})
    r = bench(cfg, batch_size, args.steps)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f'{name:6} {args.dtype:8} {r["ms_per_step"]:8.1f} {r["tokens_per_s"]:9.0f} '
          f'{r["gflops"]:8.1f} {r["gflops"] / ceiling:8.2f} {rss_gb:7.2f}GB', flush=True)
  with tempfile.TemporaryDirectory() as workdir:
    print(f'default config, launch to first step: {seconds_to_first_step(workdir):.1f}s fresh, '
          f'{seconds_to_first_step(workdir):.1f}s resumed in the same workdir')


if __name__ == '__main__':
  main()
