"""The training loop: data, state, checkpoints, evaluation, a graceful stop on signals."""

import contextlib
import functools
import os
import time
from collections.abc import Iterable

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import sentencepiece as spm
from flax import nnx
from jax.experimental import multihost_utils

from nanodo import (
  checkpoint,
  data,
  evaluate,
  metrics,
  optimizer,
  sharding,
  sources,
  stop,
  token_cache,
  tokenizer,
  update,
  validate,
  workdir,
)
from nanodo.model import ModelConfig
from nanodo.optimizer import PyTree
from nanodo.progress import Progress, fmt

TOKENIZER_FILE = 'tokenizer.model'
# The step metrics shown on the console (all of them go to the metrics files).
CONSOLE_METRICS = ('loss', 'learning_rate', 'grad_norm', 'tokens_per_sec', 'mfu')


def tokenizer_path(c: ml_collections.ConfigDict) -> str | None:
  """vocab_path; else the workdir's (or restore dir's) tokenizer; None when there is none yet."""
  if c.vocab_path:
    return c.vocab_path
  for d in (c.workdir, c.checkpoint_restore_dir):
    if d and os.path.exists(os.path.join(d, TOKENIZER_FILE)):
      return os.path.join(d, TOKENIZER_FILE)
  return None


def get_tokenizer(
  c: ml_collections.ConfigDict, train_docs: Iterable[str]
) -> spm.SentencePieceProcessor:
  """The tokenizer of tokenizer_path; else one trained into the workdir.

  Process 0 trains it; the other processes wait for it, then load it.
  """
  if not tokenizer_path(c) and jax.process_index() == 0:
    print(f'Training a {c.vocab_size}-piece SentencePiece tokenizer on {c.ds_name}...', flush=True)
    tokenizer.train(train_docs, c.vocab_size, os.path.join(c.workdir, TOKENIZER_FILE))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('tokenizer saved')
  path = tokenizer_path(c)
  sp = tokenizer.load(path)
  if not c.vocab_path and sp.vocab_size() != c.vocab_size:
    raise ValueError(
      f'vocab_size={c.vocab_size} is not valid: {os.path.dirname(path)} holds a '
      f'tokenizer of {sp.vocab_size()} pieces; set vocab_size={sp.vocab_size()}.'
    )
  return sp


def _tokens(
  c: ml_collections.ConfigDict, split: sources.Split, sp: spm.SentencePieceProcessor
) -> token_cache.Tokens:
  """A split's tokens from the token cache; process 0 builds it while the others wait."""
  cache_dir = c.cache_dir or os.path.join(c.workdir, 'token_cache')
  if jax.process_index() == 0:
    token_cache.load(split, sp, cache_dir, c.tokenize_workers)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'token cache of {split.name}')
  return token_cache.load(split, sp, cache_dir, c.tokenize_workers)


def _check_finite(step: int, step_metrics: dict[str, float]) -> None:
  """Stops before a non-finite state is logged as good or saved over a good checkpoint."""
  bad = {k: v for k, v in step_metrics.items() if not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
      f'Training diverged at step {step}: {", ".join(f"{k} is {v}" for k, v in bad.items())}. '
      'Stopped without saving this state; the checkpoints of earlier steps are kept.'
    )


def train_and_evaluate(c: ml_collections.ConfigDict) -> dict[str, float]:
  """Trains c.opt.num_train_steps steps (resuming if possible); returns the final eval.

  One run at a time per workdir (its processes together). SIGINT or SIGTERM end the run after
  the current step and a checkpoint; it then returns {}.
  """
  os.makedirs(c.workdir, exist_ok=True)
  # Process 0 holds the lock for all: the others of a run share its workdir.
  held = workdir.lock(c.workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with held:
    validate.check_resume(c)  # before anything of the earlier run is replaced
    mngr = checkpoint.manager(os.path.join(c.workdir, 'checkpoints'), c.max_to_keep)
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp)
    # Closing waits for a save in flight, also when an error or a signal ends the run. Steps are
    # traced with the mesh in context: the model splits activations along B over it.
    with stop.StopSignal() as stop_signal, contextlib.closing(mngr), jax.set_mesh(mesh):
      return _train(c, mngr, stop_signal, mesh)


def _train(
  c: ml_collections.ConfigDict,
  mngr: ocp.CheckpointManager,
  stop_signal: stop.StopSignal,
  mesh: jax.sharding.Mesh,
) -> dict[str, float]:
  """The body of train_and_evaluate, in a locked workdir."""
  # Compiled steps are cached in the workdir: a resumed run starts without recompiling.
  jax.config.update('jax_compilation_cache_dir', os.path.join(c.workdir, 'compile_cache'))
  train_split, eval_split = (sources.get_split(c, which) for which in sources.SPLITS)
  sp = get_tokenizer(c, train_split.documents())
  train_tokens, eval_tokens = (_tokens(c, split, sp) for split in (train_split, eval_split))
  cfg = ModelConfig(V=sp.vocab_size(), **c.model)
  batch_sharding = sharding.batch_sharding(mesh)

  tx = optimizer.get_optimizer(c.opt)
  graphdef, state, shardings = update.init_state(cfg, tx, c.seed, mesh)
  step_fn = update.jit_train_step(
    graphdef,
    tx,
    optimizer.get_schedule(c.opt),
    shardings,
    batch_sharding,
    label_smoothing=c.label_smoothing,
    z_loss=c.z_loss,
    layer_stats=c.log_internal_metrics,
    grad_accumulation_steps=c.grad_accumulation_steps,
    cross_entropy_block_size=c.cross_entropy_block_size,
  )

  # Each process reads only its shard of the rows: its part of every global batch.
  shard = grain.sharding.ShardByJaxProcess()
  data_iter = iter(data.train_dataset(train_tokens, cfg.L, c.batch_size, c.seed, c.packing, shard))
  eval_data = data.eval_data(eval_tokens, cfg.L, c.eval_batch_size, shard)
  if mngr.latest_step() is not None:
    state = checkpoint.restore(mngr, state, shardings, data_iter)
  elif c.checkpoint_restore_dir:
    other = checkpoint.manager(os.path.join(c.checkpoint_restore_dir, 'checkpoints'))
    with contextlib.closing(other):
      state = checkpoint.restore(other, state, shardings, data_iter, set_aside=False)
  step = int(state['step'])
  is_main = jax.process_index() == 0
  if is_main:
    workdir.write_config(c)
    # Rows of steps after the restored one come from a run killed before its next checkpoint.
    metrics.drop_rows_after(c.workdir, step)
  # Only process 0 shows progress: the others would repeat it.
  progress = Progress() if is_main else Progress(open(os.devnull, 'w'), bar=False)
  counts = metrics.param_counts(state['params'])
  progress.log(
    f'model: {counts["all"] / 1e6:.2f}M parameters ({counts["embedding"] / 1e6:.2f}M '
    f'embedding, {counts["non_embedding"] / 1e6:.2f}M non-embedding); D{cfg.D} H{cfg.H} '
    f'N{cfg.N} F{cfg.F} L{cfg.L} V{cfg.V} {cfg.dtype}'
  )
  progress.log(
    f'mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} '
    f'device(s), {jax.process_count()} process(es)'
  )
  progress.log(
    f'data: {c.ds_name}, {len(train_tokens.offsets) - 1} train documents '
    f'({len(train_tokens.ids) / 1e6:.2f}M tokens, {c.packing}), '
    f'{len(eval_tokens.offsets) - 1} held-out ({eval_data.num_bytes / 1e6:.2f}M bytes); '
    f'tokenizer: {tokenizer_path(c)}, {cfg.V} pieces'
  )
  progress.log(f'starting at step {step} of {c.opt.num_train_steps}.')

  writer = metrics.Writer(c, step)
  peak_flops = c.peak_tflops * 1e12 or metrics.matmul_flops_per_sec() * jax.device_count()
  task = progress.add('step', c.opt.num_train_steps, step, c.log_every_steps)
  log = functools.partial(
    _log,
    writer,
    progress,
    task,
    tokens_per_step=c.batch_size * cfg.L,
    log_every=c.log_every_steps,
    peak_flops=peak_flops,
    flops_per_token=metrics.model_flops_per_token(state['params'], cfg.D, cfg.L, cfg.N, cfg.V),
  )
  # Steps traced by the profiler: profile_steps of them after the first, which compiles.
  trace = range(step + 1, min(step + 1 + c.profile_steps, c.opt.num_train_steps))
  pending, t_last = None, time.time()
  result = {}
  try:
    while step < c.opt.num_train_steps and not stop_signal.name:
      if trace and step == trace.start:
        jax.profiler.start_trace(c.workdir)
      state, step_metrics = step_fn(state, sharding.global_batch(next(data_iter), batch_sharding))
      step += 1
      # The host reads the previous step's metrics while the device runs this one.
      if pending:
        t_last = log(*pending, t_last)
      pending = (step, step_metrics)
      if trace and step == trace.stop:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        progress.log(
          f'profile of steps {trace.start + 1}-{trace.stop} written to '
          f'{os.path.join(c.workdir, "plugins", "profile")}'
        )
      if step % c.checkpoint_every_steps == 0 or step == c.opt.num_train_steps:
        t_last, pending = log(*pending, t_last), None
        checkpoint.save(mngr, step, state, data_iter)
      if step % c.eval_every_steps == 0 or step == c.opt.num_train_steps:
        if pending:
          t_last, pending = log(*pending, t_last), None
        result = _evaluate(
          writer, progress, step, graphdef, state['params'], eval_data, batch_sharding
        )
        t_last = time.time()
    if stop_signal.name and step < c.opt.num_train_steps:
      if pending:
        log(*pending, t_last)
      if mngr.latest_step() != step:
        checkpoint.save(mngr, step, state, data_iter)
      progress.log(
        f'Stopped by {stop_signal.name} at step {step}, checkpoint saved. Run the same '
        'command to resume.'
      )
      result = {}
    elif not result:  # Already trained to the end: evaluate what is there.
      result = _evaluate(
        writer, progress, step, graphdef, state['params'], eval_data, batch_sharding
      )
  finally:
    progress.close()
    writer.close()
  return result


def _evaluate(
  writer: metrics.Writer,
  progress: Progress,
  step: int,
  graphdef: nnx.GraphDef,
  params: PyTree,
  eval_data: data.EvalData,
  batch_sharding: jax.sharding.Sharding,
) -> dict[str, float]:
  """Held-out metrics, written and shown."""
  result = evaluate.evaluate(graphdef, params, eval_data, batch_sharding, progress)
  writer.write(step, {f'eval_{k}': v for k, v in result.items()})
  progress.log(f'eval at step {step} | ' + ' | '.join(f'{k} {fmt(v)}' for k, v in result.items()))
  return result


def _log(
  writer: metrics.Writer,
  progress: Progress,
  task: int,
  step: int,
  step_metrics: dict[str, jax.Array],
  t_last: float,
  *,
  tokens_per_step: int,
  log_every: int,
  flops_per_token: float,
  peak_flops: float,
) -> float:
  """Writes one step's metrics (fetched from the device), shows some; returns the current time."""
  values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
  _check_finite(step, values)
  now = time.time()
  values['tokens_per_sec'] = tokens_per_step / max(now - t_last, 1e-9)
  # Model FLOPs utilisation: the step's model FLOPs per second over the devices' peak.
  values['mfu'] = values['tokens_per_sec'] * flops_per_token / peak_flops
  writer.write(step, values, flush=step % log_every == 0)
  progress.update(task, step, {k: values[k] for k in CONSOLE_METRICS})
  return now
