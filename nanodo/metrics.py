"""Step metrics written as JSON lines in the workdir and printed compactly."""

import json
import math
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp

from nanodo import optimizer
from nanodo.optimizer import PyTree

EMBEDDINGS = r'^(embed_VxD|pos_LxD|head_DxV)$'


def global_norm(tree: PyTree) -> jax.Array:
  """L2 norm over every array of a pytree, in float32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def model_flops_per_token(params: PyTree, D: int, L: int, N: int, V: int) -> float:
  """Training FLOPs of one token: 6·P + 12·N·L·D + 6·D·V, P the non-embedding parameters.

  The attention term counts all L positions (causal masking not discounted).
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  # The output projection (tied or not) is the 6·D·V term; embedding lookups cost no FLOPs.
  P = sum(x.size for path, x in leaves if not re.search(EMBEDDINGS, optimizer.path_str(path)))
  return 6 * P + 12 * N * L * D + 6 * D * V


def matmul_flops_per_sec(n: int = 2048, reps: int = 10) -> float:
  """Median FLOP/s of a jitted float32 n x n matmul on the default device: a practical peak."""
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in range(2))
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(times)


def log(message: str) -> None:
  """Prints a line from process 0 only: the other processes of a run would repeat it."""
  if jax.process_index() == 0:
    print(message, flush=True)


class Writer:
  """Appends one JSON object per logged step to workdir/metrics.jsonl; prints some.

  Only process 0 writes: every process computes the same metrics.
  """

  def __init__(self, workdir: str):
    self.is_main = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._file = open(self.path, 'a', encoding='utf-8') if self.is_main else None

  def write(self, step: int, metrics: dict[str, float], echo: bool = True) -> None:
    """Writes metrics of one step; flushes so a crash loses nothing logged."""
    if not self.is_main:
      return
    row = {'step': step, 'time': time.time(), **{k: float(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()
    if echo:
      print(f'step {step:>6} | ' + ' | '.join(f'{k} {_fmt(v)}' for k, v in metrics.items()),
            flush=True)

  def close(self) -> None:
    if self._file:
      self._file.close()


def _fmt(v: float) -> str:
  v = float(v)
  if v == 0 or not math.isfinite(v):
    return str(v)
  return f'{v:.4g}' if 1e-3 <= abs(v) < 1e5 else f'{v:.3e}'
