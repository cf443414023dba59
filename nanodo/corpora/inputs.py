"""A run's inputs: its tokenizer, the token caches of its splits, and the batches they feed."""

import dataclasses
import os

import grain
import jax
import ml_collections
from jax.experimental import multihost_utils

from nanodo import data, sharding
from nanodo.corpora import sources, token_cache, tokenizer
from nanodo.data import Tokens
from nanodo.ground.console import log
from nanodo.infra import workdir


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What a run reads: its tokenizer, the token ids of both splits, their batches."""

  sp: tokenizer.Tokenizer
  train_tokens: Tokens
  eval_tokens: Tokens
  batches: grain.DatasetIterator
  eval_data: data.EvalData
  batch_sharding: jax.sharding.NamedSharding
  summary: str  # the source, its documents and the tokenizer, in a line
  V: int  # the model's vocabulary: the tokenizer's, or an imported model's (may be padded beyond)


def get_tokenizer(
  path: str | None, vocab_size: int, checked: bool, out: str, split: sources.Split
) -> tokenizer.Tokenizer:
  """The tokenizer at path; else one of vocab_size pieces trained on split's documents to out.

  Unless checked (a vocab_path or hf_init_dir given), a tokenizer found at path must have
  vocab_size pieces.
  Process 0 trains it; the other processes wait for it, then load it.
  """
  if path is None and jax.process_index() == 0:
    log(f'Training a {vocab_size}-piece SentencePiece tokenizer on {split.name}...')
    tokenizer.train(split.documents(), vocab_size, out)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('tokenizer saved')
  sp = tokenizer.load(path or out)
  if not checked and sp.vocab_size() != vocab_size:
    held = f'{os.path.dirname(path or out)} holds a tokenizer of {sp.vocab_size()} pieces'
    fix = f'set vocab_size={sp.vocab_size()}'
    raise ValueError(f'vocab_size={vocab_size} is not valid: {held}; {fix}.')
  return sp


def load_inputs(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Inputs:
  """The tokenizer, token caches and batches of c; ValueError if the corpus cannot serve c."""
  src = sources.Source.of(c)
  train_split = sources.get_split(src, 'train')
  eval_split = sources.get_split(src, 'eval')
  found = workdir.tokenizer_path(c.vocab_path, c.workdir, c.checkpoint_restore_dir, c.hf_init_dir)
  out = os.path.join(c.workdir, workdir.TOKENIZER)
  checked = bool(c.vocab_path or c.hf_init_dir)
  sp = get_tokenizer(found, c.vocab_size, checked, out, train_split)
  cache_dir = workdir.cache_dir(c.cache_dir, c.workdir)
  train_tokens = token_cache.load_shared(train_split, sp, cache_dir, c.tokenize_workers)
  eval_tokens = token_cache.load_shared(eval_split, sp, cache_dir, c.tokenize_workers)
  # Each process reads only its shard of the rows: its part of every global batch.
  shard = grain.sharding.ShardByJaxProcess()
  batch_sharding = sharding.batch_sharding(mesh)
  L = c.model.L
  ds = data.train_dataset(train_tokens, L, c.batch_size, c.seed, c.packing, shard, batch_sharding)
  eval_data = data.eval_data(eval_tokens, L, c.eval_batch_size, shard)
  documents = lambda t, which: f'{len(t.offsets) - 1} {which} documents'
  held_out = f'{documents(eval_tokens, "held-out")} ({eval_tokens.num_bytes / 1e6:.2f}M bytes)'
  tokens = f'{len(train_tokens.ids) / 1e6:.2f}M tokens, {c.packing}'
  train = f'{documents(train_tokens, "train")} ({tokens})'
  summary = f'{c.ds_name}, {train}, {held_out}; tokenizer: {found or out}, {sp.vocab_size()} pieces'
  V = c.vocab_size if c.hf_init_dir else sp.vocab_size()
  return Inputs(sp, train_tokens, eval_tokens, iter(ds), eval_data, batch_sharding, summary, V)
