"""Corpus split, rows, batches, held-out data and bits per byte."""

import math

import jax
import numpy as np
import pytest
from conftest import VOCAB, tiny_model_config
from flax import nnx

from nanodo import data, evaluate, tokenizer
from nanodo.model import TransformerDecoder


def test_shakespeare_split_holds_out_every_13th_play():
  train_docs, eval_docs = data.load_corpus('shakespeare')
  assert (len(train_docs), len(eval_docs)) == (35, 3)
  titles = [d.splitlines()[0] for d in eval_docs]
  assert titles == ["# A Midsummer Night's Dream", '# Henry VI, Part 2', '# Julius Caesar']
  assert 370_000 < sum(len(d.encode()) for d in eval_docs) < 390_000
  assert not set(train_docs) & set(eval_docs)


def test_unknown_corpus_is_refused():
  with pytest.raises(ValueError, match="ds_name='nope'.*shakespeare"):
    data.load_corpus('nope')


def test_encode_adds_bos_and_eos():
  sp = tokenizer.load(VOCAB)
  (ids,) = data.encode(sp, ['To be, or not to be'])
  assert ids[0] == sp.bos_id() and ids[-1] == sp.eos_id()
  assert sp.decode(ids[1:-1].tolist()) == 'To be, or not to be'


def test_train_rows_cover_the_stream_and_every_target_once():
  docs = [np.arange(1, 40, dtype=np.int32), np.arange(100, 138, dtype=np.int32)]
  ds = data.train_dataset(docs, L=8, batch_size=2, seed=0)
  stream = np.concatenate(docs)
  num_rows = (len(stream) - 1) // 7
  it = iter(ds)
  rows = np.concatenate([next(it) for _ in range(num_rows // 2)])
  # Targets (all but the first token of a row) tile the stream without overlap.
  starts = sorted(int(np.flatnonzero(stream == r[0])[0]) for r in rows)
  assert starts == list(range(0, num_rows * 7, 7))
  for r in rows:
    s = int(np.flatnonzero(stream == r[0])[0])
    np.testing.assert_array_equal(r, stream[s:s + 8])


def test_epochs_are_shuffled_differently():
  docs = [np.arange(1, 200, dtype=np.int32)]
  it = iter(data.train_dataset(docs, L=8, batch_size=1, seed=0))
  num_rows = 198 // 7
  first = [int(next(it)[0, 0]) for _ in range(num_rows)]
  second = [int(next(it)[0, 0]) for _ in range(num_rows)]
  assert sorted(first) == sorted(second) and first != second


def test_corpus_smaller_than_a_batch_is_refused():
  with pytest.raises(ValueError, match='batch_size=64'):
    data.train_dataset([np.arange(1, 50, dtype=np.int32)], L=8, batch_size=64, seed=0)


def test_eval_rows_predict_every_token_once_and_pad_with_zero():
  sp = tokenizer.load(VOCAB)
  docs = ['Friends, Romans, countrymen, lend me your ears;\n' * 3, 'O, pardon me.']
  ed = data.eval_data(sp, docs, L=8, batch_size=4)
  ids = data.encode(sp, docs)
  _, y, w = evaluate.get_in_out(ed.batches.reshape(-1, 8))
  targets = np.asarray(y)[np.asarray(w) > 0]
  np.testing.assert_array_equal(targets, np.concatenate([x[1:] for x in ids]))
  assert ed.num_bytes == sum(len(d.encode()) for d in docs)


def test_bits_per_byte_matches_a_hand_computation():
  sp = tokenizer.load(VOCAB)
  docs = ['Et tu, Brute? Then fall, Caesar.', 'The fault, dear Brutus, is not in our stars.']
  cfg = tiny_model_config(V=sp.vocab_size(), L=8)
  model = TransformerDecoder(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  ed = data.eval_data(sp, docs, L=cfg.L, batch_size=2)
  result = evaluate.evaluate(graphdef, params, ed, jax.devices()[0])
  # By hand: each document as one long sequence, scored window by window.
  nll, count = 0.0, 0
  for ids in data.encode(sp, docs):
    for start in range(0, len(ids) - 1, cfg.L - 1):
      window = ids[start:start + cfg.L]
      logp = jax.nn.log_softmax(model(window[None])[0], axis=-1)
      nll -= float(sum(logp[i, window[i + 1]] for i in range(len(window) - 1)))
      count += len(window) - 1
  num_bytes = len(''.join(docs).encode())
  assert result['bits_per_byte'] == pytest.approx(nll / math.log(2) / num_bytes, rel=1e-5)
  assert result['loss'] == pytest.approx(nll / count, rel=1e-5)
  assert result['perplexity'] == pytest.approx(math.exp(nll / count), rel=1e-5)
  assert 0 < result['loss_stderr'] < result['loss']
