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
from collections.abc import Callable, Iterable, Iterator

import ml_collections

from nanodo.corpora import builtin
from nanodo.ground.console import log

BUILTIN = builtin.NAMES
FILE_FORMATS = ('text', 'jsonl', 'parquet', 'arrayrecord')
# ds_name prefix -> (module, pip extra).
EXTRAS = {'tfds:': ('tensorflow_datasets', 'tfds'), 'hf:': ('datasets', 'hf')}
TEXT_DOCUMENTS = ('file', 'paragraph')
BAD_UTF8 = ('error', 'skip')
SPLITS = ('train', 'eval')
_BATCH = 1024  # records read per call from random-access sources


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a run's documents come from: configs/default.py's keys of the same names."""

  ds_name: str
  train_split: str
  eval_split: str
  text_field: str  # JSON Lines, Parquet, TFDS and Hugging Face records
  text_documents: str  # plain text files
  bad_utf8: str
  tfds_data_dir: str

  @classmethod
  def of(cls, c: ml_collections.ConfigDict) -> 'Source':
    return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a source: a name for its cache, a hash of its content, and its documents."""

  name: str
  fingerprint: str
  documents: Callable[[], Iterator[str]]


def _sha(*parts: object) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', text).strip('_')[:40]


def files(src: Source, which: str) -> list[str]:
  """The files a local-file source reads for a split; raises if the glob matches none."""
  pattern = getattr(src, f'{which}_split')
  paths = glob.glob(os.path.expanduser(pattern), recursive=True)
  if paths := sorted(p for p in paths if os.path.isfile(p)):
    return paths
  hint = f'ds_name={src.ds_name!r} reads local files: give a glob, e.g. /data/train-*'
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
  src: Source,
  what: str,
  expand: Callable[[str, str], Iterable[object]] | None = None,
) -> Iterator[str]:
  """The non-empty documents of (place, bytes, str or dict) items, each split by expand if given."""
  skipped = []
  for where, item in items:
    if isinstance(item, dict):
      item = _field(item, src.text_field, where)
    if isinstance(item, bytes):
      try:
        item = item.decode('utf-8')
      except UnicodeDecodeError as e:
        if src.bad_utf8 != 'skip':
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


def _parquet_docs(paths: list[str], field: str) -> Iterator[str]:
  import pyarrow.parquet as pq  # optional: only Parquet sources need pyarrow

  for path in paths:
    pf = pq.ParquetFile(path)
    _field(dict.fromkeys(pf.schema_arrow.names), field, path)
    for batch in pf.iter_batches(columns=[field], batch_size=_BATCH):
      yield from (d for d in batch.column(0).to_pylist() if d)


def _records(source: object, where: str) -> Iterator[tuple[str, object]]:
  """Every record of a Grain-style random-access source with its place, read in batches."""
  for start in range(0, len(source), _BATCH):
    batch = source.__getitems__(list(range(start, min(start + _BATCH, len(source)))))
    yield from ((f'{where} record {start + i}', r) for i, r in enumerate(batch))


def _file_docs(paths: list[str], src: Source) -> Iterator[str]:
  """The documents of local files in the format src.ds_name."""
  if src.ds_name == 'parquet':
    yield from _parquet_docs(paths, src.text_field)
  elif src.ds_name == 'arrayrecord':
    import grain

    source = grain.sources.ArrayRecordDataSource(paths)
    yield from _docs(_records(source, f'ArrayRecord {paths[0]}...'), src, 'records')
  else:
    items = ((path, _read(path)) for path in paths)
    expand = _paragraphs if src.text_documents == 'paragraph' else None
    if src.ds_name == 'jsonl':
      expand = functools.partial(_jsonl_texts, field=src.text_field)
    yield from _docs(items, src, 'files', expand)


def _file_split(src: Source, which: str) -> Split:
  paths = files(src, which)
  kind = _sha(src.ds_name, src.text_field, src.text_documents, src.bad_utf8)
  digest = hashlib.sha256(kind.encode())
  for path in paths:
    digest.update(path.encode())
    with open(path, 'rb') as f:
      digest.update(hashlib.file_digest(f, 'sha256').digest())
  tag = _sha(getattr(src, f'{which}_split'))[:8]
  docs = lambda: _file_docs(paths, src)
  return Split(f'{src.ds_name}-{which}-{tag}', digest.hexdigest(), docs)


def _tfds_split(src: Source, which: str) -> Split:
  import tensorflow_datasets as tfds  # the tfds extra

  name, split = src.ds_name.removeprefix('tfds:'), getattr(src, f'{which}_split')
  source = tfds.data_source(name, split=split, data_dir=src.tfds_data_dir or None)
  info = source.dataset_info.as_json
  fingerprint = _sha(src.ds_name, split, src.text_field, src.bad_utf8, info)
  docs = lambda: _docs(_records(source, f'{src.ds_name} {split}'), src, 'records')
  return Split(f'{_slug(src.ds_name)}-{which}-{_slug(split)}', fingerprint, docs)


def _hf_split(src: Source, which: str) -> Split:
  import datasets  # the hf extra

  path, split = src.ds_name.removeprefix('hf:'), getattr(src, f'{which}_split')
  field = src.text_field
  ds = datasets.load_dataset(path, split=split)
  _field(dict.fromkeys(ds.column_names), field, f'{src.ds_name} {split}')
  docs = lambda: (d for b in ds.iter(batch_size=_BATCH) for d in b[field] if d)
  fingerprint = _sha(src.ds_name, split, field, ds._fingerprint)
  return Split(f'{_slug(src.ds_name)}-{which}-{_slug(split)}', fingerprint, docs)


def get_split(src: Source, which: str) -> Split:
  """The 'train' or 'eval' split of the source src."""
  if src.ds_name in BUILTIN:
    docs = getattr(builtin, src.ds_name)()[SPLITS.index(which)]
    digest = hashlib.sha256()
    for d in docs:
      digest.update(hashlib.sha256(d.encode('utf-8', 'surrogatepass')).digest())
    return Split(f'{src.ds_name}-{which}', digest.hexdigest(), lambda: iter(docs))
  if src.ds_name in FILE_FORMATS:
    return _file_split(src, which)
  return (_tfds_split if src.ds_name.startswith('tfds:') else _hf_split)(src, which)


def check(src: Source) -> None:
  """Cheap checks of the source before any work: its name, globs, extras and text field."""
  name, field = src.ds_name, src.text_field
  prefix = next((p for p in EXTRAS if name.startswith(p)), None)
  if name not in BUILTIN + FILE_FORMATS and not (prefix and len(name) > len(prefix)):
    valid = f'one of {list(BUILTIN + FILE_FORMATS)}, or tfds:NAME[:VERSION] or hf:PATH'
    raise ValueError(f'ds_name={name!r} is not valid: {valid} (optional extras).')
  if prefix and importlib.util.find_spec(EXTRAS[prefix][0]) is None:
    extra = EXTRAS[prefix][1]
    raise ValueError(f"ds_name={name!r} needs the {extra} extra: pip install -e '.[{extra}]'.")
  if name not in FILE_FORMATS:
    return
  for path in (p for which in SPLITS for p in files(src, which)):
    if name == 'jsonl':
      with open(path, encoding='utf-8', errors='replace') as f:
        next(_jsonl_texts(path, next((x for x in f if x.strip()), ''), field), None)
    if name == 'parquet':
      if importlib.util.find_spec('pyarrow') is None:
        raise ValueError("ds_name='parquet' needs pyarrow: pip install -e '.[parquet]'.")
      import pyarrow.parquet as pq

      _field(dict.fromkeys(pq.read_schema(path).names), field, path)
