"""Optax chain: clipping, AdamW with a masked weight decay, learning-rate schedule."""

from typing import Any

import jax
import ml_collections
import optax

OPTIMIZERS = ('adamw',)
SCHEDULES = ('cosine', 'linear', 'rsqrt', 'constant')
PyTree = Any  # a nested structure of arrays


def get_schedule(o: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from init_learning_rate, then decay_type down to final_learning_rate."""
  warmup = optax.linear_schedule(o.init_learning_rate, o.peak_learning_rate, o.warmup_steps)
  decay_steps = max(o.num_train_steps - o.warmup_steps, 1)
  if o.decay_type == 'cosine':
    decay = optax.cosine_decay_schedule(
        o.peak_learning_rate, decay_steps, alpha=o.final_learning_rate / o.peak_learning_rate)
  elif o.decay_type == 'linear':
    decay = optax.linear_schedule(o.peak_learning_rate, o.final_learning_rate, decay_steps)
  elif o.decay_type == 'rsqrt':
    decay = lambda t: o.peak_learning_rate * (max(o.warmup_steps, 1) / (t + max(o.warmup_steps, 1))) ** 0.5
  elif o.decay_type == 'constant':
    decay = optax.constant_schedule(o.peak_learning_rate)
  else:
    raise ValueError(f'opt.decay_type={o.decay_type!r} is not valid; valid: {SCHEDULES}.')
  return optax.join_schedules([warmup, decay], [o.warmup_steps])


def decay_mask(params: PyTree, decay_embeddings: bool) -> PyTree:
  """True for the weights that weight decay applies to: matrices, embeddings if asked."""
  def decays(path: tuple, p: jax.Array) -> bool:
    is_embedding = any('embed' in str(k) or 'pos' in str(k) for k in path)
    return p.ndim > 1 and (decay_embeddings or not is_embedding)
  return jax.tree_util.tree_map_with_path(decays, params)


def get_optimizer(o: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer named by opt.optimizer, behind global-norm clipping."""
  if o.optimizer != 'adamw':
    raise ValueError(f'opt.optimizer={o.optimizer!r} is not valid; valid: {OPTIMIZERS}.')
  adamw = optax.adamw(
      get_schedule(o), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
      mask=lambda params: decay_mask(params, o.decay_embeddings))
  clip = optax.clip_by_global_norm(o.clip_by_global_norm) if o.clip_by_global_norm else optax.identity()
  return optax.chain(clip, adamw)
