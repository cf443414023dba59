"""A group of a sweep as one program: its variants' states stacked, one vmapped step for all.

Variant k of a group differs from the others only in the values of the sweep's stacked keys.
Those reach the step as arrays of the variant axis: the learning rate as a table of every step
(each variant's own schedule, evaluated by Optax), the optimizer's and the loss's numbers as
scalars. Keys the group does not sweep stay Python numbers, so the step is the one its variants
would each be trained with alone.

A variant whose loss, gradient or new parameters are not finite keeps its last finite state (its
parameters and optimizer state stop changing) and its 'diverged_at' records the step; the other
variants go on.
"""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nanodo import model, optimizer, sharding, step
from nanodo.ground.console import log
from nanodo.ground.tree import PyTree
from nanodo.infra import metrics, validate
from nanodo.research import sweep

NOT_DIVERGED = -1
# The config's keys under opt that the optimizer reads as numbers.
OPT_NUMBERS = ('weight_decay', 'b1', 'b2', 'eps', 'peak_learning_rate')
LOSS_NUMBERS = ('label_smoothing', 'z_loss')


def hyper_parameters(c: ml_collections.ConfigDict, group: list[sweep.Variant]) -> dict:
  """The group's per-variant values: 'lr' (each step's learning rate) and each swept key's."""
  configs = [sweep.with_values(c, v.values) for v in group]
  steps_T = jnp.arange(c.opt.num_train_steps + 1)
  lr_KxT = jnp.stack([jax.jit(optimizer.get_schedule(g.opt))(steps_T) for g in configs])
  hp = {'lr': lr_KxT}
  swept = {k for v in group for k in v.values if k in sweep.STACKED and k != 'seed'}
  for key in sorted(swept):
    hp[key] = jnp.asarray([sweep.value_of(g, key) for g in configs], jnp.float32)
  return hp


def _train_one(
  state: PyTree,
  batch: step.Batch,
  hp: dict,
  *,
  graphdef: nnx.GraphDef,
  o: ml_collections.ConfigDict,
  opts: step.StepConfig,
) -> tuple[PyTree, step.Metrics]:
  """step.train_step of one variant at its own values; frozen when it is not finite."""
  lr_T = hp['lr']
  schedule = lambda count: lr_T[jnp.minimum(count, len(lr_T) - 1)]
  numbers = {k.split('.')[1]: v for k, v in hp.items() if k.startswith('opt.')}
  tx = optimizer.get_optimizer(types.SimpleNamespace(**{**o.to_dict(), **numbers}), schedule)
  extras = {k: hp[k] for k in LOSS_NUMBERS if k in hp}
  opts = dataclasses.replace(opts, loss=opts.loss._replace(**extras))
  trained = {k: state[k] for k in ('step', 'params', 'opt_state')}
  new, m = step.train_step(trained, batch, graphdef=graphdef, tx=tx, schedule=schedule, opts=opts)
  finite = [jnp.isfinite(m[k]) for k in ('loss', 'grad_norm', 'update_norm', 'param_norm')]
  alive = (state['diverged_at'] == NOT_DIVERGED) & functools.reduce(jnp.logical_and, finite)
  keep = lambda new_v, old_v: jnp.where(alive, new_v, old_v)
  new |= {k: jax.tree.map(keep, new[k], state[k]) for k in ('params', 'opt_state')}
  diverged_at = jnp.where(
    (state['diverged_at'] == NOT_DIVERGED) & ~alive, state['step'] + 1, state['diverged_at']
  )
  return new | {'diverged_at': diverged_at}, m | {'diverged_at': diverged_at}


def build_steps(
  cfg: model.ModelConfig,
  opts: step.StepConfig,
  c: ml_collections.ConfigDict,
  group: list[sweep.Variant],
  mesh: jax.sharding.Mesh,
) -> step.Steps:
  """The stacked state of step 0 and the group's steps; their metrics have the variant axis.

  The variant axis is split over the mesh's devices when they divide it, else replicated.
  Every variant trains on the same batches.
  """
  K, tx = len(group), optimizer.get_optimizer(c.opt, optimizer.get_schedule(c.opt))
  graphdef, _ = model.abstract(cfg)
  hp = hyper_parameters(c, group)

  def init() -> PyTree:
    # The variants of a group share their seed (it also orders the batches): one start for all.
    params = nnx.state(model.TransformerDecoder(cfg, nnx.Rngs(c.seed)))
    variant = {'params': params, 'opt_state': tx.init(params)}
    variant['diverged_at'] = jnp.full((), NOT_DIVERGED, jnp.int32)
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (K, *x.shape)), variant)
    return {'step': jnp.zeros((), jnp.int32)} | stacked  # the step count is the stack's

  stacked = P(sharding.BATCH) if K % mesh.size == 0 else P()
  spread = f'{K // mesh.size} per device' if stacked else 'each on every device'
  log(f'sweep group: {K} variants stacked, {spread} of {mesh.size}.')
  specs = {'step': P(), 'params': stacked, 'opt_state': stacked, 'diverged_at': stacked}
  shardings = {
    k: jax.tree.map(lambda _, s=specs[k]: NamedSharding(mesh, s), v)
    for k, v in jax.eval_shape(init).items()
  }
  state = jax.jit(init, out_shardings=shardings)()
  one = functools.partial(_train_one, graphdef=graphdef, o=c.opt, opts=opts)
  axes = {'step': None, 'params': 0, 'opt_state': 0, 'diverged_at': 0}
  vmapped = jax.vmap(one, in_axes=(axes, None, 0), out_axes=(axes, 0))
  train = lambda state, batch: vmapped(state, batch, hp)
  replicated, batch = NamedSharding(mesh, P()), sharding.batch_sharding(mesh)
  train = jax.jit(
    train,
    in_shardings=(shardings, batch),
    out_shardings=(shardings, replicated),
    donate_argnums=0,
  )
  evaluate = functools.partial(step.eval_step, graphdef=graphdef, block_size=opts.loss.block_size)
  eval_step = jax.jit(jax.vmap(evaluate, in_axes=(0, None)), out_shardings=replicated)
  return step.Steps(graphdef, state, shardings, train, eval_step)


def plan(c: ml_collections.ConfigDict) -> list[tuple[ml_collections.ConfigDict, list]]:
  """sweep.plan, each group's config checked and its memory estimated, before any work."""
  planned = sweep.plan(c)
  for g, group in planned:
    validate.check(g)
    check_memory(g, len(group))
  return planned


def check_memory(c: ml_collections.ConfigDict, K: int) -> None:
  """ValueError, before anything is compiled, when K variants' states and the activations of
  their step (float32, a rough upper bound) would not fit in the devices' memory."""
  cfg = model.ModelConfig(V=c.vocab_size, **c.model)  # the tokenizer's size is not known yet
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.abstract(cfg)[1]))
  rows = c.batch_size // c.grad_accumulation_steps
  per_token = cfg.N * (16 * cfg.D + 2 * cfg.F + 2 * cfg.H * cfg.L) + 2 * cfg.D
  one = 4 * params + 4 * rows * cfg.L * per_token  # parameters, gradient, two moments
  need, available = K * one, _available_memory()
  if need > available:
    raise ValueError(
      f'sweep: a group of {K} variants needs about {need / 2**30:.1f} GiB ({K} x '
      f'{one / 2**30:.2f} GiB of state and activations), more than the {available / 2**30:.1f} '
      'GiB available; sweep fewer values at once, or a smaller model.'
    )


def _available_memory() -> int:
  """Bytes the devices can hold: the first device's limit, else the host's available memory."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit']) * jax.device_count()
  with open('/proc/meminfo', encoding='utf-8') as f:
    info = dict(line.split(':', 1) for line in f)
  return int(info['MemAvailable'].split()[0]) * 1024


class SweepLogger(metrics.StepLogger):
  """Logs a stack's steps: a row per variant that has not diverged, and its evaluations.

  A variant's row at the step where it diverged holds its finite values and 'diverged_at'; it
  has no rows after that. Rates (tokens/s, MFU) are the whole stack's.
  """

  def __init__(self, ids: list[int], *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.ids = ids

  def rows(self, step: int, step_metrics: dict[str, np.ndarray]) -> dict[int | None, dict]:
    rows = {}
    for k, id_ in enumerate(self.ids):
      diverged_at = int(step_metrics['diverged_at'][k])
      if diverged_at != NOT_DIVERGED and diverged_at < step:
        continue
      rows[id_] = {n: float(v[k]) for n, v in step_metrics.items() if n != 'diverged_at'}
      if diverged_at == step:  # its finite values only
        rows[id_] = {n: x for n, x in rows[id_].items() if np.isfinite(x)} | {'diverged_at': step}
        log(f'variant {id_} diverged at step {step}; it keeps its state of step {step - 1}.')
    return rows

  def console(self, rows: dict[int | None, dict]) -> dict[str, float]:
    """The values of the variant with the lowest loss."""
    return min(rows.values(), key=lambda r: r['loss'], default={})

  def evaluation(self, step: int, result: dict[str, list[float]]) -> None:
    for k, id_ in enumerate(self.ids):
      self.writer.write(step, {f'eval_{n}': v[k] for n, v in result.items()}, variant=id_)
    scores = [f'v{i} {loss:.4f}' for i, loss in zip(self.ids, result['loss'], strict=True)]
    log(f'eval at step {step} | loss ' + ' | '.join(scores))
    self.restart_clock()
