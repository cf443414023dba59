"""Held-out loss, perplexity and bits per byte, during training or of a trained run."""

import math
from collections.abc import Callable

import grain
import jax
import numpy as np

from nanodo import data, sharding, sources, update, workdir
from nanodo.progress import Progress
from nanodo.tree import PyTree


def evaluate(
  eval_step: Callable[[PyTree, update.Batch], update.Metrics],
  params: PyTree,
  eval_data: data.EvalData,
  batch_sharding: jax.sharding.NamedSharding,
  progress: Progress,
) -> dict[str, float]:
  """Mean held-out loss per token (with standard error), perplexity, bits per byte."""
  task, sums = progress.add('eval', len(eval_data.batches)), []
  for b in eval_data.batches:
    sums.append(eval_step(params, data.global_batch(b, batch_sharding)))
    # One step runs while the next is prepared, no more: many steps in flight, each with its
    # cross-process collectives, deadlocked two processes on CPU (Gloo).
    if len(sums) > 1:
      jax.block_until_ready(sums[-2])
    progress.update(task, len(sums) - 1)
  progress.remove(task)
  total = lambda k: float(np.sum([s[k] for s in sums], dtype=np.float64))
  nll, nll_sq, count = total('loss'), total('loss_sq'), total('count')
  loss = nll / count
  stderr = math.sqrt(max(nll_sq / count - loss**2, 0.0) / count)
  bits_per_byte = nll / math.log(2) / eval_data.num_bytes
  return {
    'loss': loss,
    'loss_stderr': stderr,
    'perplexity': math.exp(loss),
    'bits_per_byte': bits_per_byte,
  }


def evaluate_run(path: str, step: int | None = None) -> tuple[workdir.Run, dict[str, float]]:
  """A run's checkpoint (default: the latest) and its metrics on the run's held-out split."""
  run = workdir.load(path, step)
  c = run.config
  if c.eval_batch_size % jax.device_count():
    here = f'the {jax.device_count()} devices here'
    raise ValueError(f"The run's eval_batch_size={c.eval_batch_size} is not divisible by {here}.")
  split = sources.get_split(c, 'eval')
  tokens = data.load_tokens(split, run.sp, workdir.cache_dir(c), c.tokenize_workers)
  eval_data = data.eval_data(
    tokens, run.cfg.L, c.eval_batch_size, grain.sharding.ShardByJaxProcess()
  )
  eval_step = update.jit_eval_step(run.graphdef, update.StepConfig.of(c))
  batch_sharding = sharding.batch_sharding(sharding.make_mesh(1, jax.device_count()))
  with Progress() as progress:
    return run, evaluate(eval_step, run.params, eval_data, batch_sharding, progress)
