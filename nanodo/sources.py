"""Text sources: built-in corpora, local files, ArrayRecord, TFDS and Hugging Face datasets.

A source split is a stream of documents (strings) and a fingerprint that changes whenever the
documents could: the token cache compares it before reusing tokens.
"""

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator

import ml_collections

from nanodo import corpora

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


def _sha(*parts: object) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', text).strip('_')[:40]


def _in_memory(name: str, docs: list[str], salt: str = '') -> Split:
  digest = hashlib.sha256(salt.encode())
  for d in docs:
    digest.update(hashlib.sha256(d.encode('utf-8', 'surrogatepass')).digest())
  return Split(name, digest.hexdigest(), lambda: iter(docs))


BUILTIN_CORPORA = {'shakespeare': corpora.shakespeare, 'pystdlib': corpora.pystdlib}


def split_spec(c: ml_collections.ConfigDict, which: str) -> str:
  """The config key that names a split: `train_split` or `eval_split`."""
  return c.train_split if which == 'train' else c.eval_split


def files(c: ml_collections.ConfigDict, which: str) -> list[str]:
  """The files a local-file source reads for a split; raises if the glob matches none."""
  pattern = split_spec(c, which)
  paths = sorted(
    p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
  )
  if not paths:
    raise ValueError(
      f'{which}_split={pattern!r} matches no file; ds_name={c.ds_name!r} reads '
      'local files: give a glob, e.g. /data/train-*'
    )
  return paths


def _decode(
  data: bytes, where: str, c: ml_collections.ConfigDict, skipped: list[str]
) -> str | None:
  """data as UTF-8; a decoding error raises or, with bad_utf8='skip', is counted."""
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    if c.bad_utf8 == 'skip':
      skipped.append(where)
      return None
    raise ValueError(
      f'{where} is not UTF-8 ({e}); fix it, or set bad_utf8=skip to skip it.'
    ) from None


def _report_skipped(skipped: list[str], what: str) -> None:
  if skipped:
    print(
      f'Skipped {len(skipped)} {what} that are not UTF-8 (bad_utf8=skip), e.g. {skipped[0]}.',
      flush=True,
    )


def _text_docs(paths: list[str], c: ml_collections.ConfigDict) -> Iterator[str]:
  skipped = []
  for path in paths:
    with open(path, 'rb') as f:
      text = _decode(f.read(), path, c, skipped)
    if text is None:
      continue
    if c.text_documents == 'file':
      blocks = [text]
    else:
      blocks = [b.strip('\n') for b in re.split(r'\n[ \t\r]*\n', text)]
    yield from (b for b in blocks if b)
  _report_skipped(skipped, 'files')


def _field(record: dict, field: str, where: str) -> object:
  if field not in record:
    raise ValueError(f'{where} has no field text_field={field!r}; its fields: {sorted(record)}.')
  return record[field]


def _jsonl_records(path: str, text: str) -> Iterator[tuple[str, dict]]:
  """Each non-blank line's place and JSON object."""
  for i, line in enumerate(text.split('\n'), 1):  # not splitlines: JSON may hold U+2028
    if line.strip():
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{i} is not a JSON object: {e}') from None
      if not isinstance(record, dict):
        raise ValueError(f'{path}:{i} is not a JSON object.')
      yield f'{path}:{i}', record


def _jsonl_docs(paths: list[str], c: ml_collections.ConfigDict) -> Iterator[str]:
  skipped = []
  for path in paths:
    with open(path, 'rb') as f:
      text = _decode(f.read(), path, c, skipped)
    for where, record in _jsonl_records(path, text or ''):
      if doc := _field(record, c.text_field, where):
        yield doc
  _report_skipped(skipped, 'files')


def _parquet_docs(paths: list[str], c: ml_collections.ConfigDict) -> Iterator[str]:
  import pyarrow.parquet as pq  # optional: only Parquet sources need pyarrow

  for path in paths:
    pf = pq.ParquetFile(path)
    _field(dict.fromkeys(pf.schema_arrow.names), c.text_field, path)
    for batch in pf.iter_batches(columns=[c.text_field], batch_size=_BATCH):
      yield from (d for d in batch.column(0).to_pylist() if d)


def _record_docs(
  records: Iterable[object], where: str, c: ml_collections.ConfigDict
) -> Iterator[str]:
  """Documents from records that are bytes, str, or dicts with text_field."""
  skipped = []
  for i, record in enumerate(records):
    doc = record
    if isinstance(record, dict):
      doc = _field(record, c.text_field, f'{where} record {i}')
    if isinstance(doc, bytes):
      doc = _decode(doc, f'{where} record {i}', c, skipped)
    if doc:
      yield doc
  _report_skipped(skipped, 'records')


def _random_access(source: object) -> Iterator[object]:
  """Every record of a Grain-style random-access source, in order, read in batches."""
  for start in range(0, len(source), _BATCH):
    yield from source.__getitems__(list(range(start, min(start + _BATCH, len(source)))))


def _arrayrecord_docs(paths: list[str], c: ml_collections.ConfigDict) -> Iterator[str]:
  import grain

  source = grain.sources.ArrayRecordDataSource(paths)
  yield from _record_docs(_random_access(source), f'ArrayRecord {paths[0]}...', c)


def _file_split(c: ml_collections.ConfigDict, which: str) -> Split:
  paths = files(c, which)
  digest = hashlib.sha256(_sha(c.ds_name, c.text_field, c.text_documents, c.bad_utf8).encode())
  for path in paths:
    digest.update(path.encode())
    with open(path, 'rb') as f:
      digest.update(hashlib.file_digest(f, 'sha256').digest())
  read = {
    'text': _text_docs,
    'jsonl': _jsonl_docs,
    'parquet': _parquet_docs,
    'arrayrecord': _arrayrecord_docs,
  }[c.ds_name]
  name = f'{c.ds_name}-{which}-{_sha(split_spec(c, which))[:8]}'
  return Split(name, digest.hexdigest(), lambda: read(paths, c))


def _tfds_split(c: ml_collections.ConfigDict, which: str) -> Split:
  import tensorflow_datasets as tfds  # the tfds extra

  name, split = c.ds_name.removeprefix('tfds:'), split_spec(c, which)
  source = tfds.data_source(name, split=split, data_dir=c.tfds_data_dir or None)
  fingerprint = _sha(c.ds_name, split, c.text_field, c.bad_utf8, source.dataset_info.as_json)
  docs = lambda: _record_docs(_random_access(source), f'{c.ds_name} {split}', c)
  return Split(f'{_slug(c.ds_name)}-{which}-{_slug(split)}', fingerprint, docs)


def _hf_split(c: ml_collections.ConfigDict, which: str) -> Split:
  import datasets  # the hf extra

  path, split = c.ds_name.removeprefix('hf:'), split_spec(c, which)
  ds = datasets.load_dataset(path, split=split)
  _field(dict.fromkeys(ds.column_names), c.text_field, f'{c.ds_name} {split}')

  def docs() -> Iterator[str]:
    for batch in ds.iter(batch_size=_BATCH):
      yield from (d for d in batch[c.text_field] if d)

  fingerprint = _sha(c.ds_name, split, c.text_field, ds._fingerprint)
  return Split(f'{_slug(c.ds_name)}-{which}-{_slug(split)}', fingerprint, docs)


def get_split(c: ml_collections.ConfigDict, which: str) -> Split:
  """The 'train' or 'eval' split of the source c.ds_name."""
  if c.ds_name in BUILTIN_CORPORA:
    docs = BUILTIN_CORPORA[c.ds_name]()[SPLITS.index(which)]
    return _in_memory(f'{c.ds_name}-{which}', docs)
  if c.ds_name in FILE_FORMATS:
    return _file_split(c, which)
  if c.ds_name.startswith('tfds:'):
    return _tfds_split(c, which)
  return _hf_split(c, which)


def check(c: ml_collections.ConfigDict) -> None:
  """Cheap checks of the source before any work: its name, globs, extras and text field."""
  valid = (
    f'one of {list(BUILTIN + FILE_FORMATS)}, or tfds:NAME[:VERSION] or hf:PATH (optional extras)'
  )
  prefix = next((p for p in EXTRAS if c.ds_name.startswith(p)), None)
  if c.ds_name not in BUILTIN + FILE_FORMATS and not (prefix and len(c.ds_name) > len(prefix)):
    raise ValueError(f'ds_name={c.ds_name!r} is not valid: {valid}.')
  if prefix:
    module, extra = EXTRAS[prefix]
    if importlib.util.find_spec(module) is None:
      raise ValueError(
        f"ds_name={c.ds_name!r} needs the {extra} extra: pip install -e '.[{extra}]'."
      )
  if c.ds_name in FILE_FORMATS:
    for which in SPLITS:
      for path in files(c, which):
        if c.ds_name == 'jsonl':
          with open(path, encoding='utf-8', errors='replace') as f:
            first = next(_jsonl_records(path, next((x for x in f if x.strip()), '')), None)
          if first:
            _field(first[1], c.text_field, first[0])
        if c.ds_name == 'parquet':
          if importlib.util.find_spec('pyarrow') is None:
            raise ValueError("ds_name='parquet' needs pyarrow: pip install -e '.[parquet]'.")
          import pyarrow.parquet as pq

          _field(dict.fromkeys(pq.read_schema(path).names), c.text_field, path)
