"""The training objective, one optimizer update on it and the held-out sums, jitted on the mesh."""

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nanodo import loss, model, optimizer, sharding
from nanodo.ground import tree
from nanodo.ground.tree import PyTree

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """How a step computes its loss and gradient: the run config's keys of the same names."""

  loss: loss.Options  # label_smoothing, z_loss, cross_entropy_block_size
  grad_accumulation_steps: int
  log_internal_metrics: bool  # per-layer statistics
  log_stability_metrics: bool  # largest attention logits, output logits, log-normalizer
  ema_decay: float = 0.0  # of the weights' moving average in state['ema'] (0: none)

  @classmethod
  def of(cls, c: ml_collections.ConfigDict) -> 'StepConfig':
    options = loss.Options(
      label_smoothing=c.label_smoothing,
      z_loss=c.z_loss,
      squares=False,
      block_size=c.cross_entropy_block_size,
    )
    return cls(
      options,
      c.grad_accumulation_steps,
      c.log_internal_metrics,
      c.log_stability_metrics,
      c.opt.ema_decay,
    )


def loss_fn(
  params: PyTree,
  graphdef: nnx.GraphDef,
  batch: Batch,
  opts: loss.Options,
  internal: bool,
  stability: bool = False,
) -> tuple[jax.Array, tuple[Metrics, Metrics, jax.Array]]:
  """The objective summed over the batch's targets; its parts (sums), layer statistics, count.

  The parts are those of loss.losses; the statistics those of every module's output when
  internal, and those of stability_stats when stability. The logits exist opts.block_size
  tokens at a time.
  """
  decoder = nnx.merge(graphdef, params)
  inputs = (batch['x'], batch['segment_ids'], batch['positions'])
  stats = {}
  if internal or stability:
    decoder.set_attributes(sow_max_logit=stability)
    outputs_of = nnx.Intermediate if internal else None
    h_BxLxD, sown = nnx.capture(decoder.hidden, nnx.Intermediate, method_outputs=outputs_of)(
      *inputs
    )
    maxima = {tree.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(sown)}
    maxima = {p.split('/attn')[0]: x for p, x in maxima.items() if '/max_logit' in p}
    # All the logits at once, for their statistics only: the loss takes them a block at a time.
    logits_BxLxV = jax.lax.stop_gradient(decoder.project(h_BxLxD))
    if internal:
      outputs = nnx.filter_state(sown, lambda path, _: 'max_logit' not in path)
      stats = tree.stats('act', outputs) | tree.stats('act', {'output': logits_BxLxV})
    if stability:
      stats |= stability_stats(maxima, logits_BxLxV, batch['weights'])
  else:
    h_BxLxD = decoder.hidden(*inputs)
  head, out_VxD = decoder.head()
  objective, parts = loss.blockwise(head, h_BxLxD, out_VxD, batch['y'], batch['weights'], opts)
  return objective, (parts, stats, jnp.sum(batch['weights']))


def stability_stats(
  maxima: dict[str, jax.Array], logits_BxLxV: jax.Array, weights_BxL: jax.Array
) -> Metrics:
  """Each layer's largest attention logit, the output logits' largest value and mean, and the
  mean squared log-normalizer (what the z-loss penalises), over the targets."""
  stats = {f'stability/{layer}/max_attention_logit': m for layer, m in maxima.items()}
  logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  stats['stability/output_logit_max'] = jnp.max(logits_BxLxV)
  stats['stability/output_logit_mean'] = jnp.mean(logits_BxLxV)
  count = jnp.maximum(jnp.sum(weights_BxL), 1.0)
  stats['stability/logz_squared'] = jnp.sum(jnp.square(logz_BxL) * weights_BxL) / count
  return stats


def train_step(
  state: PyTree,
  batch: Batch,
  *,
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  opts: StepConfig,
) -> tuple[PyTree, Metrics]:
  """One optimizer update on the mean loss over a batch: new state and the step's metrics.

  The batch goes through the model as grad_accumulation_steps micro-batches (A), the first on
  its own, the others in a scan (none when A is 1). Their sums add up, and are divided by the
  number of targets once: the mean over the whole batch. Layer statistics are means over the
  micro-batches.
  """
  A = opts.grad_accumulation_steps
  params = state['params']
  # Micro-batch i takes rows i, i + A, i + 2A, ...: each device's rows stay on the device.
  micro = jax.tree.map(lambda v_BxL: v_BxL.reshape(-1, A, v_BxL.shape[1]).swapaxes(0, 1), batch)
  grad_fn = jax.grad(loss_fn, has_aux=True)
  sums_of = functools.partial(
    grad_fn,
    graphdef=graphdef,
    opts=opts.loss,
    internal=opts.log_internal_metrics,
    stability=opts.log_stability_metrics,
  )
  sums = sums_of(params, batch=jax.tree.map(lambda v: v[0], micro))
  if A > 1:
    add = lambda total, b: (jax.tree.map(jnp.add, total, sums_of(params, batch=b)), None)
    sums, _ = jax.lax.scan(add, sums, jax.tree.map(lambda v: v[1:], micro))
  grads, (parts, stats, target_tokens) = sums
  count = jnp.maximum(target_tokens, 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  updates, opt_state = tx.update(grads, state['opt_state'], params)
  params = optax.apply_updates(params, updates)
  learning_rate = schedule(state['step'])
  step_metrics = {k: v / count for k, v in parts.items()} | {k: v / A for k, v in stats.items()}
  step_metrics |= {
    'target_tokens': target_tokens,  # the tokens of weight 1: the loss's targets
    'learning_rate': learning_rate,
    'grad_norm': optax.tree.norm(grads),
    'update_norm': optax.tree.norm(updates),
    'param_norm': optax.tree.norm(params),
  }
  if opts.log_internal_metrics:
    # Updates without the learning rate's factor, as the original nanodo logged them.
    scaled = jax.tree.map(lambda u: u / (learning_rate + 1e-20), updates)
    step_metrics |= tree.stats('grads', grads) | tree.stats('params', params)
    step_metrics |= tree.stats('updates', scaled)
  new = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
  if 'ema' in state:  # Polyak averaging: ema + (1 - d) (params - ema)
    new['ema'] = optax.incremental_update(params, state['ema'], 1 - opts.ema_decay)
  return new, step_metrics


def evaluated(state: PyTree) -> PyTree:
  """The weights a state is evaluated with: their moving average where it keeps one."""
  return state['ema'] if 'ema' in state else state['params']


def eval_step(params: PyTree, batch: Batch, *, graphdef: nnx.GraphDef, block_size: int) -> Metrics:
  """Sums over one batch of the held-out loss (the plain cross-entropy), its square, the count."""
  opts = loss.Options(label_smoothing=0.0, z_loss=0.0, squares=True, block_size=block_size)
  _, (parts, _, count) = loss_fn(params, graphdef, batch, opts, internal=False)
  return parts | {'count': count}


def jit_eval_step(graphdef: nnx.GraphDef, block_size: int) -> Callable[[PyTree, Batch], Metrics]:
  """eval_step jitted for a model graph."""
  return jax.jit(functools.partial(eval_step, graphdef=graphdef, block_size=block_size))


class Steps(NamedTuple):
  """A run's sharded initial state and its jitted steps."""

  graphdef: nnx.GraphDef
  state: PyTree
  shardings: PyTree
  train_step: Callable[[PyTree, Batch], tuple[PyTree, Metrics]]
  eval_step: Callable[[PyTree, Batch], Metrics]


def build_steps(
  cfg: model.ModelConfig,
  opts: StepConfig,
  o: ml_collections.ConfigDict,
  seed: int,
  mesh: jax.sharding.Mesh,
) -> Steps:
  """The state of step 0 (seed) sharded over mesh, and the steps of the optimizer config o.

  train_step is jitted once with the state's shardings and its buffers donated; call it with the
  mesh in context (jax.set_mesh), so that the model splits activations along B. Its metrics come
  back replicated, so that every process can read them.
  """
  schedule = optimizer.get_schedule(o)
  tx = optimizer.get_optimizer(o, schedule, model.scales(cfg))
  graphdef, _ = model.abstract(cfg)

  def init() -> PyTree:
    params = nnx.state(model.TransformerDecoder(cfg, nnx.Rngs(seed)))
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
    return state | ({'ema': params} if opts.ema_decay else {})

  shardings = sharding.state_shardings(jax.eval_shape(init), mesh)
  state = jax.jit(init, out_shardings=shardings)()
  train = jit_train_step(graphdef, shardings, mesh, tx, schedule, opts)
  return Steps(graphdef, state, shardings, train, jit_eval_step(graphdef, opts.loss.block_size))


def jit_train_step(
  graphdef: nnx.GraphDef,
  shardings: PyTree,
  mesh: jax.sharding.Mesh,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  opts: StepConfig,
) -> Callable[[PyTree, Batch], tuple[PyTree, Metrics]]:
  """train_step jitted with the state's shardings, its buffers donated; metrics replicated."""
  train = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, opts=opts)
  batch = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  return jax.jit(
    train, in_shardings=(shardings, batch), out_shardings=(shardings, replicated), donate_argnums=0
  )


def rescheduled(
  steps: Steps,
  cfg: model.ModelConfig,
  o: ml_collections.ConfigDict,
  opts: StepConfig,
  mesh: jax.sharding.Mesh,
) -> Steps:
  """steps with a train step for the schedule of o (a budget's step count); the state as it is."""
  schedule = optimizer.get_schedule(o)
  tx = optimizer.get_optimizer(o, schedule, model.scales(cfg))
  train = jit_train_step(steps.graphdef, steps.shardings, mesh, tx, schedule, opts)
  return steps._replace(train_step=train)
