"""Train-step speed against this machine's matmul ceiling, malloc settings alternated.

  python benchmarks/train_throughput.py [--configs=T,S,default,M] [--malloc=shipped,glibc]
      [--alternations=5] [--steps=20] [--dtype=float32] [--profile] [--first-step]

Prints the CPU (its model, and whether it has AVX-512) and what each malloc setting is, then
runs every config under every malloc setting, each in a process of its own (malloc is set before
JAX starts), one after another, --alternations times: the machine's speed drifts, so settings
are only compared within one alternation. Each process measures the ceiling (GFLOP/s of a jitted
1024² matmul in --dtype, timed over 0.5 s) before and after its config, and its config's median
ms/step, tokens/s, fraction of the ceiling, page faults per step and peak RSS. Configs: T (the
tiny shape of benchmarks/sweep_speed.py), S, M, and the model of configs/default.py. Then the
medians over alternations, with their spread and their ratio to glibc's defaults.

The step is the one `nanodo` trains with (optimizer and metrics included) on random token ids.
Model FLOPs per step = 6·P·T + 12·N·L·D·T + 6·D·V·T (P: non-embedding parameters, T: tokens).
Malloc settings: shipped (what `nanodo` sets for the config's step: nanodo/infra/host.py),
glibc (its defaults), and one-heap (the shipped setting before huge buffers were mapped: nothing
mapped), no-mmap, one-arena, arenas-2, heap (mmap and trim thresholds as shipped, glibc's
arenas) as glibc's MALLOC_ environment variables.

With --profile, each config's step is also traced with jax.profiler, and its wall time split by
kind of compiled kernel; the line ends with the step's time over its kernels' sum. With
--first-step, the time from launch to the end of the first step of `nanodo` on the default
config (a fresh workdir, tokenizer training and compiling included; then resumed).
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

BIG = str(2**31 - 1)
MALLOC = {
  'shipped': {},
  'glibc': {},
  'one-heap': {'MALLOC_ARENA_MAX': '1', 'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': BIG},
  'no-mmap': {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': BIG},
  'one-arena': {'MALLOC_ARENA_MAX': '1'},
  'arenas-2': {'MALLOC_ARENA_MAX': '2', 'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': BIG},
  'heap': {'MALLOC_MMAP_THRESHOLD_': str(2**30), 'MALLOC_TRIM_THRESHOLD_': BIG},
}
# Fractions of --steps: M's steps take seconds.
STEPS = {'T': 2.0, 'S': 1.0, 'default': 0.5, 'M': 0.25}


def cpu() -> str:
  """The CPU's model name and whether it has AVX-512."""
  with open('/proc/cpuinfo', encoding='utf-8') as f:
    info = f.read()
  name = re.search(r'^model name\s*:\s*(.*)$', info, re.M)
  avx512 = 'with AVX-512' if re.search(r'\bavx512f\b', info) else 'without AVX-512 (AVX2 only)'
  return f'{name[1] if name else "unknown CPU"}, {os.cpu_count()} cores, {avx512}'


def describe(setting: str) -> str:
  """What a malloc setting is, in words."""
  from nanodo.infra import host

  if setting == 'shipped':
    mapped = f'only buffers of {host.HUGE >> 20} MiB and more mapped'
    arenas = f'one arena for a step of {host.ONE_ARENA_FROM >> 20} MiB of temporaries or more'
    return f'no trimming, {mapped}, {arenas} (nanodo/infra/host.py)'
  env = ' '.join(f'{k}={v}' for k, v in MALLOC[setting].items())
  return env or "glibc's defaults"


def bench(cfg, batch_size: int, steps: int, with_profile: bool) -> dict:
  """Median step time of nanodo's jitted train step after two warm-up steps; page faults."""
  import jax
  import step_profile

  from nanodo import data, sharding
  from nanodo.configs import default
  from nanodo.infra import metrics
  from nanodo.step import StepConfig, build_steps

  c = default.get_config()
  mesh = sharding.make_mesh(1, -1)
  run = build_steps(cfg, StepConfig.of(c), c.opt, c.seed, mesh)
  state, step_fn = run.state, run.train_step
  flops_per_token = metrics.model_flops_per_token(state['params'], cfg)
  rng = np.random.default_rng(0)
  ids = [rng.integers(1, cfg.V, (batch_size, cfg.L), dtype=np.int32) for _ in range(4)]
  batches = [data.as_batch(x) for x in ids]
  with jax.set_mesh(mesh):  # the model splits activations along B over the mesh
    for b in batches[:2]:
      state, m = step_fn(state, b)
      jax.block_until_ready(m)
    times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(steps):
      t = time.perf_counter()
      state, m = step_fn(state, batches[i % len(batches)])
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    kernels = {}
    if with_profile:
      compiled = step_fn.lower(state, batches[0]).compile()
      kernels = step_profile.profile(compiled, state, batches[0], max(3, steps // 4))
  seconds = statistics.median(times)
  tokens = batch_size * cfg.L
  return {
    'ms': 1e3 * seconds,
    'tokens_per_s': tokens / seconds,
    'gflops': flops_per_token * tokens / seconds / 1e9,
    'faults_per_step': faults / steps,
    'kernels': kernels,
  }


def child(args: argparse.Namespace) -> None:
  """One process: a malloc setting, the ceiling, one config; one JSON line."""
  from nanodo.configs import default
  from nanodo.infra import host, peaks
  from nanodo.model import ModelConfig

  C = default.get_config()
  configs = {
    'T': (ModelConfig(V=1024, **{**C.model, 'L': 64, 'D': 64, 'H': 2, 'N': 2, 'F': 256}), 16),
    'S': (ModelConfig(V=84, **{**C.model, 'L': 64, 'D': 128, 'H': 4, 'N': 4, 'F': 512}), 12),
    'M': (ModelConfig(V=8192, **{**C.model, 'L': 256, 'D': 512, 'H': 8, 'N': 6, 'F': 2048}), 8),
    # configs/default.py's model, with the tokenizer it trains.
    'default': (ModelConfig(V=C.vocab_size, **C.model), C.batch_size),
  }
  cfg, batch_size = configs[args.configs]
  if args.child == 'shipped':  # as `nanodo` sets it, by the step's temporaries, before JAX starts
    block = C.cross_entropy_block_size
    host.reuse_freed_memory(
      host.step_bytes(batch_size, *(cfg.L, cfg.D, cfg.F, cfg.H), cfg.N, cfg.V, block)
    )
  ceiling = [peaks.matmul_flops_per_sec(args.dtype)[0] / 1e9]
  cfg = ModelConfig(**{**cfg.__dict__, 'dtype': args.dtype})
  steps = max(3, round(args.steps * STEPS[args.configs]))
  out = bench(cfg, batch_size, steps, args.profile)
  ceiling.append(peaks.matmul_flops_per_sec(args.dtype)[0] / 1e9)
  out |= {'ceiling': ceiling, 'rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
  print(json.dumps(out), flush=True)


def _spawn(setting: str, argv: list[str]) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')} | MALLOC[setting]
  cmd = [sys.executable, __file__, f'--child={setting}', *argv]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def seconds_to_first_step(workdir: str) -> float:
  """Wall time from launching `nanodo` on the default config until it logs step 1."""
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'nanodo')
  main_py, config_py = os.path.join(root, 'main.py'), os.path.join(root, 'configs', 'default.py')
  start = time.time()
  cmd = [sys.executable, main_py, f'--config={config_py}', f'--config.workdir={workdir}']
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    if re.match(r'step\s+1\b', line):
      seconds = time.time() - start
      proc.kill()
      proc.wait()
      return seconds
  raise RuntimeError(f'nanodo exited with {proc.wait()} before step 1.')


def _summary(runs: dict[str, list[dict]], configs: list[str], profile: bool) -> None:
  """Each setting's median over alternations, its spread, its ratio to glibc's median."""
  median = lambda setting, name: statistics.median(r[name]['ms'] for r in runs[setting])
  print(f'\n{"setting":10} {"config":8} {"median ms":>10} {"spread":>17} {"ceiling":>8} ', end='')
  print(f'{"faults/step":>12} {"vs glibc":>9}')
  for setting, rows in runs.items():
    for name in configs:
      ms = [r[name]['ms'] for r in rows]
      fraction = statistics.median(r[name]['gflops'] / np.mean(r[name]['ceiling']) for r in rows)
      faults = statistics.median(r[name]['faults_per_step'] for r in rows)
      ratio = median(setting, name) / median('glibc', name) if 'glibc' in runs else float('nan')
      spread = f'{min(ms):.1f}-{max(ms):.1f}'
      print(
        f'{setting:10} {name:8} {median(setting, name):10.1f} {spread:>17} {fraction:8.2f} ', end=''
      )
      print(f'{faults:12.0f} {ratio:9.2f}')
      if profile:
        kernels = rows[-1][name]['kernels']
        parts = ', '.join(f'{k} {v:.1f}' for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]))
        total = sum(kernels.values())
        print(
          f'  kernels {total:.1f} ms ({parts}); the step is {rows[-1][name]["ms"] / total:.2f}x'
        )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--configs', default='T,S,default,M')
  parser.add_argument('--malloc', default='shipped,glibc', help=f'some of {list(MALLOC)}')
  parser.add_argument('--alternations', type=int, default=5)
  parser.add_argument('--profile', action='store_true', help="split each step's time by kernel")
  parser.add_argument('--first-step', action='store_true', help='time launch to first step')
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  configs, settings = args.configs.split(','), args.malloc.split(',')
  print(f'CPU: {cpu()}')
  for setting in settings:
    print(f'malloc {setting}: {describe(setting)}')
  argv = [f'--steps={args.steps}', f'--dtype={args.dtype}'] + (['--profile'] * args.profile)
  runs = {s: [] for s in settings}
  for i in range(args.alternations):
    for setting in settings:
      r = {n: _spawn(setting, [f'--configs={n}', *argv]) for n in configs}  # a process each
      runs[setting].append(r)
      rates = ' | '.join(
        f'{n} {r[n]["ms"]:.1f} ms ({r[n]["gflops"] / np.mean(r[n]["ceiling"]):.2f}, '
        f'{r[n]["rss_gb"]:.2f} GB)'
        for n in configs
      )
      ceilings = [x for n in configs for x in r[n]['ceiling']]
      ceiling = f'{min(ceilings):.0f}-{max(ceilings):.0f} GFLOP/s'
      when = time.strftime('%H:%M:%S')
      print(f'{when} {i + 1}/{args.alternations} {setting:9} | ceiling {ceiling} | {rates}')
  _summary(runs, configs, args.profile)
  if args.first_step:
    with tempfile.TemporaryDirectory() as workdir:
      fresh, resumed = seconds_to_first_step(workdir), seconds_to_first_step(workdir)
      print(f'default config, launch to first step: {fresh:.1f}s fresh, {resumed:.1f}s resumed')


if __name__ == '__main__':
  main()
