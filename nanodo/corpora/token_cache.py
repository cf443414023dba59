"""Token ids of a source split, written once to memory-mapped arrays and reused.

A cache is three files named after the split and the tokenizer: `<name>.tokens.npy` (every
document's ids, BOS and EOS included, one after another), `<name>.offsets.npy` (where each
document starts, then the total) and `<name>.json` (the source's and tokenizer's hashes, the
sizes, each array file's CRC-32). The arrays are NumPy files read without pickles. The JSON is
written last, after the arrays are complete under their final names, so a cache with metadata is
whole; a cache whose hashes, sizes or checksums disagree is rebuilt, never used.
"""

import collections
import contextlib
import hashlib
import json
import multiprocessing
import os
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent import futures

import jax
import numpy as np
from jax.experimental import multihost_utils

from nanodo.corpora.sources import Split
from nanodo.corpora.tokenizer import Tokenizer, from_bytes
from nanodo.data import Tokens
from nanodo.ground import files
from nanodo.ground.console import log

FORMAT = 5  # 3: the arrays' checksums; 4: NumPy files; 5: bytes counted from the text
_ARRAYS = ('tokens.npy', 'offsets.npy')
_CHUNK_BYTES = 1 << 24  # read at once when checksumming: constant memory for any size
_TASK_BYTES = 1 << 20  # text sent to a worker at once
_PROGRESS_SECONDS = 5.0
Encoded = list[tuple[np.ndarray, int]]  # each document's ids and the UTF-8 size of its text


class CacheError(ValueError):
  """A cache that cannot be used: stale, incomplete or corrupt."""


def load(split: Split, sp: Tokenizer, cache_dir: str, workers: int) -> Tokens:
  """The tokens of split under sp from cache_dir; built first if missing, stale or corrupt."""
  tokenizer_hash = hashlib.sha256(sp.serialized_model_proto()).hexdigest()
  base = os.path.join(cache_dir, f'{split.name}-{tokenizer_hash[:12]}')
  expected = {'format': FORMAT, 'source': split.fingerprint, 'tokenizer': tokenizer_hash}
  if os.path.exists(base + '.json'):
    try:
      return read(base, expected)
    except CacheError as e:
      log(f'Token cache {base}: {e}; rebuilding it.')
  build(split, sp, base, expected, workers)
  return read(base, expected)


def load_shared(split: Split, sp: Tokenizer, cache_dir: str, workers: int) -> Tokens:
  """load, by every process of a run: process 0 builds the cache while the others wait."""
  # Process 0 opens it once: opening verifies its checksums, which reads it whole.
  tokens = load(split, sp, cache_dir, workers) if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'token cache of {split.name}')
  return tokens or load(split, sp, cache_dir, workers)


def read(base: str, expected: dict[str, object]) -> Tokens:
  """The cache at base, memory-mapped; CacheError unless it is whole and matches expected."""
  try:
    with open(base + '.json', encoding='utf-8') as f:
      meta = json.load(f)
    if not isinstance(meta, dict):
      raise CacheError('its metadata is not a JSON object (corrupt)')
    changed = [key for key, value in expected.items() if meta.get(key) != value]
    if changed:
      raise CacheError(f'its {changed[0]} changed')
    ids = np.load(base + '.tokens.npy', mmap_mode='r', allow_pickle=False)
    offsets = np.load(base + '.offsets.npy', allow_pickle=False)
    layout = ((meta['num_tokens'],), meta['dtype'], (meta['num_docs'] + 1,))
    crc32 = {name: meta['crc32'][name] for name in _ARRAYS}
  except KeyError as e:
    raise CacheError(f'its metadata has no {e} (corrupt)') from None
  except (OSError, ValueError, TypeError) as e:
    if isinstance(e, CacheError):
      raise
    raise CacheError(f'unreadable ({e})') from None
  whole = (ids.shape, str(ids.dtype), offsets.shape) == layout
  if not whole or offsets[0] != 0 or offsets[-1] != len(ids) or np.any(np.diff(offsets) < 2):
    raise CacheError('its arrays do not match its metadata (corrupt)')
  # The sizes first, which cost nothing; then the checksums, which read every byte.
  if bad := [name for name in _ARRAYS if _crc32(f'{base}.{name}') != crc32[name]]:
    raise CacheError(f'its {bad[0]} does not match its checksum (corrupt)')
  return Tokens(ids, offsets, meta['num_bytes'])


def _crc32(path: str) -> int:
  """The CRC-32 of a file, read a chunk at a time."""
  # CRC-32 catches every flipped byte for certain, at several times the speed of SHA-256.
  crc, chunk = 0, bytearray(_CHUNK_BYTES)
  with open(path, 'rb') as f:
    while n := f.readinto(chunk):
      crc = zlib.crc32(memoryview(chunk)[:n], crc)
  return crc


def _encode(sp: Tokenizer, docs: list[str], threads: int) -> Encoded:
  """Each document's ids with BOS and EOS, and the UTF-8 size of its text (never of its tokens)."""
  ids = sp.encode(docs, add_bos=True, add_eos=True, num_threads=threads)
  sizes = [len(text.encode('utf-8', 'surrogatepass')) for text in docs]
  return [(np.asarray(x, np.int32), n) for x, n in zip(ids, sizes, strict=True)]


_worker_sp = None


def _init_worker(model_proto: bytes) -> None:
  global _worker_sp
  _worker_sp = from_bytes(model_proto)


def _encode_in_worker(docs: list[str]) -> Encoded:
  return _encode(_worker_sp, docs, threads=1)


def _tasks(docs: Iterable[str]) -> Iterator[list[str]]:
  """Documents grouped into lists of about _TASK_BYTES characters."""
  task, size = [], 0
  for doc in docs:
    task.append(doc)
    size += len(doc)
    if size >= _TASK_BYTES:
      yield task
      task, size = [], 0
  if task:
    yield task


def encoded(docs: Iterable[str], sp: Tokenizer, workers: int) -> Iterator[Encoded]:
  """Encoded groups of documents, in order; with workers > 1, by that many processes."""
  if workers == 1:  # SentencePiece's threads, one per core
    yield from (_encode(sp, task, threads=os.cpu_count() or 1) for task in _tasks(docs))
    return
  # spawn, not fork: the parent may run JAX threads. Each worker first imports the program.
  spawn = multiprocessing.get_context('spawn')
  with futures.ProcessPoolExecutor(
    workers, mp_context=spawn, initializer=_init_worker, initargs=(sp.serialized_model_proto(),)
  ) as pool:
    pending = collections.deque()
    for task in _tasks(docs):
      pending.append(pool.submit(_encode_in_worker, task))
      if len(pending) > 2 * workers:  # bounded: the source is read as fast as it is encoded
        yield pending.popleft().result()
    yield from (future.result() for future in pending)


def build(split: Split, sp: Tokenizer, base: str, meta: dict[str, object], workers: int) -> None:
  """Tokenizes every document of split into the cache at base; nothing is left half-written."""
  os.makedirs(os.path.dirname(base) or '.', exist_ok=True)
  dtype = np.dtype(np.uint16 if sp.vocab_size() <= 1 << 16 else np.int32)
  start = last = time.time()
  offsets, num_bytes = [0], 0
  log(f'Building the token cache {base} with {workers} worker(s)...')
  # Metadata goes last: until it is there, readers see no cache and build their own.
  with contextlib.suppress(FileNotFoundError):
    os.remove(base + '.json')
  # The ids go to a raw file as they come, then into a NumPy file once their number is known.
  raw = f'{base}.raw{os.getpid()}'
  try:
    with files.replaced(base + '.tokens.npy') as tokens:
      with open(raw, 'wb') as f:
        for group in encoded(split.documents(), sp, workers):
          for ids, size in group:
            f.write(ids.astype(dtype).tobytes())
            offsets.append(offsets[-1] + len(ids))
            num_bytes += size
          if time.time() - last > _PROGRESS_SECONDS:
            last = time.time()
            rate = num_bytes / 1e6 / (last - start)
            done = f'{len(offsets) - 1} documents, {offsets[-1] / 1e6:.1f}M tokens'
            log(f'  {done}, {rate:.1f} MB/s')
      if len(offsets) == 1:
        raise ValueError(f'{split.name} has no documents.')
      with open(tokens, 'wb') as f:
        np.save(f, np.memmap(raw, dtype, mode='r'), allow_pickle=False)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(raw)
  with files.replaced(base + '.offsets.npy') as tmp, open(tmp, 'wb') as f:
    np.save(f, np.asarray(offsets, np.int64), allow_pickle=False)
  sizes = {'num_docs': len(offsets) - 1, 'num_tokens': offsets[-1], 'num_bytes': num_bytes}
  crc32 = {name: _crc32(f'{base}.{name}') for name in _ARRAYS}
  content = {**meta, 'dtype': dtype.name, **sizes, 'crc32': crc32}
  files.write_text(base + '.json', json.dumps(content, indent=1))
  seconds = time.time() - start
  log(f'Token cache {base}: {len(offsets) - 1} documents, {offsets[-1]} tokens in {seconds:.1f}s.')
