"""The real default run: the promise of the README, checked end to end (slow)."""

import glob
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pytest

from nanodo import train
from nanodo.corpora import token_cache, tokenizer
from nanodo.data import Tokens
from nanodo.infra import workdir
from nanodo.tools import trained

# The bigram's interpolation weights tried; the best on the held-out split is the baseline.
MUS = tuple(2.0**k for k in range(-2, 11))


def _pairs(tokens: Tokens) -> tuple[np.ndarray, np.ndarray]:
  """Every target (each token after its document's first, EOS included) and the one before it."""
  ids = np.asarray(tokens.ids, np.int64)
  is_target = np.ones(len(ids), bool)
  is_target[tokens.offsets[:-1]] = False
  targets = np.flatnonzero(is_target)
  return ids[targets - 1], ids[targets]


def bigram_bits_per_byte(
  train_tokens: Tokens, held_out: Tokens, V: int, mus: Sequence[float] = MUS
) -> float:
  """Held-out bits per byte of a token bigram fitted on train_tokens, at the best weight of mus.

  p(b | a) = (c(a, b) + mu p(b)) / (c(a) + mu), counted over the pairs within each document;
  the unigram p(b) is add-one smoothed over the V ids, so no held-out token has probability 0.
  """
  a, b = _pairs(train_tokens)
  unigram = (np.bincount(b, minlength=V) + 1) / (len(b) + V)
  context = np.bincount(a, minlength=V)
  codes, counts = np.unique(a * V + b, return_counts=True)
  a, b = _pairs(held_out)
  i = np.searchsorted(codes, a * V + b).clip(max=len(codes) - 1)
  pair = np.where(codes[i] == a * V + b, counts[i], 0)
  bits = [-np.log2((pair + mu * unigram[b]) / (context[a] + mu)).sum() for mu in mus]
  return min(bits) / held_out.num_bytes


def test_bigram_baseline_is_the_hand_count_at_the_best_weight():
  # ids 0..2; documents split by their offsets. Train pairs: (0, 1), (1, 2) and (0, 2); not the
  # (2, 0) across documents. Targets 1, 2, 2: add-one unigram (1, 2, 3) / 6.
  train_tokens = Tokens(np.array([0, 1, 2, 0, 2]), np.array([0, 3, 5]), num_bytes=0)
  held_out = Tokens(np.array([0, 1, 2]), np.array([0, 3]), num_bytes=3)
  # mu = 1: p(1 | 0) = (1 + 2/6) / (2 + 1) = 4/9, p(2 | 1) = (1 + 3/6) / (1 + 1) = 3/4: 1/3.
  # mu = 2: p(1 | 0) = (1 + 4/6) / (2 + 2) = 5/12, p(2 | 1) = (1 + 6/6) / (1 + 2) = 2/3: 5/18.
  by_hand = {1.0: math.log2(3), 2.0: math.log2(18 / 5)}
  for mu, bits in by_hand.items():
    assert bigram_bits_per_byte(train_tokens, held_out, 3, [mu]) == pytest.approx(bits / 3)
  best = bigram_bits_per_byte(train_tokens, held_out, 3, [2.0, 1.0])
  assert best == pytest.approx(math.log2(3) / 3)  # mu = 1, the better weight


def _cached(path: str, which: str) -> Tokens:
  """The token ids of a run's 'train' or 'eval' split, from the token cache it wrote."""
  [meta] = glob.glob(os.path.join(path, workdir.TOKEN_CACHE, f'*-{which}-*.json'))
  return token_cache.read(meta.removesuffix('.json'), {})


@pytest.mark.slow
def test_default_run_beats_the_bigram_baseline_on_held_out_plays(tmp_path):
  run = tmp_path / 'run'
  main = os.path.join(os.path.dirname(train.__file__), 'main.py')
  config = os.path.join(os.path.dirname(train.__file__), 'configs', 'default.py')
  out = subprocess.run(
    [sys.executable, main, f'--config={config}', f'--config.workdir={run}'],
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  with open(run / 'metrics.jsonl', encoding='utf-8') as f:
    evals = [r for r in map(json.loads, f) if 'eval_bits_per_byte' in r]
  assert evals[-1]['eval_bits_per_byte'] <= 1.95
  # The evaluation's held-out targets and bytes, scored by a bigram of the train split: about 2.08.
  V = tokenizer.load(trained.tokenizer_path(workdir.run_config(str(run)))).vocab_size()
  baseline = bigram_bits_per_byte(_cached(str(run), 'train'), _cached(str(run), 'eval'), V)
  assert evals[-1]['eval_bits_per_byte'] < baseline, baseline
