"""Held-out loss, perplexity and bits per byte."""

import math
from collections.abc import Callable

import jax
import numpy as np

from nanodo import data
from nanodo.ground.console import Progress
from nanodo.ground.tree import PyTree

# A jitted step.eval_step: the held-out sums of one batch.
EvalStep = Callable[[PyTree, dict[str, jax.Array]], dict[str, jax.Array]]


def evaluate(
  eval_step: EvalStep,
  params: PyTree,
  eval_data: data.EvalData,
  batch_sharding: jax.sharding.NamedSharding,
  progress: Progress,
) -> dict[str, float]:
  """Mean held-out loss per token (with standard error), perplexity, bits per byte; lists of
  them, one per variant, from a sweep's stacked eval_step."""
  task = progress.add('eval', len(eval_data.batches))
  sums = []
  for b in eval_data.batches:
    sums.append(eval_step(params, data.global_batch(b, batch_sharding)))
    # One step runs while the next is prepared, no more: many steps in flight, each with its
    # cross-process collectives, deadlocked two processes on CPU (Gloo).
    if len(sums) > 1:
      jax.block_until_ready(sums[-2])
    progress.update(task, len(sums) - 1)
  progress.remove(task)
  # A sweep's stacked step gives each sum per variant: then every value is a list of them.
  total = lambda k: np.sum([s[k] for s in sums], axis=0, dtype=np.float64)
  nll = total('loss')
  count = total('count')
  loss = nll / count
  stderr = np.sqrt(np.maximum(total('loss_sq') / count - loss**2, 0.0) / count)
  result = {
    'loss': loss,
    'loss_stderr': stderr,
    'perplexity': np.exp(loss),
    'bits_per_byte': nll / math.log(2) / eval_data.num_bytes,
  }
  return {k: v.tolist() for k, v in result.items()}
