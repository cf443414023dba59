"""A trained run read back: its config, its tokenizer and the parameters of a checkpoint."""

import dataclasses
import os

import jax
import ml_collections
import sentencepiece as spm
from flax import nnx

from nanodo import sharding
from nanodo.corpora import tokenizer
from nanodo.ground.tree import PyTree
from nanodo.infra import checkpoint, workdir
from nanodo.model import ModelConfig, abstract


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained run's checkpoint: model config, graph, parameters, tokenizer, step, run config."""

  cfg: ModelConfig
  graphdef: nnx.GraphDef
  params: PyTree
  sp: spm.SentencePieceProcessor
  step: int
  config: ml_collections.ConfigDict


def load(path: str, step: int | None = None) -> Trained:
  """The parameters of a checkpoint (default: the latest) of the run in path, on every device."""
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
    cfg = ModelConfig(V=sp.vocab_size(), **c.model)
    graphdef, params = abstract(cfg)
    mesh = sharding.make_mesh(1, jax.device_count())
    shardings = sharding.state_shardings(params, mesh)
    params = checkpoint.restore_params(mngr, step, params, shardings)
  finally:
    mngr.close()
  return Trained(cfg, graphdef, params, sp, step, c)


def tokenizer_path(c: ml_collections.ConfigDict) -> str | None:
  """The tokenizer the run c trained with."""
  return workdir.tokenizer_path(c.vocab_path, c.workdir, c.checkpoint_restore_dir, c.hf_init_dir)
