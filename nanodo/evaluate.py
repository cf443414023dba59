"""Held-out loss, perplexity and bits per byte."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanodo import sharding
from nanodo.data import EvalData
from nanodo.optimizer import PyTree
from nanodo.progress import Progress


def get_in_out(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Inputs, next-token targets and weights: 1 where the target is in the input's own segment."""
  x_BxL, segment_ids_BxL = batch['x'], batch['segment_ids']
  y_BxL = jnp.pad(x_BxL[:, 1:], ((0, 0), (0, 1)))
  next_segment_ids_BxL = jnp.pad(segment_ids_BxL[:, 1:], ((0, 0), (0, 1)))
  # Padding (segment 0) and the first token of the next document are never targets.
  weights_BxL = (next_segment_ids_BxL == segment_ids_BxL) & (segment_ids_BxL != 0)
  return x_BxL, y_BxL, weights_BxL.astype(jnp.float32)


def logits(graphdef: nnx.GraphDef, params: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
  """The model's logits on a batch, attention and positions within each segment."""
  model = nnx.merge(graphdef, params)
  return model(batch['x'], batch['segment_ids'], batch['positions'])


def token_nll(logits_BxLxV: jax.Array, y_BxL: jax.Array) -> jax.Array:
  """Negative log-likelihood of each target, in nats."""
  logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  logit_y_BxL = jnp.take_along_axis(logits_BxLxV, y_BxL[..., None], axis=-1)[..., 0]
  return logz_BxL - logit_y_BxL


def eval_step(
  params: PyTree, batch: dict[str, jax.Array], graphdef: nnx.GraphDef
) -> dict[str, jax.Array]:
  """Sums of the held-out NLL, its square and the target count over one batch."""
  _, y_BxL, weights_BxL = get_in_out(batch)
  nll_BxL = token_nll(logits(graphdef, params, batch), y_BxL) * weights_BxL
  return {'nll': nll_BxL.sum(), 'nll_sq': jnp.square(nll_BxL).sum(), 'count': weights_BxL.sum()}


@functools.lru_cache(maxsize=4)
def _jitted_eval_step(graphdef: nnx.GraphDef) -> callable:
  return jax.jit(functools.partial(eval_step, graphdef=graphdef))


def evaluate(
  graphdef: nnx.GraphDef,
  params: PyTree,
  data: EvalData,
  batch_sharding: jax.sharding.Sharding,
  progress: Progress | None = None,
) -> dict[str, float]:
  """Mean held-out loss per token (with standard error), perplexity, bits per byte."""
  step = _jitted_eval_step(graphdef)
  task = progress.add('eval', len(data.batches)) if progress else None
  sums = []
  for b in data.batches:
    sums.append(step(params, sharding.global_batch(b, batch_sharding)))
    # One step runs while the next is prepared, no more: many steps in flight, each with its
    # cross-process collectives, deadlocked two processes on CPU (Gloo).
    if len(sums) > 1:
      jax.block_until_ready(sums[-2])
    if task is not None:
      progress.update(task, len(sums) - 1)
  if task is not None:
    progress.remove(task)
  nll, nll_sq, count = (
    float(np.sum([s[k] for s in sums], dtype=np.float64)) for k in ('nll', 'nll_sq', 'count')
  )
  loss = nll / count
  stderr = math.sqrt(max(nll_sq / count - loss**2, 0.0) / count)
  return {
    'loss': loss,
    'loss_stderr': stderr,
    'perplexity': math.exp(loss),
    'bits_per_byte': nll / math.log(2) / data.num_bytes,
  }
