"""Every source reads the same corpus to the same token ids; built-in splits; bad input."""

import json
import os
import subprocess
import sys
import zlib
from unittest import mock

import numpy as np
import pytest
from conftest import VOCAB, tiny_config

from nanodo.corpora import builtin, sources, token_cache, tokenizer

DOCS = [
  'To be, or not to be: that is the question.',
  'Ünïcödé — “quoted” text 🎭.',
  'Line one\nline two.',
  'O, pardon me, thou bleeding piece of earth.',
]
HELD_OUT = ['Friends, Romans, countrymen.']


def _write_text(root, docs, per_file):
  os.makedirs(root)
  if per_file:
    for i, d in enumerate(docs):
      with open(os.path.join(root, f'{i:02d}.txt'), 'w', encoding='utf-8') as f:
        f.write(d)
  else:
    with open(os.path.join(root, 'all.txt'), 'w', encoding='utf-8') as f:
      f.write('\n\n\n'.join(docs) + '\n')


def _write_jsonl(path, docs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for i, d in enumerate(docs):
      f.write(json.dumps({'id': i, 'text': d}, ensure_ascii=i % 2 == 0) + '\n' * (1 + (i == 0)))


def _write_parquet(root, docs):
  import pyarrow as pa  # the parquet extra, which the test extra includes
  import pyarrow.parquet as pq

  os.makedirs(root)
  half = len(docs) // 2 or 1  # two files: order is by path
  for i, part in enumerate((docs[:half], docs[half:])):
    if part:
      pq.write_table(
        pa.table({'text': part, 'n': list(range(len(part)))}),
        os.path.join(root, f'part-{i}.parquet'),
      )


def _write_arrayrecord(root, docs):
  from array_record.python import array_record_module

  os.makedirs(root)
  writer = array_record_module.ArrayRecordWriter(
    os.path.join(root, 'docs.array_record'), 'group_size:1'
  )
  for d in docs:
    writer.write(d.encode())
  writer.close()


def _write_tfds(data_dir):
  import tensorflow_datasets as tfds  # the tfds extra, which the test extra includes

  class TinyCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        disable_shuffling=True,
      )  # records in the order written, as DOCS

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(DOCS), 'test': self._generate_examples(HELD_OUT)}

    def _generate_examples(self, docs):
      for i, d in enumerate(docs):
        yield i, {'text': d}

  TinyCorpus(data_dir=data_dir, file_format='array_record').download_and_prepare()


def _config(tmp_path, kind, monkeypatch):
  """A config reading DOCS (train) and HELD_OUT (eval) through the source `kind`."""
  c = tiny_config(str(tmp_path / 'run'))
  d = tmp_path / 'data'
  if kind in ('text', 'paragraph'):
    for split, docs in (('train', DOCS), ('eval', HELD_OUT)):
      _write_text(str(d / split), docs, per_file=kind == 'text')
    c.update(
      ds_name='text',
      train_split=str(d / 'train' / '*.txt'),
      eval_split=str(d / 'eval' / '*.txt'),
      text_documents='file' if kind == 'text' else 'paragraph',
    )
  elif kind == 'jsonl':
    _write_jsonl(str(d / 'train.jsonl'), DOCS)
    _write_jsonl(str(d / 'eval.jsonl'), HELD_OUT)
    c.update(ds_name='jsonl', train_split=str(d / 'train.jsonl'), eval_split=str(d / 'eval.jsonl'))
  elif kind == 'parquet':
    _write_parquet(str(d / 'train'), DOCS)
    _write_parquet(str(d / 'eval'), HELD_OUT)
    c.update(
      ds_name='parquet',
      train_split=str(d / 'train' / '*.parquet'),
      eval_split=str(d / 'eval' / '*.parquet'),
    )
  elif kind == 'arrayrecord':
    _write_arrayrecord(str(d / 'train'), DOCS)
    _write_arrayrecord(str(d / 'eval'), HELD_OUT)
    c.update(
      ds_name='arrayrecord', train_split=str(d / 'train' / '*'), eval_split=str(d / 'eval' / '*')
    )
  elif kind == 'tfds':
    _write_tfds(str(d))
    c.update(
      ds_name='tfds:tiny_corpus', tfds_data_dir=str(d), train_split='train', eval_split='test'
    )
  elif kind == 'hf':
    import datasets  # the hf extra, which the test extra includes

    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', str(tmp_path / 'hf_cache'))
    _write_jsonl(str(d / 'train.jsonl'), DOCS)
    _write_jsonl(str(d / 'test.jsonl'), HELD_OUT)
    c.update(ds_name=f'hf:{d}', train_split='train', eval_split='test')
  return c


KINDS = ['text', 'paragraph', 'jsonl', 'parquet', 'arrayrecord', 'tfds', 'hf']


@pytest.mark.parametrize('kind', KINDS)
def test_every_source_reads_the_corpus_to_the_same_token_ids(tmp_path, kind, monkeypatch):
  c = _config(tmp_path, kind, monkeypatch)
  sources.check(sources.Source.of(c))
  sp = tokenizer.load(VOCAB)
  for which, docs in (('train', DOCS), ('eval', HELD_OUT)):
    split = sources.get_split(sources.Source.of(c), which)
    assert list(split.documents()) == docs
    tokens = token_cache.load(split, sp, str(tmp_path / 'cache'), workers=1)
    expected = [[sp.bos_id(), *ids, sp.eos_id()] for ids in sp.encode(docs)]
    np.testing.assert_array_equal(tokens.ids, np.concatenate(expected))
    np.testing.assert_array_equal(tokens.offsets, np.cumsum([0, *map(len, expected)]))
    assert tokens.num_bytes == sum(len(d.encode()) for d in docs)


def test_shakespeare_split_holds_out_every_13th_play():
  train_docs, eval_docs = builtin.shakespeare()
  assert (len(train_docs), len(eval_docs)) == (35, 3)
  titles = [d.splitlines()[0] for d in eval_docs]
  assert titles == ["# A Midsummer Night's Dream", '# Henry VI, Part 2', '# Julius Caesar']
  assert 370_000 < sum(len(d.encode()) for d in eval_docs) < 390_000
  assert not set(train_docs) & set(eval_docs)


def test_pystdlib_is_the_standard_library_with_a_split_fixed_by_path():
  train_docs, eval_docs = builtin.pystdlib()
  assert len(train_docs) > 500 and 0.02 < len(eval_docs) / len(train_docs) < 0.1
  assert not set(train_docs) & set(eval_docs)
  with open(os.__file__, encoding='utf-8') as f:
    os_py = f.read()
  # os.py's split follows from its path alone.
  assert os_py in (eval_docs if zlib.crc32(b'os.py') % 20 == 0 else train_docs)
  with open(pytest.__file__, encoding='utf-8') as f:  # site-packages is not the library
    assert f.read() not in train_docs + eval_docs


def test_a_file_that_is_not_utf8_is_named_or_skipped_and_counted(tmp_path, capsys, monkeypatch):
  c = _config(tmp_path, 'text', monkeypatch)
  with open(tmp_path / 'data' / 'train' / '01.txt', 'wb') as f:
    f.write('Ünïcödé'.encode('latin-1'))
  split = sources.get_split(sources.Source.of(c), 'train')
  with pytest.raises(ValueError, match=r'01\.txt is not UTF-8 .*bad_utf8=skip'):
    list(split.documents())
  c.bad_utf8 = 'skip'
  assert list(sources.get_split(sources.Source.of(c), 'train').documents()) == [DOCS[0], *DOCS[2:]]
  assert 'Skipped 1 files that are not UTF-8' in capsys.readouterr().out


@pytest.mark.parametrize('kind', ['jsonl', 'parquet'])
def test_a_missing_text_field_is_named_by_the_check_before_any_work(tmp_path, kind, monkeypatch):
  c = _config(tmp_path, kind, monkeypatch)
  c.text_field = 'body'
  with pytest.raises(ValueError, match=r"has no field text_field='body'; its fields: \[.*'text'"):
    sources.check(sources.Source.of(c))


def test_a_missing_hf_column_is_named_as_the_split_opens_before_any_document_is_read(
  tmp_path, monkeypatch
):
  # check() cannot see a dataset's columns without loading it; get_split, which loads it, can.
  c = _config(tmp_path, 'hf', monkeypatch)
  c.text_field = 'body'
  import datasets

  spies = []
  for name in ('__getitem__', '__iter__', 'iter'):  # every way to read a Dataset's records
    read = getattr(datasets.Dataset, name)
    spies.append(mock.create_autospec(read, side_effect=read))
    monkeypatch.setattr(datasets.Dataset, name, spies[-1])
  with pytest.raises(ValueError, match=r"has no field text_field='body'; its fields: \[.*'text'"):
    sources.get_split(sources.Source.of(c), 'train')
  assert not any(spy.called for spy in spies)
  # The spies do see reads: the same split with its real field is read through them.
  c.text_field = 'text'
  assert list(sources.get_split(sources.Source.of(c), 'train').documents()) == DOCS
  assert any(spy.called for spy in spies)


def test_an_empty_glob_names_the_key(tmp_path):
  c = tiny_config(str(tmp_path), ds_name='parquet', train_split=str(tmp_path / '*.parquet'))
  with pytest.raises(ValueError, match=r"train_split='.*\*\.parquet' matches no file"):
    sources.check(sources.Source.of(c))


def test_a_missing_extra_says_how_to_install_it(tmp_path, monkeypatch):
  monkeypatch.setitem(sources.EXTRAS, 'tfds:', ('no_such_module_for_tfds', 'tfds'))
  c = tiny_config(str(tmp_path), ds_name='tfds:lm1b')
  with pytest.raises(ValueError, match=r"needs the tfds extra: pip install -e '\.\[tfds\]'"):
    sources.check(sources.Source.of(c))


def test_the_core_path_imports_no_optional_extra():
  code = (
    'import sys; from nanodo import main, train; from nanodo.corpora import sources; '
    'from conftest import tiny_config; '
    "sources.get_split(sources.Source.of(tiny_config('/unused')), 'eval'); "
    "print([m for m in ('tensorflow_datasets', 'datasets', 'pyarrow') if m in sys.modules])"
  )
  out = subprocess.run(
    [sys.executable, '-c', code],
    capture_output=True,
    text=True,
    check=True,
    cwd=os.path.dirname(__file__),
  )
  assert out.stdout.strip() == '[]'
