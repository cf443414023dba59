"""Token caches -> rows of length L -> batches (Grain) -> global batches on the device mesh.

A batch is a dict of B×L arrays: 'x' (token ids, 0: padding), 'segment_ids' (1, 2, ... per
document piece in the row, 0 on padding), 'positions' (each piece's own positions from 0), 'y'
(the next-token targets) and 'weights' (1.0 where a target counts in the loss). Each process
reads only its slice of every batch.
"""

import bisect
import dataclasses

import grain
import jax
import numpy as np

# 'packed': document pieces packed into rows, attention and positions kept within each piece;
# 'concat': the original's concatenate-and-split, one segment per row (attention crosses documents).
PACKINGS = ('packed', 'concat')
ONE_PROCESS = grain.sharding.NoSharding()
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Tokens:
  """A split's token ids, document after document; offsets[d] is where document d starts."""

  ids: np.ndarray
  offsets: np.ndarray
  num_bytes: int  # UTF-8 bytes of the documents' text, for bits per byte


@dataclasses.dataclass(frozen=True)
class Rows:
  """Row r: spans (its segments) first[r] to first[r + 1]; span s: ids[starts[s]:][:lengths[s]]."""

  starts: np.ndarray
  lengths: np.ndarray
  first: np.ndarray

  def __len__(self) -> int:
    return len(self.first) - 1


def chunks(offsets: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
  """Starts and lengths of each document's pieces of at most L tokens, overlapping by one token."""
  # A piece's first token is context only, so every token but a document's first is a target once.
  n_D = np.diff(offsets)
  k_D = np.maximum(1, -(-(n_D - 1) // (L - 1)))
  doc_C = np.repeat(np.arange(len(n_D)), k_D)
  j_C = np.arange(k_D.sum()) - np.repeat(np.cumsum(k_D) - k_D, k_D)
  starts_C = offsets[doc_C] + j_C * (L - 1)
  return starts_C, np.minimum(L, offsets[doc_C + 1] - starts_C)


def pack(lengths: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
  """Pieces in row order and where each row starts: rows of L tokens filled longest first."""
  stacks = {int(n): list(np.flatnonzero(lengths == n)[::-1]) for n in np.unique(lengths)}
  sizes = sorted(stacks)  # lengths with pieces left
  order, first = [], [0]
  while sizes:
    room = L
    while (i := bisect.bisect_right(sizes, room) - 1) >= 0:
      n = sizes[i]
      take = min(len(stacks[n]), room // n)
      order.extend(stacks[n][-take:])
      del stacks[n][-take:]
      room -= take * n
      if not stacks[n]:
        sizes.pop(i)
    first.append(len(order))
  return np.asarray(order, np.int64), np.asarray(first, np.int64)


def packed_rows(offsets: np.ndarray, L: int) -> Rows:
  """Every document's pieces, packed into rows; no piece spans two documents."""
  starts, lengths = chunks(offsets, L)
  order, first = pack(lengths, L)
  return Rows(starts[order], lengths[order], first)


def read_row(ids: np.ndarray, rows: Rows, L: int, r: int) -> Batch:
  """Row r: its tokens, segment ids and per-segment positions, padded with zeros to L."""
  starts, lengths = (a[rows.first[r] : rows.first[r + 1]] for a in (rows.starts, rows.lengths))
  n = int(lengths.sum())
  positions = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  row = {k: np.zeros(L, np.int32) for k in ('x', 'segment_ids', 'positions')}
  row['x'][:n] = ids[np.repeat(starts, lengths) + positions]
  row['segment_ids'][:n] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
  row['positions'][:n] = positions
  return row


def with_targets(batch: Batch) -> Batch:
  """The batch with next-token targets, weighted 1 where the target is in its input's segment."""
  x_BxL, segment_ids_BxL = batch['x'], batch['segment_ids']
  y_BxL = np.pad(x_BxL[:, 1:], ((0, 0), (0, 1)))
  next_segment_ids_BxL = np.pad(segment_ids_BxL[:, 1:], ((0, 0), (0, 1)))
  # Padding (segment 0) and the first token of the next document are never targets.
  weights_BxL = (next_segment_ids_BxL == segment_ids_BxL) & (segment_ids_BxL != 0)
  return {**batch, 'y': y_BxL, 'weights': weights_BxL.astype(np.float32)}


def read_rows(ids: np.ndarray, rows: Rows, L: int, r_B: np.ndarray) -> Batch:
  """Rows r_B as a batch."""
  read = [read_row(ids, rows, L, r) for r in r_B]
  return with_targets({k: np.stack([row[k] for row in read]) for k in read[0]})


def global_batch(local: Batch, sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """One global batch on the mesh from each process's rows (with one process: a device_put)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def _mine(batch_size: int, shard: grain.sharding.ShardOptions) -> slice:
  """This process's rows of every global batch."""
  local = batch_size // shard.shard_count
  return slice(shard.shard_index * local, (shard.shard_index + 1) * local)


def as_batch(x_BxL: np.ndarray) -> Batch:
  """Rows of one document each (0: padding), as a batch."""
  x_BxL = np.asarray(x_BxL, np.int32)
  positions_BxL = np.broadcast_to(np.arange(x_BxL.shape[1], dtype=np.int32), x_BxL.shape)
  segment_ids_BxL = (x_BxL != 0).astype(np.int32)
  return with_targets({'x': x_BxL, 'segment_ids': segment_ids_BxL, 'positions': positions_BxL})


def train_rows(tokens: Tokens, L: int, packing: str) -> Rows:
  """The training rows of a split for a packing mode (one of PACKINGS)."""
  if packing == 'packed':
    return packed_rows(tokens.offsets, L)
  # The original's rows: the token stream cut into rows of L that overlap by one token.
  num_rows = (len(tokens.ids) - 1) // (L - 1)
  return Rows(np.arange(num_rows) * (L - 1), np.full(num_rows, L), np.arange(num_rows + 1))


def train_dataset(
  tokens: Tokens,
  L: int,
  batch_size: int,
  seed: int,
  packing: str,
  shard: grain.sharding.ShardOptions = ONE_PROCESS,
  sharding: jax.sharding.NamedSharding | None = None,
) -> grain.IterDataset:
  """This shard's part of every global batch (on sharding's mesh if given), reshuffled per epoch."""
  rows = train_rows(tokens, L, packing)
  if len(rows) < batch_size:
    fewer = f'The corpus has {len(rows)} rows of L={L} tokens, fewer than a batch of {batch_size}'
    raise ValueError(f'{fewer}; lower batch_size or model.L, or use more data.')
  # All processes shuffle alike and each reads its slice: batches do not depend on the processes.
  mine = _mine(batch_size, shard)
  ds = grain.MapDataset.range(len(rows)).shuffle(seed=seed).repeat()
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(lambda r_B: read_rows(tokens.ids, rows, L, r_B[mine])).to_iter_dataset()
  return ds if sharding is None else ds.map(lambda local: global_batch(local, sharding))


@dataclasses.dataclass(frozen=True)
class EvalData:
  """This process's part of every held-out batch, and the bytes of text all processes predict."""

  batches: list[Batch]
  num_bytes: int


def eval_data(
  tokens: Tokens, L: int, batch_size: int, shard: grain.sharding.ShardOptions = ONE_PROCESS
) -> EvalData:
  """Every held-out document in packed rows, padded with empty rows to full global batches."""
  # Packed whatever the training packing: segments keep documents apart, each scored on its own.
  rows = packed_rows(tokens.offsets, L)
  num_rows = -(-len(rows) // batch_size) * batch_size
  # The padding rows hold no spans: all padding, with weight 0.
  rows = Rows(rows.starts, rows.lengths, np.pad(rows.first, (0, num_rows - len(rows)), 'edge'))
  mine = _mine(batch_size, shard)
  r_batches = np.arange(num_rows).reshape(-1, batch_size)
  batches = [read_rows(tokens.ids, rows, L, r_B[mine]) for r_B in r_batches]
  return EvalData(batches, tokens.num_bytes)
