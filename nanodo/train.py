"""Train state, the jitted step, the loop, checkpoints."""

import functools
import os
import time
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import sentencepiece as spm
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nanodo import data, evaluate, metrics, optimizer, sharding, tokenizer
from nanodo.model import ModelConfig, TransformerDecoder
from nanodo.optimizer import PyTree

TOKENIZER_FILE = 'tokenizer.model'


def loss_fn(params: PyTree, graphdef: nnx.GraphDef, in_BxL: jax.Array, label_smoothing: float = 0.0,
            z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training objective and its parts, each a mean over non-padding targets.

  'loss' is always the plain next-token cross-entropy, so curves stay comparable; label smoothing
  and the z-loss (on the log-normalizer) are reported on their own when on.
  """
  x_BxL, y_BxL, weights_BxL = evaluate.get_in_out(in_BxL)
  logits_BxLxV = nnx.merge(graphdef, params)(x_BxL)
  logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  mean = lambda v_BxL: jnp.sum(v_BxL * weights_BxL) / jnp.maximum(jnp.sum(weights_BxL), 1.0)
  parts = {'loss': mean(logz_BxL - jnp.take_along_axis(logits_BxLxV, y_BxL[..., None], -1)[..., 0])}
  objective = parts['loss']
  if label_smoothing:
    # Cross-entropy against (1 - s) on the target plus s spread uniformly over the vocabulary.
    parts['smoothed_loss'] = (1 - label_smoothing) * parts['loss'] + label_smoothing * mean(
        logz_BxL - jnp.mean(logits_BxLxV, axis=-1))
    objective = parts['smoothed_loss']
  if z_loss:
    parts['z_loss'] = z_loss * mean(jnp.square(logz_BxL))
    objective += parts['z_loss']
  return objective, parts


def _weighted_grads(params: PyTree, in_BxL: jax.Array, *, graphdef: nnx.GraphDef,
                    label_smoothing: float,
                    z_loss: float) -> tuple[PyTree, dict[str, jax.Array], jax.Array]:
  """Gradient and loss parts of one micro-batch, each times its number of targets; that number.

  Weighted by their targets, micro-batches add up to exactly the mean over the whole batch.
  """
  count = jnp.sum(evaluate.get_in_out(in_BxL)[2])
  weighted = lambda p: jax.tree.map(lambda v: v * count,
                                    loss_fn(p, graphdef, in_BxL, label_smoothing, z_loss))
  (_, parts), grads = jax.value_and_grad(weighted, has_aux=True)(params)
  return grads, parts, count


def _accumulate(sums: tuple, in_BxL: jax.Array, *, params: PyTree, **kwargs) -> tuple[tuple, None]:
  """The running sums of _weighted_grads with one more micro-batch added."""
  return jax.tree.map(jnp.add, sums, _weighted_grads(params, in_BxL, **kwargs)), None


def train_step(state: PyTree, in_BxL: jax.Array, *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               grad_accumulation_steps: int = 1, label_smoothing: float = 0.0,
               z_loss: float = 0.0) -> tuple[PyTree, dict[str, jax.Array]]:
  """One optimizer update on the mean loss over in_BxL: new state and the step's metrics.

  The batch goes through the model as grad_accumulation_steps micro-batches (A), the first on
  its own, the others in a scan (none when A is 1): their gradients are summed in one jit.
  """
  A = grad_accumulation_steps
  B, L = in_BxL.shape
  # Micro-batch i takes rows i, i + A, i + 2A, ...: each device's rows stay on the device.
  in_AxBxL = in_BxL.reshape(B // A, A, L).swapaxes(0, 1)
  kwargs = {'graphdef': graphdef, 'label_smoothing': label_smoothing, 'z_loss': z_loss}
  sums = _weighted_grads(state['params'], in_AxBxL[0], **kwargs)
  sums, _ = jax.lax.scan(functools.partial(_accumulate, params=state['params'], **kwargs), sums,
                         in_AxBxL[1:])
  grads, parts, count = sums
  count = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  step_metrics = {
      **{k: v / count for k, v in parts.items()},
      'learning_rate': schedule(state['step']),
      'grad_norm': metrics.global_norm(grads),
      'update_norm': metrics.global_norm(updates),
      'param_norm': metrics.global_norm(params),
  }
  return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, step_metrics


def jit_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                   schedule: optax.Schedule, shardings: PyTree,
                   batch_sharding: jax.sharding.NamedSharding, grad_accumulation_steps: int = 1,
                   label_smoothing: float = 0.0, z_loss: float = 0.0) -> Callable:
  """train_step jitted once, with the state's shardings and its buffers donated.

  Call it with the mesh in context (jax.set_mesh), so that the model splits activations along B.
  Metrics come back replicated, so that every process can read them.
  """
  step = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                           grad_accumulation_steps=grad_accumulation_steps,
                           label_smoothing=label_smoothing, z_loss=z_loss)
  replicated = NamedSharding(batch_sharding.mesh, P())
  return jax.jit(step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
               mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, PyTree, PyTree]:
  """Graph definition, sharded initial state and its shardings."""
  def init() -> PyTree:
    params = nnx.state(TransformerDecoder(cfg, nnx.Rngs(seed)))
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: TransformerDecoder(cfg, nnx.Rngs(seed))))
  shardings = sharding.state_shardings(jax.eval_shape(init), mesh)
  return graphdef, jax.jit(init, out_shardings=shardings)(), shardings


def _saved_tokenizer(c: ml_collections.ConfigDict) -> str | None:
  """The workdir's (or else the restore dir's) tokenizer file, if there is one."""
  for d in (c.workdir, c.checkpoint_restore_dir):
    if d and os.path.exists(os.path.join(d, TOKENIZER_FILE)):
      return os.path.join(d, TOKENIZER_FILE)
  return None


def get_tokenizer(c: ml_collections.ConfigDict, train_docs: list[str]) -> spm.SentencePieceProcessor:
  """vocab_path; else the workdir's (or restore dir's) tokenizer; else train one.

  Process 0 trains it into the workdir; other processes wait for it, then load it.
  """
  if c.vocab_path:
    return tokenizer.load(c.vocab_path)
  if jax.process_index() == 0 and not _saved_tokenizer(c):
    print(f'Training a {c.vocab_size}-piece SentencePiece tokenizer on {c.ds_name}...', flush=True)
    tokenizer.train(train_docs, c.vocab_size, os.path.join(c.workdir, TOKENIZER_FILE))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('tokenizer saved')
  return tokenizer.load(_saved_tokenizer(c))


def checkpoint_manager(directory: str, max_to_keep: int | None = None) -> ocp.CheckpointManager:
  """Orbax manager of 'state' (model, optimizer, step) and 'data' (Grain iterator) items."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=max_to_keep is not None)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def restore(mngr: ocp.CheckpointManager, state: PyTree, shardings: PyTree,
            data_iter: grain.DatasetIterator) -> PyTree:
  """Latest state of mngr, placed with shardings; data_iter is moved to its position."""
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract),
      data=grain.checkpoint.CheckpointRestore(data_iter)))
  return restored['state']


def _check_finite(step: int, step_metrics: dict[str, float]) -> None:
  if not np.isfinite(step_metrics['loss']):
    raise FloatingPointError(
        f'Loss is {step_metrics["loss"]} at step {step}; stopping. Checkpoints written before '
        'this step are kept.')


def train_and_evaluate(c: ml_collections.ConfigDict) -> dict[str, float]:
  """Trains c.opt.num_train_steps steps (resuming if possible); returns the final eval."""
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp)
  # Steps are traced with the mesh in context: the model splits activations along B over it.
  with jax.set_mesh(mesh):
    return _train_and_evaluate(c, mesh)


def _train_and_evaluate(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict[str, float]:
  os.makedirs(c.workdir, exist_ok=True)
  # Compiled steps are cached in the workdir: a resumed run starts without recompiling.
  jax.config.update('jax_compilation_cache_dir', os.path.join(c.workdir, 'compile_cache'))
  if jax.process_index() == 0:
    with open(os.path.join(c.workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(c.to_json_best_effort(indent=2))
  train_docs, eval_docs = data.load_corpus(c.ds_name)
  sp = get_tokenizer(c, train_docs)
  cfg = ModelConfig(V=sp.vocab_size(), **c.model)
  batch_sharding = sharding.batch_sharding(mesh)

  tx = optimizer.get_optimizer(c.opt)
  graphdef, state, shardings = init_state(cfg, tx, c.seed, mesh)
  step_fn = jit_train_step(graphdef, tx, optimizer.get_schedule(c.opt), shardings, batch_sharding,
                           c.grad_accumulation_steps, c.label_smoothing, c.z_loss)

  # Each process reads only its own rows of every batch.
  data_iter = iter(data.train_dataset(data.encode(sp, train_docs), cfg.L, c.batch_size, c.seed,
                                      jax.process_index(), jax.process_count()))
  eval_data = data.eval_data(sp, eval_docs, cfg.L, c.eval_batch_size)
  mngr = checkpoint_manager(os.path.join(c.workdir, 'checkpoints'), c.max_to_keep)
  if mngr.latest_step() is not None:
    state = restore(mngr, state, shardings, data_iter)
  elif c.checkpoint_restore_dir:
    state = restore(checkpoint_manager(os.path.join(c.checkpoint_restore_dir, 'checkpoints')),
                    state, shardings, data_iter)
  step = int(state['step'])
  num_params = sum(x.size for x in jax.tree.leaves(state['params']))
  metrics.log(f'{num_params / 1e6:.2f}M parameters, {jax.device_count()} devices '
              f'(mesh {dict(mesh.shape)}, {jax.process_count()} processes), '
              f'starting at step {step} of {c.opt.num_train_steps}.')

  writer = metrics.Writer(c.workdir)
  peak_flops = c.peak_tflops * 1e12 or metrics.matmul_flops_per_sec() * jax.device_count()
  log = functools.partial(
      _log, writer, tokens_per_step=c.batch_size * cfg.L, log_every=c.log_every_steps,
      flops_per_token=metrics.model_flops_per_token(state['params'], cfg.D, cfg.L, cfg.N, cfg.V),
      peak_flops=peak_flops)
  pending, t_last = None, time.time()
  result = {}
  while step < c.opt.num_train_steps:
    state, step_metrics = step_fn(state, sharding.global_batch(next(data_iter), batch_sharding))
    step += 1
    # The host reads the previous step's metrics while the device runs this one.
    if pending:
      t_last = log(*pending, t_last)
    pending = (step, step_metrics)
    if step % c.checkpoint_every_steps == 0 or step == c.opt.num_train_steps:
      t_last, pending = log(*pending, t_last), None
      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)))
    if step % c.eval_every_steps == 0 or step == c.opt.num_train_steps:
      result = evaluate.evaluate(graphdef, state['params'], eval_data, batch_sharding)
      writer.write(step, {f'eval_{k}': v for k, v in result.items()})
      t_last = time.time()
  if not result:  # Already trained to the end: evaluate what is there.
    result = evaluate.evaluate(graphdef, state['params'], eval_data, batch_sharding)
    writer.write(step, {f'eval_{k}': v for k, v in result.items()})
  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  return result


def _log(writer: metrics.Writer, step: int, step_metrics: dict[str, jax.Array], t_last: float, *,
         tokens_per_step: int, log_every: int, flops_per_token: float, peak_flops: float) -> float:
  """Writes one step's metrics (fetched from the device) and returns the current time."""
  values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
  _check_finite(step, values)
  now = time.time()
  values['tokens_per_sec'] = tokens_per_step / max(now - t_last, 1e-9)
  # Model FLOPs utilisation: the step's model FLOPs per second over the devices' peak.
  values['mfu'] = values['tokens_per_sec'] * flops_per_token / peak_flops
  writer.write(step, values, echo=step % log_every == 0 or step == 1)
  return now
