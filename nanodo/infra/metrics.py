"""Step metrics and where they go: JSON lines, TensorBoard and (if configured) Weights & Biases."""

import contextlib
import json
import os
import pathlib
import re
import time
import uuid

import jax
import numpy as np

from nanodo.ground import files
from nanodo.ground.console import Progress, fmt, log
from nanodo.ground.tree import PyTree, path_str
from nanodo.infra import events, peaks, run_record, workdir
from nanodo.model import ModelConfig, head_dim

EMBEDDINGS = r'^(embed_VxD|pos_LxD|head_DxV)$'


def param_counts(params: PyTree) -> dict[str, int]:
  """Parameters in all, in the embeddings (token, position, an untied output head), in the rest."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  total = sum(x.size for _, x in leaves)
  embedding = sum(x.size for path, x in leaves if re.search(EMBEDDINGS, path_str(path)))
  return {'all': total, 'embedding': embedding, 'non_embedding': total - embedding}


def model_flops_per_token(params: PyTree, cfg: ModelConfig) -> float:
  """Training FLOPs of one token: 6·P + 12·N·L·H·K + 6·D·V, P the non-embedding parameters."""
  # Attention counts all L positions (causal masking not discounted); the output projection
  # (tied or not) is the 6·D·V term; embedding lookups cost no FLOPs.
  attention = 12 * cfg.N * cfg.L * cfg.H * head_dim(cfg)
  return 6 * param_counts(params)['non_embedding'] + attention + 6 * cfg.D * cfg.V


def banner(params: PyTree, cfg: ModelConfig, data: str) -> None:
  """The run's start-up lines: its parameters and shape, the devices, the data."""
  n = {k: v / 1e6 for k, v in param_counts(params).items()}
  sizes = f'{n["embedding"]:.2f}M embedding, {n["non_embedding"]:.2f}M non-embedding'
  shape = f'D{cfg.D} H{cfg.H} N{cfg.N} F{cfg.F} L{cfg.L} V{cfg.V} {cfg.dtype}'
  log(f'model: {n["all"]:.2f}M parameters ({sizes}); {shape}')
  mesh = dict(jax.sharding.get_abstract_mesh().shape)  # the mesh in context
  devices = f'{jax.device_count()} {jax.devices()[0].platform} device(s)'
  log(f'mesh: {mesh} over {devices}, {jax.process_count()} process(es)')
  log(f'data: {data}')


def drop_rows_after(workdir_path: str, step: int) -> None:
  """Rewrites workdir/metrics.jsonl, atomically, without rows of later steps or a torn last line."""
  path = os.path.join(workdir_path, workdir.METRICS)
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    with contextlib.suppress(ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
      if json.loads(line)['step'] <= step and line.endswith('\n'):
        kept.append(line)
  if kept != lines:
    files.write_text(path, ''.join(kept))


class Writer:
  """Writes each logged step's metrics to metrics.jsonl, TensorBoard and (if configured) W&B."""

  def __init__(
    self, path: str, step: int, config: dict, wandb_project: str = '', wandb_entity: str = ''
  ):
    """Opens the sinks in the workdir at path and records the hyper-parameters: the run's config,
    package versions, git commit."""
    # Only process 0 writes: every process computes the same metrics.
    self.is_main = jax.process_index() == 0
    self._file = self._tb = self._wandb = None
    if not self.is_main:
      return
    self._path = os.path.join(path, workdir.METRICS)
    self._file = open(self._path, 'a', encoding='utf-8')
    # A resumed run's TensorBoard hides the events of steps after the restored one.
    self._tb = events.Events(path, purge_step=step + 1 if step else None)
    hparams = run_record.append(path, step, config)
    for key, value in hparams.items():
      self._tb.text(f'hparams/{key}', f'```\n{json.dumps(value, indent=2)}\n```', step)
    self._tb.flush()
    if wandb_project:
      self._wandb = _wandb_run(path, wandb_project, wandb_entity, hparams)

  def write(self, step: int, metrics: dict, flush: bool = True, variant: int | None = None) -> None:
    """Writes metrics of one step (a sweep's variant's: tagged v<variant>/ in TensorBoard and W&B);
    TensorBoard's events reach the disk when flush is set."""
    if not self.is_main:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    tagged = {'variant': variant} if variant is not None else {}
    with files.naming(self._path):  # a full disk: the rows before stay whole (drop_rows_after)
      self._file.write(json.dumps({'step': step, **tagged, 'time': time.time(), **metrics}) + '\n')
      self._file.flush()
    tag = '' if variant is None else f'v{variant}/'
    self._tb.scalars({tag + k: v for k, v in metrics.items()}, step)
    if flush:
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log({tag + k: v for k, v in metrics.items()}, step=step)

  def close(self) -> None:
    if self._file:
      self._tb.close()
      with files.naming(self._path):
        self._file.close()
    if self._wandb is not None:
      self._wandb.finish()


def _wandb_run(path: str, project: str, entity: str, hparams: dict) -> object:
  """A W&B run named after the workdir; its id is kept there so that a resumed run continues it."""
  import wandb  # Only when configured: an optional dependency.

  id_path = pathlib.Path(path, workdir.WANDB_ID)
  if not id_path.exists():
    id_path.write_text(uuid.uuid4().hex[:12], encoding='utf-8')
  config = dict(hparams['config'], versions=hparams['versions'], git_commit=hparams['git_commit'])
  return wandb.init(
    project=project,
    entity=entity or None,
    config=config,
    dir=path,
    id=id_path.read_text(encoding='utf-8').strip(),
    resume='allow',
    name=os.path.basename(os.path.abspath(path)),
  )


class StepLogger:
  """Logs each step's metrics one step late, with its wall-clock tokens/s and MFU."""

  # The step metrics shown on the console (all of them go to the metrics files).
  CONSOLE = ('loss', 'learning_rate', 'grad_norm', 'tokens_per_sec', 'target_tokens_per_sec', 'mfu')

  def __init__(
    self,
    writer: Writer,
    progress: Progress,
    step: int,
    num_steps: int,
    log_every: int,
    row_tokens: int,
    flops_per_token: float,
    peak_tflops: float,
    dtype: str,
  ):
    """Logs the steps after step (of num_steps) of row_tokens each, a line every log_every.

    The MFU is measured against peak_tflops, or (0) the devices' peak for matmuls in dtype.
    """
    self.writer = writer
    self.progress = progress
    self.log_every = log_every
    self.task = progress.add('step', num_steps, step, log_every)
    self.row_tokens = row_tokens
    self.flops_per_token = flops_per_token
    self.peak_flops, source = peaks.devices_peak(peak_tflops, dtype)
    log(f'MFU peak: {source}')
    self.pending: tuple[int, dict[str, jax.Array]] | None = None
    # The first step after a start compiles (or loads the compiled step): it gets no rates.
    self.compiled = False
    self.restart_clock()

  def push(self, step: int, step_metrics: dict[str, jax.Array]) -> None:
    """Logs the step before, whose metrics are ready by now, and holds this one."""
    self.flush()
    self.pending = (step, step_metrics)

  def flush(self) -> None:
    """Logs the held step (waiting for it); FloatingPointError if a metric is not finite."""
    if self.pending is None:
      return
    (step, step_metrics), self.pending = self.pending, None
    rows = self.rows(step, jax.device_get(step_metrics))
    now = time.time()
    for variant, values in rows.items():
      if self.compiled:
        seconds = max(now - self.t_last, 1e-9)
        # Rows' tokens, padding included (the model computes them all), and the loss's targets.
        values['tokens_per_sec'] = self.row_tokens / seconds
        values['target_tokens_per_sec'] = values['target_tokens'] / seconds
        # Model FLOPs utilisation: the step's model FLOPs per second over the devices' peak.
        values['mfu'] = values['tokens_per_sec'] * self.flops_per_token / self.peak_flops
      self.writer.write(step, values, flush=step % self.log_every == 0, variant=variant)
    self.compiled = True
    shown = self.console(rows)
    self.progress.update(self.task, step, {k: shown[k] for k in self.CONSOLE if k in shown})
    self.t_last = now

  def rows(self, step: int, step_metrics: dict[str, np.ndarray]) -> dict[int | None, dict]:
    """A step's rows (one, of no variant); FloatingPointError if a value is not finite."""
    values = {k: float(v) for k, v in step_metrics.items()}
    # Stops before a non-finite state is logged as good or saved over a good checkpoint.
    if bad := [f'{k} is {v}' for k, v in values.items() if not np.isfinite(v)]:
      kept = 'Stopped without saving this state; the checkpoints of earlier steps are kept.'
      raise FloatingPointError(f'Training diverged at step {step}: {", ".join(bad)}. {kept}')
    return {None: values}

  def console(self, rows: dict[int | None, dict]) -> dict[str, float]:
    """The values the console shows of a step's rows."""
    return rows[None]

  def retotal(self, num_steps: int) -> None:
    """The run's step count changed (a budget decided it again)."""
    self.progress.retotal(self.task, num_steps)

  def restart_clock(self) -> None:
    """The next step's time starts now: after work that is no step (an evaluation, a save)."""
    self.t_last = time.time()

  def evaluation(self, step: int, result: dict[str, float]) -> None:
    """Writes and shows held-out metrics; the next step's clock starts after them."""
    self.writer.write(step, {f'eval_{k}': v for k, v in result.items()})
    log(f'eval at step {step} | ' + ' | '.join(f'{k} {fmt(v)}' for k, v in result.items()))
    self.restart_clock()

  def close(self) -> None:
    self.progress.close()
    self.writer.close()
