"""A start refused by a check that needs the corpus leaves the workdir as it found it."""

import json
import os
import pathlib

import pytest
from conftest import tiny_config

from nanodo import train
from nanodo.corpora import builtin

# A few hundred lines of a play, enough for some batches of the tiny model.
PARAGRAPHS = [p for p in builtin.shakespeare()[1][0].split('\n\n') if p][:300]


def _write_jsonl(path, docs, field='text') -> str:
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps({field: d}) + '\n' for d in docs)
  return str(path)


def _jsonl_config(tmp_path, train_docs, **overrides):
  c = tiny_config(str(tmp_path / 'run'), ds_name='jsonl', **overrides)
  c.train_split = _write_jsonl(tmp_path / 'train.jsonl', train_docs)
  c.eval_split = _write_jsonl(tmp_path / 'eval.jsonl', PARAGRAPHS[:20])
  return c


def _too_large_a_vocabulary(tmp_path, monkeypatch):
  c = _jsonl_config(tmp_path, PARAGRAPHS[:5], vocab_path='', vocab_size=5000)
  return c, 'vocab_size=5000 is not valid for this corpus'


def _fewer_rows_than_a_batch(tmp_path, monkeypatch):
  return _jsonl_config(tmp_path, PARAGRAPHS[:3]), 'fewer than a batch of 4'


def _hf_split_without_the_field(tmp_path, monkeypatch):
  import datasets  # the hf extra, which the test extra includes

  monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', str(tmp_path / 'hf_cache'))
  os.makedirs(tmp_path / 'hf')
  for split in ('train', 'test'):
    _write_jsonl(tmp_path / 'hf' / f'{split}.jsonl', PARAGRAPHS[:20])
  c = tiny_config(str(tmp_path / 'run'), ds_name=f'hf:{tmp_path / "hf"}', text_field='body')
  c.update(train_split='train', eval_split='test')
  return c, "has no field text_field='body'"


@pytest.mark.parametrize(
  'refusal', [_too_large_a_vocabulary, _fewer_rows_than_a_batch, _hf_split_without_the_field]
)
@pytest.mark.parametrize('fresh', ['absent', 'empty'])
def test_a_refused_start_leaves_a_fresh_workdir_as_it_was(tmp_path, monkeypatch, refusal, fresh):
  c, message = refusal(tmp_path, monkeypatch)
  if fresh == 'absent':
    c.workdir = str(tmp_path / 'new' / 'run')  # its parent made for it too
  else:
    os.makedirs(c.workdir)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(c)
  if fresh == 'absent':
    assert not os.path.exists(tmp_path / 'new')
  else:
    assert os.listdir(c.workdir) == []


def _contents(workdir: str) -> dict[str, bytes | None]:
  """Every file's bytes and every directory (None) under workdir, by relative path."""
  root = pathlib.Path(workdir)
  return {
    str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob('*')
  }


def test_a_refused_resume_removes_what_it_wrote_and_keeps_what_the_run_had(tmp_path):
  c = _jsonl_config(tmp_path, PARAGRAPHS)
  c.opt.num_train_steps = 3
  train.train_and_evaluate(c)
  before = _contents(c.workdir)
  assert any(p.startswith('checkpoints/3') for p in before)
  # A new held-out file, whose token cache this start builds, and the train file cut short:
  # too few rows are left for a batch.
  _write_jsonl(c.train_split, PARAGRAPHS[:3])
  c.eval_split = _write_jsonl(tmp_path / 'eval2.jsonl', PARAGRAPHS[20:40])
  c.opt.num_train_steps = 6
  with pytest.raises(ValueError, match='fewer than a batch of 4'):
    train.train_and_evaluate(c)
  after = _contents(c.workdir)
  assert sorted(after) == sorted(before)
  # Only the train split's cache differs: it no longer matched its source, so it was rebuilt.
  changed = [p for p in after if after[p] != before[p]]
  assert all(p.startswith('token_cache/jsonl-train-') for p in changed), changed


def test_a_refused_resume_of_a_hugging_face_run_changes_no_byte(tmp_path, monkeypatch):
  c, _ = _hf_split_without_the_field(tmp_path, monkeypatch)
  c.text_field = 'text'
  c.opt.num_train_steps = 3
  train.train_and_evaluate(c)
  before = _contents(c.workdir)
  # The dataset's column renamed since the run started.
  for split in ('train', 'test'):
    path = tmp_path / 'hf' / f'{split}.jsonl'
    _write_jsonl(path, PARAGRAPHS[:20], field='body')
  with pytest.raises(ValueError, match="has no field text_field='text'"):
    train.train_and_evaluate(c)
  assert _contents(c.workdir) == before
