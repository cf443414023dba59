"""The token cache: built once, reused, rebuilt when its source or tokenizer changes."""

import os

import numpy as np
import pytest
from conftest import VOCAB

from nanodo.corpora import builtin, sources, token_cache, tokenizer

DOCS = [
  'Now is the winter of our discontent',
  'Made glorious summer by this sun of York;',
  'And all the clouds that lour’d upon our house',
]


def _split(docs, fingerprint='v1'):
  return sources.Split('tiny-train', fingerprint, lambda: iter(docs))


def _unreadable(fingerprint='v1'):
  """A split whose documents must not be read: its cache must be used."""

  def docs():
    raise AssertionError('the source was read again')

  return sources.Split('tiny-train', fingerprint, docs)


def _expected(sp, docs):
  return np.concatenate([[sp.bos_id(), *ids, sp.eos_id()] for ids in sp.encode(docs)])


def test_first_use_builds_the_cache_and_later_uses_only_read_it(tmp_path, capsys):
  sp = tokenizer.load(VOCAB)
  built = token_cache.load(_split(DOCS), sp, str(tmp_path), workers=1)
  assert 'Building the token cache' in capsys.readouterr().out
  again = token_cache.load(_unreadable(), sp, str(tmp_path), workers=1)
  assert capsys.readouterr().out == ''
  assert isinstance(again.ids, np.memmap) and again.ids.dtype == np.uint16
  np.testing.assert_array_equal(again.ids, _expected(sp, DOCS))
  np.testing.assert_array_equal(again.offsets, built.offsets)
  names = sorted(os.listdir(tmp_path))  # three files, no temporary ones
  assert all(n.startswith('tiny-train-') for n in names)
  assert [n.split('.', 1)[1] for n in names] == ['json', 'offsets.npy', 'tokens.npy']


def test_a_changed_tokenizer_never_reads_the_old_tokens(tmp_path):
  sp = tokenizer.load(VOCAB)
  other = tokenizer.train(
    [' '.join(DOCS) * 20, *builtin.shakespeare()[1][:1]], 400, str(tmp_path / 'other.model')
  )
  token_cache.load(_split(DOCS), sp, str(tmp_path / 'cache'), workers=1)
  tokens = token_cache.load(_split(DOCS), other, str(tmp_path / 'cache'), workers=1)
  np.testing.assert_array_equal(tokens.ids, _expected(other, DOCS))
  assert not np.array_equal(_expected(other, DOCS), _expected(sp, DOCS))


def test_a_changed_source_is_rebuilt(tmp_path, capsys):
  sp = tokenizer.load(VOCAB)
  token_cache.load(_split(DOCS), sp, str(tmp_path), workers=1)
  tokens = token_cache.load(_split(DOCS[::-1], 'v2'), sp, str(tmp_path), workers=1)
  assert 'its source changed; rebuilding it' in capsys.readouterr().out
  np.testing.assert_array_equal(tokens.ids, _expected(sp, DOCS[::-1]))


@pytest.mark.parametrize('damage', ['tokens', 'offsets', 'json'])
def test_a_corrupt_cache_is_named_and_rebuilt(tmp_path, capsys, damage):
  sp = tokenizer.load(VOCAB)
  token_cache.load(_split(DOCS), sp, str(tmp_path), workers=1)
  (path,) = (
    os.path.join(tmp_path, p)
    for p in os.listdir(tmp_path)
    if p.endswith(f'{damage}.npy') or p.endswith(damage)
  )
  with open(path, 'r+b') as f:  # a cut-short file, as a full disk leaves it
    f.truncate(os.path.getsize(path) - 7)
  tokens = token_cache.load(_split(DOCS), sp, str(tmp_path), workers=1)
  out = capsys.readouterr().out
  assert 'Token cache' in out and 'rebuilding it' in out
  assert 'unreadable' in out or 'corrupt' in out
  np.testing.assert_array_equal(tokens.ids, _expected(sp, DOCS))


@pytest.mark.parametrize('array', ['tokens', 'offsets'])
def test_a_flipped_byte_of_the_right_size_is_caught_by_the_checksum(tmp_path, capsys, array):
  sp = tokenizer.load(VOCAB)
  built = token_cache.load(_split(DOCS), sp, str(tmp_path), workers=1)
  (path,) = (os.path.join(tmp_path, p) for p in os.listdir(tmp_path) if p.endswith(f'{array}.npy'))
  # The low byte of the second document's first id, or of where the second document starts:
  # the sizes and the offsets' order still agree with the metadata.
  data_bytes = built.ids.nbytes if array == 'tokens' else built.offsets.nbytes
  header = os.path.getsize(path) - data_bytes  # the NumPy file's own header comes first
  position = header + (2 * built.offsets[1] + 2 if array == 'tokens' else 8)
  with open(path, 'r+b') as f:
    f.seek(position)
    byte = f.read(1)[0]
    f.seek(position)
    f.write(bytes([byte ^ 1]))
  tokens = token_cache.load(_split(DOCS), sp, str(tmp_path), workers=1)
  assert f'its {array}.npy does not match its checksum (corrupt); rebuilding it' in (
    capsys.readouterr().out
  )
  np.testing.assert_array_equal(tokens.ids, _expected(sp, DOCS))
  np.testing.assert_array_equal(tokens.offsets, built.offsets)


def test_a_failed_build_leaves_no_cache_behind(tmp_path):
  def docs():
    yield DOCS[0]
    raise ValueError('bad.txt is not UTF-8')

  with pytest.raises(ValueError, match='bad.txt'):
    token_cache.load(
      sources.Split('tiny-train', 'v1', docs), tokenizer.load(VOCAB), str(tmp_path), workers=1
    )
  assert os.listdir(tmp_path) == []


def test_worker_processes_build_the_same_cache(tmp_path, monkeypatch):
  monkeypatch.setattr(token_cache, '_TASK_BYTES', 100)  # several tasks per worker
  sp = tokenizer.load(VOCAB)
  docs = [f'{d} {i}' for i in range(40) for d in DOCS]
  one = token_cache.load(_split(docs), sp, str(tmp_path / 'one'), workers=1)
  two = token_cache.load(_split(docs), sp, str(tmp_path / 'two'), workers=2)
  np.testing.assert_array_equal(one.ids, two.ids)
  np.testing.assert_array_equal(one.offsets, two.offsets)
  assert one.num_bytes == two.num_bytes == sum(len(d.encode()) for d in docs)
