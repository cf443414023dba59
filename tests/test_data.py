"""Rows (packed and concatenated), batches, per-process shards, held-out data, bits per byte."""

import io
import math

import grain
import jax
import numpy as np
import pytest
from conftest import VOCAB, tiny_model_config, tokens_of
from flax import nnx

from nanodo import data, evaluate, step
from nanodo.corpora import sources, token_cache, tokenizer
from nanodo.ground.console import Progress
from nanodo.model import TransformerDecoder


def _docs(lengths):
  """Documents of distinct token ids (so each token says where it came from), BOS-free."""
  start = np.cumsum([1, *lengths])
  return [np.arange(s, s + n, dtype=np.int32) for s, n in zip(start, lengths, strict=False)]


def _epoch(ds, num_rows):
  it = iter(ds)
  return [{k: v[0] for k, v in next(it).items()} for _ in range(num_rows)]


def test_pieces_overlap_by_one_and_make_every_target_once():
  offsets = np.array([0, 2, 9, 30, 31 + 7])
  starts, lengths = data.chunks(offsets, L=8)
  assert np.all((lengths >= 2) & (lengths <= 8))
  targets = np.concatenate([np.arange(s + 1, s + n) for s, n in zip(starts, lengths, strict=True)])
  # Every token but each document's first is a target, exactly once.
  expected = np.setdiff1d(np.arange(offsets[-1]), offsets[:-1])
  np.testing.assert_array_equal(np.sort(targets), expected)
  for s, n in zip(starts, lengths, strict=True):  # no piece crosses a document boundary
    assert np.searchsorted(offsets, s, 'right') == np.searchsorted(offsets, s + n - 1, 'right')


@pytest.mark.parametrize('L', [4, 8, 16])
def test_packed_rows_hold_whole_pieces_with_their_own_segments_and_positions(L):
  docs = _docs([1 + (7 * i) % 23 for i in range(40)])
  tokens = tokens_of(docs)
  rows = data.packed_rows(tokens.offsets, L)
  seen = []
  for r in range(len(rows)):
    row = data.read_row(tokens.ids, rows, L, r)
    x, seg, pos = row['x'], row['segment_ids'], row['positions']
    n = int(np.sum(seg > 0))
    assert np.all(seg[:n] > 0) and not np.any(x[n:]) and not np.any(pos[n:])
    assert np.all(np.diff(seg[:n]) >= 0) and seg[0] == 1 and np.all(np.diff(seg[:n]) <= 1)
    for s in range(1, seg.max() + 1):
      piece = x[seg == s]
      np.testing.assert_array_equal(pos[seg == s], np.arange(len(piece)))  # restart per piece
      doc = next(d for d in docs if piece[0] in d)
      start = int(np.flatnonzero(doc == piece[0])[0])
      np.testing.assert_array_equal(piece, doc[start : start + len(piece)])  # one document's run
      seen.extend(piece[1:])
  targets = np.concatenate([d[1:] for d in docs])
  np.testing.assert_array_equal(np.sort(seen), np.sort(targets))  # every target exactly once
  # No two rows could have been one: every pair of rows holds more than L tokens.
  fill = np.add.reduceat(rows.lengths, rows.first[:-1])
  assert np.sort(fill)[0] + np.sort(fill)[1] > L


def test_packing_fills_rows_with_the_longest_pieces_that_fit():
  order, first = data.pack(np.array([3, 8, 5, 2, 2, 6, 1]), L=8)
  rows = [sorted(order[a:b].tolist()) for a, b in zip(first[:-1], first[1:], strict=True)]
  assert rows == [[1], [3, 5], [0, 2], [4, 6]]


def test_concat_rows_cut_the_stream_with_one_token_overlap():
  docs = [np.arange(1, 40, dtype=np.int32), np.arange(100, 138, dtype=np.int32)]
  tokens = tokens_of(docs)
  ds = data.train_dataset(tokens, L=8, batch_size=2, seed=0, packing='concat')
  stream = np.concatenate(docs)
  num_rows = (len(stream) - 1) // 7
  it = iter(ds)
  rows = [
    {k: v[i] for k, v in b.items()}
    for b in (next(it) for _ in range(num_rows // 2))
    for i in range(2)
  ]
  starts = sorted(int(np.flatnonzero(stream == r['x'][0])[0]) for r in rows)
  assert starts == list(range(0, num_rows * 7, 7))
  for r in rows:  # one segment: attention crosses the document boundary, as in the original
    s = int(np.flatnonzero(stream == r['x'][0])[0])
    np.testing.assert_array_equal(r['x'], stream[s : s + 8])
    np.testing.assert_array_equal(r['segment_ids'], np.ones(8))
    np.testing.assert_array_equal(r['positions'], np.arange(8))


def test_epochs_are_shuffled_differently():
  tokens = tokens_of(_docs([199]))
  num_rows = len(data.packed_rows(tokens.offsets, 8))
  rows = _epoch(
    data.train_dataset(tokens, L=8, batch_size=1, seed=0, packing='packed'), 2 * num_rows
  )
  first, second = ([int(r['x'][0]) for r in rows[i : i + num_rows]] for i in (0, num_rows))
  assert sorted(first) == sorted(second) and first != second


def test_corpus_smaller_than_a_batch_is_refused():
  with pytest.raises(ValueError, match='7 rows of L=8 tokens, fewer than a batch of 64'):
    data.train_dataset(tokens_of(_docs([49])), L=8, batch_size=64, seed=0, packing='packed')


@pytest.mark.parametrize('packing', data.PACKINGS)
def test_two_process_shards_are_disjoint_and_cover_every_row(packing):
  tokens = tokens_of(_docs([3 + (5 * i) % 17 for i in range(30)]))
  num_rows = len(data.train_rows(tokens, 8, packing))
  shards = []
  for index in range(2):
    shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2)
    ds = data.train_dataset(tokens, L=8, batch_size=2, seed=0, packing=packing, shard=shard)
    size = len(range(index, num_rows, 2))
    shards.append({tuple(r['x']) for r in _epoch(ds, size)})
    assert len(shards[-1]) == size  # one epoch of a shard: each of its rows once
  assert not shards[0] & shards[1]
  every = {
    tuple(data.read_row(tokens.ids, data.train_rows(tokens, 8, packing), 8, r)['x'])
    for r in range(num_rows)
  }
  assert shards[0] | shards[1] == every


def test_two_processes_together_read_the_batches_of_one():
  tokens = tokens_of(_docs([3 + (5 * i) % 17 for i in range(30)]))
  one = iter(data.train_dataset(tokens, L=8, batch_size=4, seed=1, packing='packed'))
  halves = [
    iter(
      data.train_dataset(
        tokens, L=8, batch_size=4, seed=1, packing='packed', shard=grain.sharding.ShardOptions(i, 2)
      )
    )
    for i in range(2)
  ]
  for _ in range(12):  # past the end of the first epoch
    parts = [next(h) for h in halves]
    for k, v in next(one).items():
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v)


def test_loss_weights_exclude_padding_and_the_next_documents_first_token():
  tokens = tokens_of(_docs([3, 4, 2]))
  rows = data.packed_rows(tokens.offsets, 16)
  assert len(rows) == 1
  batch = data.with_targets({k: v[None] for k, v in data.read_row(tokens.ids, rows, 16, 0).items()})
  x, y, w = (batch[k][0] for k in ('x', 'y', 'weights'))
  seg = batch['segment_ids'][0]
  for i in range(16):
    same = i + 1 < 16 and seg[i] > 0 and seg[i + 1] == seg[i]
    assert w[i] == same
    if same:
      assert y[i] == x[i + 1]
  assert w.sum() == (3 - 1) + (4 - 1) + (2 - 1)


def _tokens(sp, docs, tmp_path):
  split = sources.Split('held-out', 'fingerprint', lambda: iter(docs))
  return token_cache.load(split, sp, str(tmp_path), workers=1)


def test_eval_rows_predict_every_token_once_and_pad_with_zero(tmp_path):
  sp = tokenizer.load(VOCAB)
  docs = ['Friends, Romans, countrymen, lend me your ears;\n' * 3, 'O, pardon me.']
  ed = data.eval_data(_tokens(sp, docs, tmp_path), L=8, batch_size=4)
  ids = [[sp.bos_id(), *x, sp.eos_id()] for x in sp.encode(docs)]
  targets = []
  for b in ed.batches:
    targets.extend(b['y'][b['weights'] > 0])
  np.testing.assert_array_equal(np.sort(targets), np.sort(np.concatenate([x[1:] for x in ids])))
  assert ed.num_bytes == sum(len(d.encode()) for d in docs)
  last = ed.batches[-1]
  assert np.any(last['segment_ids'] == 0) and not np.any(last['x'][last['segment_ids'] == 0])


def test_eval_shards_split_every_global_batch(tmp_path):
  sp = tokenizer.load(VOCAB)
  tokens = _tokens(sp, ['To be, or not to be: that is the question.' * 5, 'Words.'], tmp_path)
  whole = data.eval_data(tokens, L=8, batch_size=4)
  halves = [
    data.eval_data(
      tokens, L=8, batch_size=4, shard=grain.sharding.ShardOptions(shard_index=i, shard_count=2)
    )
    for i in range(2)
  ]
  for b, first, second in zip(whole.batches, *(h.batches for h in halves), strict=True):
    for k in b:
      np.testing.assert_array_equal(np.concatenate([first[k], second[k]]), b[k])


def test_bits_per_byte_matches_a_hand_computation(tmp_path):
  sp = tokenizer.load(VOCAB)
  docs = ['Et tu, Brute? Then fall, Caesar.', 'The fault, dear Brutus, is not in our stars.']
  cfg = tiny_model_config(V=sp.vocab_size(), L=8)
  model = TransformerDecoder(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  ed = data.eval_data(_tokens(sp, docs, tmp_path), L=cfg.L, batch_size=2)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  eval_step = step.jit_eval_step(graphdef, block_size=4)
  result = evaluate.evaluate(eval_step, params, ed, one_device, Progress(io.StringIO()))
  # By hand: each document as one long sequence, scored window by window.
  nll, count = 0.0, 0
  for ids in ([sp.bos_id(), *x, sp.eos_id()] for x in sp.encode(docs)):
    ids = np.asarray(ids)
    for start in range(0, len(ids) - 1, cfg.L - 1):
      window = ids[start : start + cfg.L]
      logp = jax.nn.log_softmax(model(window[None])[0], axis=-1)
      nll -= float(sum(logp[i, window[i + 1]] for i in range(len(window) - 1)))
      count += len(window) - 1
  num_bytes = len(''.join(docs).encode())
  assert result['bits_per_byte'] == pytest.approx(nll / math.log(2) / num_bytes, rel=1e-5)
  assert result['loss'] == pytest.approx(nll / count, rel=1e-5)
  assert result['perplexity'] == pytest.approx(math.exp(nll / count), rel=1e-5)
  assert 0 < result['loss_stderr'] < result['loss']
