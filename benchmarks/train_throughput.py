"""Train-step speed against this machine's matmul ceiling.

  python benchmarks/train_throughput.py [--dtype=bfloat16] [--steps=20] [--configs=S,M,default]
      [--profile] [--malloc=default]

Prints the ceiling (GFLOP/s of a jitted square matmul in --dtype, timed over 0.5 s), then for
each config (S and M, and the model of configs/default.py):
ms/step, tokens/s, model GFLOP/s and its fraction of the ceiling, peak RSS, and the time from
launch to the end of the first step of `nanodo` on the default config (a fresh workdir: tokenizer
training and compiling included; then again in the same workdir, as a resumed run sees it).
The step is the one `nanodo` trains with (optimizer and metrics included) on random token ids,
with malloc set as `nanodo` sets it (--malloc=default: glibc's defaults).
Model FLOPs per step = 6·P·T + 12·N·L·D·T + 6·D·V·T (P: non-embedding parameters, T: tokens).

With --profile, each config's step is also traced with jax.profiler, and its wall time split by
kind of compiled kernel (matmuls of the dense layers and logits, attention's batched matmuls,
layout copies, the rest of the forward and backward, the optimizer and metrics), with the fraction
of the ceiling the step would reach if only the matmuls ran.
"""

import argparse
import collections
import glob
import gzip
import json
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

from nanodo import data, sharding, train
from nanodo.configs import default
from nanodo.infra import host, metrics, peaks
from nanodo.model import ModelConfig
from nanodo.step import StepConfig, build_steps

C = default.get_config()
CONFIGS = {
  'S': (ModelConfig(V=84, **{**C.model, 'L': 64, 'D': 128, 'H': 4, 'N': 4, 'F': 512}), 12),
  'M': (ModelConfig(V=8192, **{**C.model, 'L': 256, 'D': 512, 'H': 8, 'N': 6, 'F': 2048}), 8),
  # configs/default.py's model, with the tokenizer it trains.
  'default': (ModelConfig(V=C.vocab_size, **C.model), C.batch_size),
}


def kernel_kinds(hlo: str) -> dict[str, str]:
  """The kind of each kernel of a compiled step, by name, read from its optimized HLO text."""
  bodies, name = collections.defaultdict(str), ''
  for line in hlo.splitlines():  # the text of each computation, by name
    if line and not line.startswith((' ', '}')):
      name = line.removeprefix('ENTRY ').lstrip('%').split(' ')[0]
    bodies[name] += line + '\n'
  kinds = {}
  # Kernels run from the entry computation and from loop bodies (scans); loops and calls
  # themselves are not kernels, and a fusion's own instructions are not either.
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w[\w\-]*)\(.*$', hlo, re.M):
    if m.group(2) in (
      'while',
      'call',
      'conditional',
      'parameter',
      'constant',
      'tuple',
      'get-tuple-element',
      'bitcast',
    ):
      continue
    called = re.search(r'calls=%?([\w.\-]+)', m.group(0))
    text = m.group(0) + (bodies[called.group(1)] if called else '')
    if ' dot(' in text or ' convolution(' in text:
      batched = 'lhs_batch_dims' in text
      kinds[m.group(1)] = 'matmul: attention' if batched else 'matmul: dense, logits'
    elif 'jvp(' not in m.group(0):
      kinds[m.group(1)] = 'optimizer, metrics'
    elif re.search(r' (copy|transpose|pad)\(', text):
      kinds[m.group(1)] = 'layout copies'
    else:
      kinds[m.group(1)] = 'other forward, backward'
  return kinds


def profile(
  compiled: jax.stages.Compiled, state: dict, batch: dict, steps: int
) -> dict[str, float]:
  """Wall ms per step of each kind of kernel, from a jax.profiler trace of the compiled step.

  Kernels that run at the same time share that time equally.
  """
  kinds = kernel_kinds(compiled.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(steps):
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
    jax.profiler.stop_trace()
    with gzip.open(glob.glob(f'{trace_dir}/**/*.trace.json.gz', recursive=True)[0]) as f:
      events = json.load(f)['traceEvents']
  edges = sorted(
    (t, start, i)
    for i, e in enumerate(events)
    if e.get('ph') == 'X' and e.get('name') in kinds
    for t, start in ((e['ts'], 1), (e['ts'] + e['dur'], 0))
  )
  running, last, ms = set(), 0.0, collections.Counter()
  for t, start, i in edges:
    for j in running:
      ms[kinds[events[j]['name']]] += (t - last) / len(running) / 1e3 / steps
    last = t
    (running.add if start else running.discard)(i)
  return dict(ms)


def bench(
  cfg: ModelConfig, batch_size: int, steps: int, with_profile: bool = False
) -> dict[str, float]:
  """Median step time of nanodo's jitted train step, after two warm-up steps."""
  mesh = sharding.make_mesh(1, -1)
  run = build_steps(cfg, StepConfig.of(C), C.opt, C.seed, mesh)
  state, step_fn = run.state, run.train_step
  flops_per_token = metrics.model_flops_per_token(state['params'], cfg.D, cfg.L, cfg.N, cfg.V)
  rng = np.random.default_rng(0)
  batches = [
    data.as_batch(rng.integers(1, cfg.V, (batch_size, cfg.L), dtype=np.int32)) for _ in range(4)
  ]
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
    kernels = {}
    if with_profile:
      kernels = profile(
        step_fn.lower(state, batches[0]).compile(), state, batches[0], max(3, steps // 4)
      )
  tokens = batch_size * cfg.L
  seconds = statistics.median(times)
  return {
    'ms_per_step': 1e3 * seconds,
    'tokens_per_s': tokens / seconds,
    'gflops': flops_per_token * tokens / seconds / 1e9,
    'kernels': kernels,
    'model_gflop': flops_per_token * tokens / 1e9,
  }


def seconds_to_first_step(workdir: str) -> float:
  """Wall time from launching `nanodo` on the default config until it logs step 1."""
  main_py = os.path.join(os.path.dirname(train.__file__), 'main.py')
  config_py = os.path.join(os.path.dirname(train.__file__), 'configs', 'default.py')
  start = time.time()
  proc = subprocess.Popen(
    [sys.executable, main_py, f'--config={config_py}', f'--config.workdir={workdir}'],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
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
  parser.add_argument('--configs', default='S,M,default')
  parser.add_argument(
    '--profile', action='store_true', help="also split each step's time by kind of kernel"
  )
  parser.add_argument(
    '--malloc',
    default='reuse',
    choices=('reuse', 'default'),
    help="reuse: glibc's malloc set as nanodo sets it (host.reuse_freed_memory)",
  )
  args = parser.parse_args()
  if args.malloc == 'reuse':
    host.reuse_freed_memory()
  flops, n = peaks.matmul_flops_per_sec(args.dtype)
  ceiling, platform = flops / 1e9, jax.devices()[0].platform
  print(f'ceiling: {ceiling:.1f} GFLOP/s ({args.dtype} {n}x{n} matmul, {platform})')
  print(
    f'{"config":6} {"dtype":8} {"ms/step":>8} {"tokens/s":>9} {"GFLOP/s":>8} {"ceiling":>8} '
    f'{"peak RSS":>9}'
  )
  profiles = {}
  for name in args.configs.split(','):
    cfg, batch_size = CONFIGS[name]
    cfg = ModelConfig(**{**cfg.__dict__, 'dtype': args.dtype})
    r = bench(cfg, batch_size, args.steps, args.profile)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
      f'{name:6} {args.dtype:8} {r["ms_per_step"]:8.1f} {r["tokens_per_s"]:9.0f} '
      f'{r["gflops"]:8.1f} {r["gflops"] / ceiling:8.2f} {rss_gb:7.2f}GB',
      flush=True,
    )
    profiles[name] = r
  for name, r in profiles.items() if args.profile else ():
    total = sum(r['kernels'].values())
    print(f"{name}: where a step's {total:.1f} ms go (profiled wall time of its kernels)")
    for kind, ms in sorted(r['kernels'].items(), key=lambda kv: -kv[1]):
      print(f'  {kind:24} {ms:8.1f} ms {ms / total:6.1%}')
    matmul_ms = sum(ms for kind, ms in r['kernels'].items() if kind.startswith('matmul'))
    print(
      f'  if only the matmuls ran: {r["model_gflop"] / matmul_ms * 1e3 / ceiling:.2f} of the '
      'ceiling'
    )
  with tempfile.TemporaryDirectory() as workdir:
    print(
      f'default config, launch to first step: {seconds_to_first_step(workdir):.1f}s fresh, '
      f'{seconds_to_first_step(workdir):.1f}s resumed in the same workdir'
    )


if __name__ == '__main__':
  main()
