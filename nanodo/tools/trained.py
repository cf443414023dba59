"""A trained run read back: its config, its tokenizer and the parameters of a checkpoint."""

import dataclasses
import os

import jax
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nanodo import sharding
from nanodo.corpora import tokenizer
from nanodo.ground.tree import PyTree
from nanodo.infra import checkpoint, workdir
from nanodo.model import ModelConfig, abstract
from nanodo.research import report, sweep


def one_process(command: str) -> None:
  """ValueError in a program of several processes (jax.distributed): each would gather the
  weights and write the same file; command is the one to run instead, once."""
  if jax.process_count() > 1:
    many = f'this program has {jax.process_count()} (jax.process_count())'
    raise ValueError(
      f'nanodo export runs as one process; {many}: run `{command}` once, on one host.'
    )


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained run's checkpoint: model config, graph, parameters, tokenizer, step, run config."""

  cfg: ModelConfig
  graphdef: nnx.GraphDef
  params: PyTree
  sp: tokenizer.Tokenizer
  step: int
  config: ml_collections.ConfigDict


def variant_of(path: str, variant: int | None) -> tuple[str, int | None, int]:
  """The workdir of a run; of a sweep's variant (default: the one of lowest held-out loss), its
  group's, its place in the group's stack and the stack's size. ValueError if it is not there."""
  found = sweep.read(path)
  if found is None:
    if variant is not None:
      raise ValueError(f'variant={variant} is not valid: workdir={path!r} holds no sweep.')
    return path, None, 1
  if variant is None:
    best = [g['best'] for g in report.build(path)['groups'] if g['best']]
    if not best:
      raise ValueError(f'workdir={path!r}: no variant of its sweep has been evaluated yet.')
    variant = min(best, key=lambda b: b['eval_loss'])['id']
  if not 0 <= variant < len(found):
    raise ValueError(f'variant={variant} is not valid: the sweep has variants 0-{len(found) - 1}.')
  v = found[variant]
  size = sum(u.group == v.group for u in found)
  return os.path.join(path, sweep.GROUPS, str(v.group)), v.index, size


def load(path: str, step: int | None = None, variant: int | None = None) -> Trained:
  """The parameters of a checkpoint (default: the latest) of the run in path, on every device;
  of a sweep, those of one variant (variant_of)."""
  path, index, K = variant_of(path, variant)
  c = workdir.run_config(path)
  mngr = checkpoint.manager(os.path.join(path, workdir.CHECKPOINTS))
  try:
    steps = sorted(mngr.all_steps()) if os.path.isdir(mngr.directory) else []
    if not steps:
      raise ValueError(f'workdir={path!r} has no checkpoint yet; train first.')
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ValueError(f'step={step} has no checkpoint in {path!r}; saved steps: {steps}.')
    vocab = tokenizer_path(c)
    if vocab is None:
      raise ValueError(f'workdir={path!r} has neither {workdir.TOKENIZER} nor a vocab_path.')
    sp = tokenizer.load(vocab)
    cfg = ModelConfig(V=c.vocab_size if c.hf_init_dir else sp.vocab_size(), **c.model)
    graphdef, params = abstract(cfg)
    mesh = sharding.make_mesh(1, jax.device_count())
    shardings = sharding.state_shardings(params, mesh)
    key = 'ema' if c.opt.get('ema_decay') else 'params'  # the weights the run evaluated
    if index is None:
      params = checkpoint.restore_params(mngr, step, params, shardings, key)
    else:  # the group's stack, replicated, then the variant's slice
      stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((K, *x.shape), x.dtype), params)
      replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), stacked)
      stack = checkpoint.restore_params(mngr, step, stacked, replicated, key)
      params = jax.tree.map(lambda x, s: jax.device_put(x[index], s), stack, shardings)
  finally:
    mngr.close()
  return Trained(cfg, graphdef, params, sp, step, c)


def tokenizer_path(c: ml_collections.ConfigDict) -> str | None:
  """The tokenizer the run c trained with."""
  return workdir.tokenizer_path(c.vocab_path, c.workdir, c.checkpoint_restore_dir, c.hf_init_dir)
