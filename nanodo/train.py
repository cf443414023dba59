"""The training loop: a run's start, its steps, checkpoints and evaluations, a stop on signals."""

import copy
import json
import os
from collections.abc import Callable

import jax
from ml_collections import ConfigDict

from nanodo import sharding
from nanodo.corpora.inputs import Inputs, load_inputs
from nanodo.evaluate import evaluate
from nanodo.ground.console import Progress, log
from nanodo.ground.tree import PyTree
from nanodo.infra import budget, checkpoint, metrics, validate, workdir
from nanodo.infra.signals import StopSignal
from nanodo.model import ModelConfig
from nanodo.research import report, stack, sweep
from nanodo.step import StepConfig, Steps, build_steps, evaluated, rescheduled
from nanodo.tools import hf_import


def train_and_evaluate(c: ConfigDict) -> dict:
  """Trains c.opt.num_train_steps steps (resuming if possible); returns the final evaluation.

  c is checked first, then the processes of the run join. One run at a time per workdir; SIGINT
  or SIGTERM end the run after the current step and a checkpoint, and it returns {}. A sweep
  (c.sweep) trains its groups one after another, each a run in a workdir of its own, and
  returns its report.
  """
  c = copy.deepcopy(hf_import.config(c))  # hf_init_dir's model keys, checked with the rest
  validate.check(c)
  groups = stack.plan(c)  # a sweep's groups, each config checked
  sharding.initialize_distributed(c.distributed)
  validate.check_devices(c, jax.device_count())
  if not c.sweep:
    return _run(c)
  stack.check_memory(groups)
  with workdir.claim(c.workdir):
    sweep.start(c)  # the sweep's variants in its workdir, or the same sweep resumed
    for group_config, group in groups:
      if not _run(group_config, group):
        return {}  # stopped by a signal
    return report.write(c.workdir)


def _run(c: ConfigDict, group: list[sweep.Variant] | None = None) -> dict:
  """Trains the run of c, or the stacked variants of a sweep's group."""
  with StopSignal() as stop, workdir.claim(c.workdir) as claim:
    with claim.refusable():  # the checks that need the corpus: a refused start leaves no trace
      validate.check_resume(c)
      budget.read(c.workdir)  # a damaged budget.json, before any work
      mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp)
      inputs = load_inputs(c, mesh)
    # Compiled steps are cached in the workdir: a resumed run starts without recompiling.
    jax.config.update('jax_compilation_cache_dir', os.path.join(c.workdir, workdir.COMPILE_CACHE))
    cfg = ModelConfig(V=inputs.V, **c.model)
    opts = StepConfig.of(c)
    if group:
      steps = stack.build_steps(cfg, opts, c, group, mesh)
    else:
      steps = build_steps(cfg, opts, c.opt, c.seed, mesh)
    checkpoints = os.path.join(c.workdir, workdir.CHECKPOINTS)
    # Closing waits for a save in flight, also when an error or a signal ends the run. Steps are
    # traced with the mesh in context: the model splits activations along B over it.
    with checkpoint.opened(checkpoints, c.max_to_keep) as mngr, jax.set_mesh(mesh):
      restored = (inputs.batches, c.checkpoint_restore_dir)
      state, start = checkpoint.start(mngr, steps.state, steps.shardings, *restored)
      if not start and c.hf_init_dir:
        state, start = hf_import.start(c.hf_init_dir, cfg, state, steps.shardings, c.workdir)
      pace = None
      if c.train_minutes:
        every = c.eval_every_steps
        timed = (steps, state, inputs.batches, inputs.eval_data, inputs.batch_sharding)
        c.opt.num_train_steps, pace = budget.apply(c.workdir, c.train_minutes, every, *timed)
        steps = rescheduled(steps, cfg, c.opt, opts, mesh)  # the schedule over the steps bought
      if jax.process_index() == 0:
        workdir.write_config(c)
        # Rows of steps after the restored one come from a run killed before its next checkpoint.
        metrics.drop_rows_after(c.workdir, int(state['step']))
      params = jax.tree.map(lambda p: p[0], state['params']) if group else state['params']
      metrics.banner(params, cfg, inputs.summary)
      logger = _logger(c, cfg, params, int(state['step']), group)
      paced = pace and (pace, lambda: rescheduled(steps, cfg, c.opt, opts, mesh))
      return _loop(c, inputs, steps, state, start, mngr, stop, logger, paced)


def _logger(
  c: ConfigDict, cfg: ModelConfig, params: PyTree, step: int, group: list | None
) -> metrics.StepLogger:
  """The run's metrics writer and console from step on; a row per variant for a group."""
  config = json.loads(c.to_json_best_effort())
  writer = metrics.Writer(c.workdir, step, config, c.wandb_project, c.wandb_entity)
  flops_per_token = metrics.model_flops_per_token(params, cfg)
  rows = len(group or [0]) * c.batch_size * cfg.L  # a stack trains every variant's rows
  settings = dict(num_steps=c.opt.num_train_steps, log_every=c.log_every_steps, row_tokens=rows)
  settings |= dict(flops_per_token=flops_per_token, peak_tflops=c.peak_tflops, dtype=cfg.dtype)
  if group:
    return stack.SweepLogger([v.id for v in group], writer, Progress(), step, **settings)
  return metrics.StepLogger(writer, Progress(), step, **settings)


def _loop(
  c: ConfigDict,
  inputs: Inputs,
  steps: Steps,
  state: PyTree,
  start: str,
  mngr: checkpoint.Manager,
  stop: StopSignal,
  logger: metrics.StepLogger,
  paced: tuple[budget.Pace, Callable[[], Steps]] | None = None,
) -> dict:
  """Trains from state's step to c.opt.num_train_steps; checkpoints and evaluates on the way.

  paced: a budget's Pace, and the steps scheduled over c.opt.num_train_steps, for the counts it
  decides anew.
  """
  step = int(state['step'])
  total = c.opt.num_train_steps
  if start:
    log(start)
  if step < total:
    log(f'starting at step {step} of {total}.')
  else:
    log(f'step {step} of {total}: nothing left to train; evaluating.')
  batches = inputs.batches
  held_out = (inputs.eval_data, inputs.batch_sharding, logger.progress)
  # Steps traced by the profiler: profile_steps of them after the first, which compiles.
  trace = range(step + 1, min(step + 1 + c.profile_steps, total))
  result = {}
  try:
    if step == 0 and c.eval_at_start:  # the held-out metrics of the initial (or imported) weights
      logger.evaluation(0, evaluate(steps.eval_step, evaluated(state), *held_out))
    while step < total and not stop.name:
      if trace and step == trace.start:
        jax.profiler.start_trace(c.workdir)
      state, step_metrics = steps.train_step(state, next(batches))
      step += 1
      logger.push(step, step_metrics)  # logs the step before while this one runs
      if trace and step == trace.stop:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        log(f'profile of steps {trace.start + 1}-{trace.stop}: {c.workdir}/plugins/profile')
      last = step == total
      if step % c.checkpoint_every_steps == 0 or last:
        logger.flush()  # a state that diverged is never saved
        checkpoint.save(mngr, step, state, batches)
        logger.restart_clock()  # the next step's rate leaves the save out
      if step % c.eval_every_steps == 0 or last:
        logger.flush()
        result = evaluate(steps.eval_step, evaluated(state), *held_out)
        logger.evaluation(step, result)
      if paced and step < total and (decision := paced[0].after_step(step)):
        logger.flush()
        # A resumed run starts from here or later, so every step it trains has the new count's
        # schedule; budget.json gets the count once that checkpoint is written.
        if mngr.latest_step() != step:
          checkpoint.save(mngr, step, state, batches)
        checkpoint.wait(mngr)
        c.opt.num_train_steps = total = decision.num_train_steps
        if jax.process_index() == 0:
          budget.write(c.workdir, decision)
          workdir.write_config(c)
        log(budget.describe(decision, decided_at=step))
        steps = paced[1]()
        logger.retotal(total)
        logger.restart_clock()
    logger.flush()
    if stop.name and step < total:
      if mngr.latest_step() != step:
        checkpoint.save(mngr, step, state, batches)
      checkpoint.wait(mngr)  # before saying it is saved; SaveError if it could not be
      resume = 'Run the same command to resume.'
      log(f'Stopped by {stop.name} at step {step}, checkpoint saved. {resume}')
      return {}
    if not result:  # Already trained to the end: evaluate what is there.
      result = evaluate(steps.eval_step, evaluated(state), *held_out)
      logger.evaluation(step, result)
    return result
  finally:
    logger.close()
