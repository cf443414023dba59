"""The training loop: data, state, checkpoints, evaluation, a graceful stop on signals."""

import contextlib
import dataclasses
import os
import signal
import threading

import grain
import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from nanodo import (
  budget,
  checkpoint,
  data,
  hf,
  metrics,
  sharding,
  sources,
  update,
  validate,
  workdir,
)
from nanodo.evaluate import evaluate
from nanodo.model import ModelConfig
from nanodo.progress import Progress, log
from nanodo.token_cache import Tokens
from nanodo.tree import PyTree


class StopSignal:
  """On SIGINT or SIGTERM, records it so that the loop ends after its step with a checkpoint.

  A second signal acts at once. Ignored signals stay ignored; only the main thread can handle
  signals, elsewhere this is a no-op.
  """

  def __init__(self):
    self.name, self._previous = '', {}

  def __enter__(self) -> 'StopSignal':
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) is not signal.SIG_IGN:
          self._previous[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum: int, frame: object) -> None:
    self.name = signal.Signals(signum).name
    signal.signal(signum, self._previous[signum])
    # os.write: print could re-enter a print the main thread was in.
    again = 'send it again to stop at once'
    os.write(2, f'{self.name}: stopping after this step with a checkpoint ({again}).\n'.encode())

  def __exit__(self, *exc: object) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What a run reads: the model config its tokenizer fixes, the token ids, the batches."""

  cfg: ModelConfig
  train_tokens: Tokens
  eval_tokens: Tokens
  batches: grain.DatasetIterator
  eval_data: data.EvalData
  batch_sharding: jax.sharding.NamedSharding


def train_and_evaluate(c: ConfigDict) -> dict[str, float]:
  """Trains c.opt.num_train_steps steps (resuming if possible); returns the final eval.

  One run at a time per workdir (its processes together). SIGINT or SIGTERM end the run after
  the current step and a checkpoint; it then returns {}.
  """
  c = hf.import_config(c)  # hf_init_dir's model keys, and its files checked before any write
  with StopSignal() as stop, contextlib.ExitStack() as held:  # held: the lock, to the end
    # The checks that need the corpus come before any state; a start they refuse leaves the
    # workdir as it found it.
    with workdir.undone_if_refused(c.workdir):
      os.makedirs(c.workdir, exist_ok=True)
      held.enter_context(workdir.lock(c.workdir))
      validate.check_resume(c)  # before anything of the earlier run is replaced
      # Compiled steps are cached in the workdir: a resumed run starts without recompiling.
      compile_cache = os.path.join(c.workdir, workdir.COMPILE_CACHE)
      jax.config.update('jax_compilation_cache_dir', compile_cache)
      mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp)
      inputs = _inputs(c, mesh)
    mngr = checkpoint.manager(os.path.join(c.workdir, workdir.CHECKPOINTS), c.max_to_keep)
    # Closing waits for a save in flight, also when an error or a signal ends the run, and
    # raises checkpoint.SaveError if it failed. Steps are traced with the mesh in context: the
    # model splits activations along B over it.
    with checkpoint.closing(mngr), jax.set_mesh(mesh):
      return _train(c, inputs, mngr, stop)


def _inputs(c: ConfigDict, mesh: jax.sharding.Mesh) -> Inputs:
  """The tokenizer, token caches and batches of c; ValueError if the corpus cannot serve c."""
  train_split, eval_split = (sources.get_split(c, which) for which in sources.SPLITS)
  sp = workdir.get_tokenizer(c, train_split.documents())
  load = lambda split: data.load_tokens(split, sp, workdir.cache_dir(c), c.tokenize_workers)
  train_tokens, eval_tokens = load(train_split), load(eval_split)
  cfg = ModelConfig(V=sp.vocab_size(), **c.model)
  # Each process reads only its shard of the rows: its part of every global batch.
  shard, batch_sharding = grain.sharding.ShardByJaxProcess(), sharding.batch_sharding(mesh)
  ds = data.train_dataset(
    train_tokens, cfg.L, c.batch_size, c.seed, c.packing, shard, batch_sharding
  )
  eval_data = data.eval_data(eval_tokens, cfg.L, c.eval_batch_size, shard)
  return Inputs(cfg, train_tokens, eval_tokens, iter(ds), eval_data, batch_sharding)


def _train(
  c: ConfigDict, inputs: Inputs, mngr: ocp.CheckpointManager, stop: StopSignal
) -> dict[str, float]:
  """The body of train_and_evaluate, in a locked workdir, once the inputs are ready."""
  cfg, batches, eval_data = inputs.cfg, inputs.batches, inputs.eval_data
  batch_sharding = inputs.batch_sharding
  run = update.setup(cfg, c, batch_sharding.mesh)
  state, restored = _restore(c, mngr, run, batches)
  step = int(state['step'])
  if c.train_minutes:
    c, run = budget.apply(c, run, state, batches, eval_data, batch_sharding)
  if jax.process_index() == 0:
    workdir.write_config(c)
    # Rows of steps after the restored one come from a run killed before its next checkpoint.
    metrics.drop_rows_after(c.workdir, step)
  _banner(c, cfg, state['params'], inputs.train_tokens, inputs.eval_tokens)
  if restored:
    log(restored)
  if step < c.opt.num_train_steps:
    log(f'starting at step {step} of {c.opt.num_train_steps}.')
  else:
    log(f'step {step} of {c.opt.num_train_steps}: nothing left to train; evaluating.')

  progress = Progress()
  flops_per_token = metrics.model_flops_per_token(state['params'], cfg.D, cfg.L, cfg.N, cfg.V)
  logger = metrics.StepLogger(c, step, flops_per_token, progress)
  # Steps traced by the profiler: profile_steps of them after the first, which compiles.
  trace = range(step + 1, min(step + 1 + c.profile_steps, c.opt.num_train_steps))
  result = {}
  try:
    while step < c.opt.num_train_steps and not stop.name:
      if trace and step == trace.start:
        jax.profiler.start_trace(c.workdir)
      state, step_metrics = run.train_step(state, next(batches))
      step += 1
      logger.push(step, step_metrics)  # logs the step before while this one runs
      if trace and step == trace.stop:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        log(f'profile of steps {trace.start + 1}-{trace.stop}: {c.workdir}/plugins/profile')
      last = step == c.opt.num_train_steps
      if step % c.checkpoint_every_steps == 0 or last:
        logger.flush()  # a state that diverged is never saved
        checkpoint.save(mngr, step, state, batches)
        logger.restart_clock()  # the next step's rate leaves the save out
      if step % c.eval_every_steps == 0 or last:
        logger.flush()
        result = evaluate(run.eval_step, state['params'], eval_data, batch_sharding, progress)
        logger.evaluation(step, result)
    logger.flush()
    if stop.name and step < c.opt.num_train_steps:
      if mngr.latest_step() != step:
        checkpoint.save(mngr, step, state, batches)
      checkpoint.wait(mngr)  # before saying it is saved; SaveError if it could not be
      resume = 'Run the same command to resume.'
      log(f'Stopped by {stop.name} at step {step}, checkpoint saved. {resume}')
      return {}
    if not result:  # Already trained to the end: evaluate what is there.
      result = evaluate(run.eval_step, state['params'], eval_data, batch_sharding, progress)
      logger.evaluation(step, result)
    return result
  finally:
    progress.close()
    logger.close()


def _restore(
  c: ConfigDict, mngr: ocp.CheckpointManager, run: update.Setup, batches: grain.DatasetIterator
) -> tuple[PyTree, str]:
  """The workdir's last checkpoint; else checkpoint_restore_dir's, hf_init_dir's weights, step 0.

  Also the line that says which checkpoint it is and where from; '' for the initial state.
  """
  what = '(model, optimizer, data position)'
  if mngr.latest_step() is not None:
    state = checkpoint.restore(mngr, run.state, run.shardings, batches)
    return state, f'resumed from checkpoint {int(state["step"])} in {mngr.directory} {what}'
  if c.hf_init_dir:
    params = jax.device_put(hf.import_params(c, run.state['params']), run.shardings['params'])
    # The optimizers' initial states hold zeros of the parameters' shapes, not their values.
    return {**run.state, 'params': params}, f'step 0 parameters: the weights of {c.hf_init_dir}'
  if not c.checkpoint_restore_dir:
    return run.state, ''
  other = checkpoint.manager(os.path.join(c.checkpoint_restore_dir, workdir.CHECKPOINTS))
  with contextlib.closing(other):
    state = checkpoint.restore(other, run.state, run.shardings, batches, set_aside=False)
    return state, f'starting from checkpoint {int(state["step"])} in {other.directory} {what}'


def _banner(
  c: ConfigDict, cfg: ModelConfig, params: PyTree, train: Tokens, held_out: Tokens
) -> None:
  """The run's start-up lines: the model, the devices, the data and the tokenizer."""
  n = {k: v / 1e6 for k, v in metrics.param_counts(params).items()}
  sizes = f'{n["embedding"]:.2f}M embedding, {n["non_embedding"]:.2f}M non-embedding'
  shape = f'D{cfg.D} H{cfg.H} N{cfg.N} F{cfg.F} L{cfg.L} V{cfg.V} {cfg.dtype}'
  log(f'model: {n["all"]:.2f}M parameters ({sizes}); {shape}')
  mesh = dict(jax.sharding.get_abstract_mesh().shape)  # the mesh in context
  devices = f'{jax.device_count()} {jax.devices()[0].platform} device(s)'
  log(f'mesh: {mesh} over {devices}, {jax.process_count()} process(es)')
  docs = lambda t: f'{len(t.offsets) - 1} {"train" if t is train else "held-out"} documents'
  tokens = f'{len(train.ids) / 1e6:.2f}M tokens, {c.packing}'
  text = f'{docs(train)} ({tokens}), {docs(held_out)} ({held_out.num_bytes / 1e6:.2f}M bytes)'
  log(f'data: {c.ds_name}, {text}; tokenizer: {workdir.tokenizer_path(c)}, {cfg.V} pieces')
