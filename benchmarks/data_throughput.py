"""Tokens per second delivered by the packed training iterator, against what training consumes.

  python benchmarks/data_throughput.py [--corpora=shakespeare,pystdlib] [--batches=500]
      [--workers=1] [--vocab_path=...]

For each built-in corpus: cold (an empty cache: tokenize and write the cache, then iterate) and
warm (open the cache, then iterate), both timed from the start; tokens are the non-padding ones of
`--batches` batches of the default config's shape. The tokenizer is the default-size one trained on
the corpus (not timed) unless `--vocab_path` is given. Last: the tokens per second the default
config's jitted train step consumes on this machine, and the warm/consumed ratio.
"""

import argparse
import os
import statistics
import tempfile
import time

import jax
import ml_collections
import numpy as np

from nanodo import data, sharding
from nanodo.configs import default
from nanodo.corpora import sources, token_cache, tokenizer
from nanodo.model import ModelConfig
from nanodo.step import StepConfig, build_steps


def deliver(
  split: sources.Split, sp, cache_dir: str, c: ml_collections.ConfigDict, batches: int, workers: int
) -> tuple[float, float]:
  """Seconds to open (or build) the cache and draw batches from the iterator; tokens drawn."""
  start = time.perf_counter()
  tokens = token_cache.load(split, sp, cache_dir, workers)
  it = iter(data.train_dataset(tokens, c.model.L, c.batch_size, c.seed, c.packing))
  num_tokens = sum(int(np.sum(next(it)['segment_ids'] > 0)) for _ in range(batches))
  return time.perf_counter() - start, num_tokens


def consumed_tokens_per_sec(c: ml_collections.ConfigDict, V: int, steps: int = 10) -> float:
  """Tokens per second of the default config's train step (median of steps, after warm-up)."""
  cfg = ModelConfig(V=V, **c.model)
  mesh = sharding.make_mesh(1, -1)
  run = build_steps(cfg, StepConfig.of(c), c.opt, c.seed, mesh)
  state = run.state
  rng = np.random.default_rng(0)
  batch = data.as_batch(rng.integers(1, V, (c.batch_size, cfg.L), dtype=np.int32))
  times = []
  with jax.set_mesh(mesh):  # the model splits activations along B over the mesh
    for i in range(steps + 2):
      t = time.perf_counter()
      state, m = run.train_step(state, batch)
      jax.block_until_ready(m)
      if i >= 2:
        times.append(time.perf_counter() - t)
  return c.batch_size * cfg.L / statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--corpora', default='shakespeare,pystdlib')
  parser.add_argument('--batches', type=int, default=500)
  parser.add_argument('--workers', type=int, default=1, help='tokenizing processes')
  parser.add_argument('--vocab_path', default='')
  args = parser.parse_args()
  c = default.get_config()
  workers = args.workers
  print(
    f'batch {c.batch_size} x L {c.model.L}, packing={c.packing}, {args.batches} batches, '
    f'{workers} tokenizing processes'
  )
  print(
    f'{"corpus":12} {"tokens":>10} {"cold s":>7} {"cold tok/s":>11} {"warm s":>7} '
    f'{"warm tok/s":>11}'
  )
  warm_rates = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.corpora.split(','):
      c.ds_name = name
      train_split = sources.get_split(c, 'train')
      sp = (
        tokenizer.load(args.vocab_path)
        if args.vocab_path
        else tokenizer.train(
          train_split.documents(), c.vocab_size, os.path.join(tmp, name + '.model')
        )
      )
      cache_dir = os.path.join(tmp, name)
      cold_s, n = deliver(train_split, sp, cache_dir, c, args.batches, workers)
      warm_s, n = deliver(train_split, sp, cache_dir, c, args.batches, workers)
      total = len(token_cache.load(train_split, sp, cache_dir, workers).ids)
      warm_rates.append(n / warm_s)
      print(
        f'{name:12} {total:>10} {cold_s:7.2f} {n / cold_s:11.0f} {warm_s:7.2f} {n / warm_s:11.0f}',
        flush=True,
      )
  consumed = consumed_tokens_per_sec(c, c.vocab_size)
  print(
    f'default train step consumes {consumed:.0f} tokens/s; warm iterator delivers '
    f'{min(warm_rates) / consumed:.0f}x that (slowest corpus)'
  )


if __name__ == '__main__':
  main()
