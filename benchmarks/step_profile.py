"""Where a compiled train step's time goes: its kernels by kind, from a jax.profiler trace."""

import collections
import glob
import gzip
import json
import re
import tempfile

import jax


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
