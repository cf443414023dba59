"""A group of a sweep as one program: its variants' states stacked, one jitted step for all.

Variant k of a group differs from the others only in the values of the sweep's stacked keys.
Those reach the step as arrays of the variant axis: the learning rate as a table of every step
(each variant's own schedule, evaluated by Optax), the optimizer's and the loss's numbers as
scalars. Keys the group does not sweep stay Python numbers, so the step is the one its variants
would each be trained with alone.

The step computes sweep_vmap variants at once (jax.vmap; 0: all), the others one after another
in the same program (lax.map).

A variant whose loss, gradient or new parameters are not finite keeps its last finite state (its
parameters and optimizer state stop changing) and its 'diverged_at' records the step; the other
variants go on.
"""

import dataclasses
import functools
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nanodo import model, ops, optimizer, sharding, step
from nanodo.ground.console import log
from nanodo.ground.tree import PyTree
from nanodo.infra import host, metrics, validate
from nanodo.research import sweep

NOT_DIVERGED = -1
# The stacked keys the optimizer and the loss read as numbers; the schedule's other keys reach the
# step through the table of learning rates only.
NUMBERS = ('opt.weight_decay', 'opt.b1', 'opt.b2', 'opt.eps', 'opt.peak_learning_rate')
LOSS_NUMBERS = ('label_smoothing', 'z_loss')


def hyper_parameters(c: ml_collections.ConfigDict, group: list[sweep.Variant]) -> dict:
  """The group's per-variant values: 'lr' (each step's learning rate) and each swept key's."""
  configs = [sweep.with_values(c, v.values) for v in group]
  schedules = [optimizer.get_schedule(g.opt) for g in configs]
  table = jax.jit(lambda steps_T: jnp.stack([schedule(steps_T) for schedule in schedules]))
  hp = {'lr': table(jnp.arange(c.opt.num_train_steps + 1))}  # one compile for all variants
  swept = {k for v in group for k in v.values if k in NUMBERS + LOSS_NUMBERS}
  for key in sorted(swept):
    hp[key] = jnp.asarray([g[key] for g in configs], jnp.float32)
  return hp


def _train_one(
  state: PyTree,
  batch: step.Batch,
  hp: dict,
  *,
  graphdef: nnx.GraphDef,
  o: ml_collections.ConfigDict,
  opts: step.StepConfig,
  scales: ops.WidthScales,
) -> tuple[PyTree, step.Metrics]:
  """step.train_step of one variant at its own values; frozen when it is not finite."""
  lr_T = hp['lr']
  schedule = lambda count: lr_T[jnp.minimum(count, len(lr_T) - 1)]
  numbers = {k.split('.')[1]: v for k, v in hp.items() if k.startswith('opt.')}
  tx = optimizer.get_optimizer(
    types.SimpleNamespace(**{**o.to_dict(), **numbers}), schedule, scales
  )
  extras = {k: hp[k] for k in LOSS_NUMBERS if k in hp}
  opts = dataclasses.replace(opts, loss=opts.loss._replace(**extras))
  trained = {k: v for k, v in state.items() if k != 'diverged_at'}
  new, m = step.train_step(trained, batch, graphdef=graphdef, tx=tx, schedule=schedule, opts=opts)
  finite = [jnp.isfinite(m[k]) for k in ('loss', 'grad_norm', 'update_norm', 'param_norm')]
  alive = (state['diverged_at'] == NOT_DIVERGED) & functools.reduce(jnp.logical_and, finite)
  keep = lambda new_v, old_v: jnp.where(alive, new_v, old_v)
  new |= {k: jax.tree.map(keep, new[k], state[k]) for k in new if k != 'step'}
  diverged_at = jnp.where(
    (state['diverged_at'] == NOT_DIVERGED) & ~alive, state['step'] + 1, state['diverged_at']
  )
  return new | {'diverged_at': diverged_at}, m | {'diverged_at': diverged_at}


def in_lanes(fn: Callable, xs: PyTree, lanes: int) -> PyTree:
  """fn of each variant of xs (stacked along axis 0), lanes of them at once (jax.vmap), the
  lanes' variants one after another (lax.map) in the same program. A lane's variants are
  contiguous, as they lie on a device when the variant axis is split over the mesh."""
  K = len(jax.tree.leaves(xs)[0])
  split = jax.tree.map(lambda x: x.reshape(lanes, K // lanes, *x.shape[1:]), xs)
  out = jax.vmap(lambda lane: jax.lax.map(fn, lane))(split)
  return jax.tree.map(lambda x: x.reshape(K, *x.shape[2:]), out)


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
  scales = model.scales(cfg)
  K, tx = len(group), optimizer.get_optimizer(c.opt, optimizer.get_schedule(c.opt), scales)
  graphdef, _ = model.abstract(cfg)
  hp = hyper_parameters(c, group)

  def init() -> PyTree:
    # The variants of a group share their seed (it also orders the batches): one start for all.
    params = nnx.state(model.TransformerDecoder(cfg, nnx.Rngs(c.seed)))
    variant = {'params': params, 'opt_state': tx.init(params)}
    variant |= {'ema': params} if c.opt.ema_decay else {}
    variant['diverged_at'] = jnp.full((), NOT_DIVERGED, jnp.int32)
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (K, *x.shape)), variant)
    return {'step': jnp.zeros((), jnp.int32)} | stacked  # the step count is the stack's

  spec_K = P(sharding.BATCH) if K % mesh.size == 0 else P()
  spread = f'{K // mesh.size} per device' if spec_K else 'each on every device'
  lanes = lanes_of(c, K)
  log(f'sweep group: {K} variants stacked, {spread} of {mesh.size}, {lanes} at a time.')
  specs = {'step': P(), 'params': spec_K, 'opt_state': spec_K, 'ema': spec_K, 'diverged_at': spec_K}
  shardings = {
    k: jax.tree.map(lambda _, s=specs[k]: NamedSharding(mesh, s), v)
    for k, v in jax.eval_shape(init).items()
  }
  state = jax.jit(init, out_shardings=shardings)()
  one = functools.partial(_train_one, graphdef=graphdef, o=c.opt, opts=opts, scales=scales)

  def train(state: PyTree, batch: step.Batch) -> tuple[PyTree, step.Metrics]:
    def variant(xs: tuple) -> tuple[PyTree, step.Metrics]:
      new, m = one({'step': state['step'], **xs[0]}, batch, xs[1])
      return {k: v for k, v in new.items() if k != 'step'}, m

    stacked = {k: v for k, v in state.items() if k != 'step'}
    new, m = in_lanes(variant, (stacked, hp), lanes)
    return {'step': state['step'] + 1, **new}, m

  replicated, batch = NamedSharding(mesh, P()), sharding.batch_sharding(mesh)
  train = jax.jit(
    train,
    in_shardings=(shardings, batch),
    out_shardings=(shardings, replicated),
    donate_argnums=0,
  )
  evaluate = functools.partial(step.eval_step, graphdef=graphdef, block_size=opts.loss.block_size)
  stacked_eval = lambda params, batch: in_lanes(lambda p: evaluate(p, batch), params, lanes)
  eval_step = jax.jit(stacked_eval, out_shardings=replicated)
  return step.Steps(graphdef, state, shardings, train, eval_step)


def plan(c: ml_collections.ConfigDict) -> list[tuple[ml_collections.ConfigDict, list]]:
  """sweep.plan, each group's config checked."""
  planned = sweep.plan(c)
  for g, _ in planned:
    validate.check(g)
  return planned


def lanes_of(c: ml_collections.ConfigDict, K: int) -> int:
  """Variants a group's step computes at once: sweep_vmap, else all K."""
  return c.sweep_vmap or K


def check_memory(planned: list[tuple[ml_collections.ConfigDict, list]]) -> None:
  """ValueError, before anything is compiled, when a group's states and the activations of its
  lanes (float32, a rough upper bound) would not fit in the devices' memory."""
  available = _available_memory()
  for c, group in planned:
    cfg = model.ModelConfig(V=c.vocab_size, **c.model)  # the tokenizer's size is not known yet
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.abstract(cfg)[1]))
    rows = c.batch_size // c.grad_accumulation_steps
    block = c.cross_entropy_block_size
    activations = host.step_bytes(rows, cfg.L, cfg.D, cfg.F, cfg.H, cfg.N, cfg.V, block)
    K, lanes = len(group), lanes_of(c, len(group))
    state = 4 * params  # params, grads, moments
    need = K * state + lanes * activations
    if need > available:
      raise ValueError(
        f'sweep: a group of {K} variants needs about {need / 2**30:.1f} GiB ({K} x '
        f'{state / 2**30:.2f} GiB of state, {lanes} x {activations / 2**30:.2f} GiB of '
        f'activations), more than the {available / 2**30:.1f} GiB available; sweep fewer values '
        'at once, or a smaller model.'
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
