"""Optax chain: clipping, the optimizer, learning-rate schedule and multipliers, weight decay mask.

Parameters are selected by their path, e.g. 'blocks/0/attn/wq_DxHxK', with regular expressions.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nanodo import ops
from nanodo.ground.tree import PyTree, path_str

OPTIMIZERS = ('adamw', 'adam_atan2', 'lion', 'adafactor', 'muon')
# The layer kinds of a parameterization (ops.WidthScales); the other parameters are None's.
KINDS = ('embedding', 'hidden', 'readout')
# Adam-atan2's update a·atan2(m̂, b·√v̂) with the paper's a = 1.27 and b = 1: a ≈ 4/π makes a step
# of 1 where |m̂| = √v̂, where Adam's is 1 too.
ATAN2_SCALE = 1.27
SCHEDULES = ('cosine', 'linear', 'rsqrt', 'constant', 'wsd')


def get_schedule(o: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from init_learning_rate, then decay_type down to final_learning_rate.

  'wsd' (warmup-stable-decay) holds the peak, then decays linearly over the last
  wsd_decay_fraction of the steps.
  """
  warmup = optax.linear_schedule(o.init_learning_rate, o.peak_learning_rate, o.warmup_steps)
  decay_steps = max(o.num_train_steps - o.warmup_steps, 1)
  peak, final = o.peak_learning_rate, o.final_learning_rate
  if o.decay_type == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=final / peak)
  elif o.decay_type == 'linear':
    decay = optax.linear_schedule(peak, final, decay_steps)
  elif o.decay_type == 'rsqrt':
    decay = lambda t: peak * (max(o.warmup_steps, 1) / (t + max(o.warmup_steps, 1))) ** 0.5
  elif o.decay_type == 'constant':
    decay = optax.constant_schedule(peak)
  elif o.decay_type == 'wsd':
    cooldown = round(o.wsd_decay_fraction * decay_steps)
    stable, cool = optax.constant_schedule(peak), optax.linear_schedule(peak, final, cooldown)
    decay = optax.join_schedules([stable, cool], [decay_steps - cooldown])
  else:
    raise ValueError(f'opt.decay_type={o.decay_type!r} is not valid; valid: {SCHEDULES}.')
  return optax.join_schedules([warmup, decay], [o.warmup_steps])


def _vector(path: tuple, p: jax.Array) -> bool:
  """A norm's scale or bias, or a projection's (named b..): neither Muon nor decay treats it."""
  return p.ndim < 2 or path_str(path).split('/')[-1].startswith('b')


def decay_mask(params: PyTree, exclude: str) -> PyTree:
  """True for the matrices weight decay applies to: not vectors, not paths matching exclude."""
  return jax.tree_util.tree_map_with_path(
    lambda path, p: not _vector(path, p) and not (exclude and re.search(exclude, path_str(path))),
    params,
  )


def parse_multipliers(spec: str) -> list[tuple[str, float]]:
  """'embed=0.5,blocks/0/=2' -> [('embed', 0.5), ('blocks/0/', 2.0)]."""
  pairs = [item.rsplit('=', 1) for item in spec.split(',') if item.strip()]
  return [(pattern.strip(), float(value)) for pattern, value in pairs]


def scale_by_path(spec: str) -> optax.GradientTransformation:
  """Multiplies each update by the multiplier of the first pattern its path matches (else 1)."""
  rules = parse_multipliers(spec)

  def multiplier(path: tuple) -> float:
    return next((m for pattern, m in rules if re.search(pattern, path_str(path))), 1.0)

  scale = lambda updates: jax.tree_util.tree_map_with_path(lambda p, u: u * multiplier(p), updates)
  return optax.stateless(lambda updates, params=None: scale(updates))


def layer_kind(path: tuple, p: jax.Array) -> str | None:
  """The parameter's kind in KINDS: embed_VxD (the head too, when tied), the blocks' matrices
  and head_DxV; None for the norms' scales, the biases and learned positions."""
  name = path_str(path)
  if name.startswith('blocks/'):
    return None if _vector(path, p) else 'hidden'
  return {'embed_VxD': 'embedding', 'head_DxV': 'readout'}.get(name)


def scale_by_kind(factors: dict[str | None, float]) -> optax.GradientTransformation:
  """Multiplies each update by the factor of its parameter's kind; the identity if all are 1."""
  if all(f == 1.0 for f in factors.values()):
    return optax.identity()
  scale = lambda path, u: ops.scaled(u, factors[layer_kind(path, u)])
  return optax.stateless(
    lambda updates, params=None: jax.tree_util.tree_map_with_path(scale, updates)
  )


def scale_by_adam_atan2(b1: float, b2: float) -> optax.GradientTransformation:
  """Adam-atan2 (Everett et al. 2024): Adam's moments and bias corrections, and the update
  ATAN2_SCALE·atan2(m̂, √v̂) instead of m̂ / (√v̂ + eps): no epsilon, and blind to the gradient's
  scale (0 where the gradient has always been 0)."""

  def update(
    updates: PyTree, state: optax.ScaleByAdamState, params: PyTree | None = None
  ) -> tuple[PyTree, optax.ScaleByAdamState]:
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    hat = lambda moment, b: optax.tree.bias_correction(moment, b, count)
    step = lambda m, v: ATAN2_SCALE * jnp.arctan2(m, jnp.sqrt(v))
    return jax.tree.map(step, hat(mu, b1), hat(nu, b2)), optax.ScaleByAdamState(count, mu, nu)

  return optax.GradientTransformation(optax.scale_by_adam(b1, b2).init, update)


def muon_dims(params: PyTree) -> PyTree:
  """How Muon sees each block weight as a matrix, read from its shape-suffixed name; None: AdamW.

  Leading stacked dimensions (wkv_2x..) are batch; a weight that writes the residual stream
  (..xD) reduces over its other dimensions, the others reduce over D.
  """

  def dims(path: tuple, p: jax.Array) -> optax.contrib.MuonDimensionNumbers | None:
    name = path_str(path).split('/')[-1]
    if not path_str(path).startswith('blocks/') or _vector(path, p):
      return None
    axes = name.split('_')[-1].split('x')
    named = [i for i, a in enumerate(axes) if not a.isdigit()]
    if axes[-1] == 'D':
      return optax.contrib.MuonDimensionNumbers(tuple(named[:-1]), named[-1])
    d = axes.index('D')
    return optax.contrib.MuonDimensionNumbers(d, tuple(i for i in named if i != d))

  return jax.tree_util.tree_map_with_path(dims, params)


def get_optimizer(
  o: ml_collections.ConfigDict, schedule: optax.Schedule, scales: ops.WidthScales = ops.SP
) -> optax.GradientTransformation:
  """The optimizer named by opt.optimizer at the learning rates of schedule, behind clipping;
  each kind of layer at its parameterization's learning rate and epsilon (model.scales)."""
  mask = lambda params: decay_mask(params, o.weight_decay_exclude)
  of_kinds = lambda field: {k: getattr(getattr(scales, k), field) for k in KINDS}
  if o.optimizer == 'adamw':
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
    # Each kind's epsilon, eps times its factor f: Adam is blind to its gradient's scale but for
    # epsilon, so a gradient divided by f gives the update of epsilon times f.
    eps = {None: scales.other_eps, **of_kinds('eps')}
    if any(f != 1.0 for f in eps.values()):
      tx = optax.chain(scale_by_kind({k: 1 / f for k, f in eps.items()}), tx)
  elif o.optimizer == 'adam_atan2':
    tx = optax.chain(
      scale_by_adam_atan2(o.b1, o.b2),
      optax.add_decayed_weights(o.weight_decay, mask),
      optax.scale_by_learning_rate(schedule),
    )
  elif o.optimizer == 'lion':
    tx = optax.lion(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=mask)
  elif o.optimizer == 'adafactor':
    # Optax's Adafactor decays by a fixed rate per step: AdamW's decay at the peak learning rate.
    # No decay at a weight of 0; an array (a sweep's values) always decays.
    off = isinstance(o.weight_decay, int | float) and not o.weight_decay
    rate = None if off else o.weight_decay * o.peak_learning_rate
    tx = optax.adafactor(schedule, weight_decay_rate=rate, weight_decay_mask=mask)
  elif o.optimizer == 'muon':
    # Muon on the blocks' matrices, with momentum b1; AdamW on the rest.
    tx = optax.contrib.muon(
      schedule,
      beta=o.b1,
      weight_decay=o.weight_decay,
      weight_decay_mask=mask,
      adam_b1=o.b1,
      adam_b2=o.b2,
      muon_weight_dimension_numbers=muon_dims,
    )
  else:
    raise ValueError(f'opt.optimizer={o.optimizer!r} is not valid; valid: {OPTIMIZERS}.')
  clip = optax.identity()
  if o.clip_by_global_norm:
    clip = optax.clip_by_global_norm(o.clip_by_global_norm)
  lr = scale_by_kind({None: 1.0, **of_kinds('lr')})
  return optax.chain(clip, tx, scale_by_path(o.lr_multipliers), lr)
