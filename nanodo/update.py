"""The training objective and one optimizer update on it, jitted with the state's shardings."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nanodo import cross_entropy, data, evaluate, metrics, sharding
from nanodo.model import ModelConfig, TransformerDecoder
from nanodo.optimizer import PyTree


def loss_fn(
  params: PyTree,
  graphdef: nnx.GraphDef,
  batch: data.Batch,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
  layer_stats: bool = False,
  cross_entropy_block_size: int = cross_entropy.BLOCK_SIZE,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training objective and its parts, each a mean over targets in their input's document.

  The parts are those of cross_entropy.losses, with layer_stats also the statistics of every
  module's output. The logits exist cross_entropy_block_size tokens at a time.
  """
  _, y_BxL, weights_BxL = evaluate.get_in_out(batch)
  model = nnx.merge(graphdef, params)
  inputs = (batch['x'], batch['segment_ids'], batch['positions'])
  stats = {}
  if layer_stats:
    capture = nnx.capture(model.hidden, nnx.Intermediate, method_outputs=nnx.Intermediate)
    h_BxLxD, outputs = capture(*inputs)
    # All the logits at once, for their statistics only: the loss takes them a block at a time.
    logits_BxLxV = jax.lax.stop_gradient(model.project(h_BxLxD))
    stats = metrics.tree_stats('act', outputs) | metrics.tree_stats('act', {'output': logits_BxLxV})
  else:
    h_BxLxD = model.hidden(*inputs)
  objective, parts = cross_entropy.blockwise(
    h_BxLxD, model.out_VxD(), y_BxL, weights_BxL, label_smoothing, z_loss, cross_entropy_block_size
  )
  count = jnp.maximum(jnp.sum(weights_BxL), 1.0)
  return objective / count, {k: v / count for k, v in parts.items()} | stats


def _weighted_grads(
  params: PyTree,
  batch: data.Batch,
  *,
  graphdef: nnx.GraphDef,
  label_smoothing: float,
  z_loss: float,
  layer_stats: bool,
  cross_entropy_block_size: int,
) -> tuple[PyTree, dict[str, jax.Array], jax.Array]:
  """Gradient and loss parts of one micro-batch, each times its number of targets; that number.

  Weighted by their targets, micro-batches add up to exactly the mean over the whole batch.
  """
  count = jnp.sum(evaluate.get_in_out(batch)[2])
  weighted = lambda p: jax.tree.map(
    lambda v: v * count,
    loss_fn(p, graphdef, batch, label_smoothing, z_loss, layer_stats, cross_entropy_block_size),
  )
  (_, parts), grads = jax.value_and_grad(weighted, has_aux=True)(params)
  return grads, parts, count


def _accumulate(sums: tuple, batch: data.Batch, *, params: PyTree, **kwargs) -> tuple[tuple, None]:
  """The running sums of _weighted_grads with one more micro-batch added."""
  return jax.tree.map(jnp.add, sums, _weighted_grads(params, batch, **kwargs)), None


def train_step(
  state: PyTree,
  batch: data.Batch,
  *,
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
  layer_stats: bool = False,
  grad_accumulation_steps: int = 1,
  cross_entropy_block_size: int = cross_entropy.BLOCK_SIZE,
) -> tuple[PyTree, dict[str, jax.Array]]:
  """One optimizer update on the mean loss over a batch: new state and the step's metrics.

  The batch goes through the model as grad_accumulation_steps micro-batches (A), the first on
  its own, the others in a scan (none when A is 1): their gradients are summed in one jit.
  With layer_stats, the metrics hold per-layer statistics too (of activations: a mean over the
  micro-batches).
  """
  A = grad_accumulation_steps
  # Micro-batch i takes rows i, i + A, i + 2A, ...: each device's rows stay on the device.
  micro = jax.tree.map(lambda v_BxL: v_BxL.reshape(-1, A, v_BxL.shape[1]).swapaxes(0, 1), batch)
  kwargs = {
    'graphdef': graphdef,
    'label_smoothing': label_smoothing,
    'z_loss': z_loss,
    'layer_stats': layer_stats,
    'cross_entropy_block_size': cross_entropy_block_size,
  }
  sums = _weighted_grads(state['params'], jax.tree.map(lambda v: v[0], micro), **kwargs)
  if A > 1:
    sums, _ = jax.lax.scan(
      functools.partial(_accumulate, params=state['params'], **kwargs),
      sums,
      jax.tree.map(lambda v: v[1:], micro),
    )
  grads, parts, count = sums
  count = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  parts = {k: v / count for k, v in parts.items()}
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  learning_rate = schedule(state['step'])
  step_metrics = {
    **parts,
    'learning_rate': learning_rate,
    'grad_norm': metrics.global_norm(grads),
    'update_norm': metrics.global_norm(updates),
    'param_norm': metrics.global_norm(params),
  }
  if layer_stats:
    # Updates without the learning rate's factor, as the original nanodo logged them.
    scaled = jax.tree.map(lambda u: u / (learning_rate + 1e-20), updates)
    step_metrics |= (
      metrics.tree_stats('grads', grads)
      | metrics.tree_stats('params', params)
      | metrics.tree_stats('updates', scaled)
    )
  return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, step_metrics


def jit_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  shardings: PyTree,
  batch_sharding: jax.sharding.NamedSharding,
  *,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
  layer_stats: bool = False,
  grad_accumulation_steps: int = 1,
  cross_entropy_block_size: int = cross_entropy.BLOCK_SIZE,
) -> Callable:
  """train_step jitted once, with the state's shardings and its buffers donated.

  Call it with the mesh in context (jax.set_mesh), so that the model splits activations along B.
  Metrics come back replicated, so that every process can read them.
  """
  step = functools.partial(
    train_step,
    graphdef=graphdef,
    tx=tx,
    schedule=schedule,
    label_smoothing=label_smoothing,
    z_loss=z_loss,
    layer_stats=layer_stats,
    grad_accumulation_steps=grad_accumulation_steps,
    cross_entropy_block_size=cross_entropy_block_size,
  )
  replicated = NamedSharding(batch_sharding.mesh, P())
  return jax.jit(
    step,
    in_shardings=(shardings, batch_sharding),
    out_shardings=(shardings, replicated),
    donate_argnums=0,
  )


def init_state(
  cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, PyTree, PyTree]:
  """Graph definition, sharded initial state and its shardings."""

  def init() -> PyTree:
    params = nnx.state(TransformerDecoder(cfg, nnx.Rngs(seed)))
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: TransformerDecoder(cfg, nnx.Rngs(seed))))
  shardings = sharding.state_shardings(jax.eval_shape(init), mesh)
  return graphdef, jax.jit(init, out_shardings=shardings)(), shardings
