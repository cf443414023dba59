"""Faults at the edges: a full disk in each writer, and each file nanodo reads back damaged."""

import errno
import json
import os

import numpy as np
import pytest
from conftest import VOCAB, tiny_config

from nanodo import train
from nanodo.corpora import sources, token_cache, tokenizer
from nanodo.infra import workdir
from nanodo.tools import hf_export

DOCS = ['Now is the winter of our discontent', 'Made glorious summer by this sun of York;']
NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full(*args, **kwargs):
  raise NO_SPACE


def test_a_full_disk_while_the_token_cache_is_built_names_it_and_leaves_no_cache(
  tmp_path, monkeypatch
):
  split, sp = sources.Split('tiny-train', 'v1', lambda: iter(DOCS)), tokenizer.load(VOCAB)
  with monkeypatch.context() as m:
    m.setattr(np, 'save', _full)  # the arrays' files, once their size is known
    with pytest.raises(OSError) as e:
      token_cache.load(split, sp, str(tmp_path), workers=1)
  assert e.value.errno == errno.ENOSPC and e.value.filename.endswith('.tokens.npy')
  assert os.listdir(tmp_path) == []  # nothing a later run could take for a cache
  line = workdir.no_room(e.value, str(tmp_path / 'checkpoints'))
  assert line == (
    f'{e.value.filename} could not be written (OSError: [Errno 28] No space left on device); '
    f'{tmp_path / "checkpoints"} holds no complete checkpoint yet. Free some space and run the '
    'same command to resume.'
  )
  tokens = token_cache.load(split, sp, str(tmp_path), workers=1)  # with room again
  assert len(tokens.offsets) == len(DOCS) + 1


def test_a_full_disk_during_an_export_leaves_out_as_it_was(tmp_path, monkeypatch, hf_exports):
  run, _ = hf_exports('llama')
  out = tmp_path / 'hf'
  out.mkdir()
  from safetensors import numpy as safetensors_numpy

  monkeypatch.setattr(safetensors_numpy, 'save_file', _full)
  with pytest.raises(OSError) as e:
    hf_export.export(run, str(out))
  assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
  assert os.listdir(out) == [] and sorted(os.listdir(tmp_path)) == ['hf']


def test_a_full_disk_for_tensorboard_ends_the_run_with_the_rows_before_whole(tmp_path, monkeypatch):
  from tensorboardX.record_writer import RecordWriter

  path = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(path))  # 6 steps
  writes, write = [], RecordWriter.write

  def full_after_5(self, data):  # a start of 6 steps writes 12 events: fail part of the way
    writes.append(data)
    if len(writes) > 5:
      raise NO_SPACE
    return write(self, data)

  monkeypatch.setattr(RecordWriter, 'write', full_after_5)
  c = tiny_config(path)
  c.opt.num_train_steps = 12
  with pytest.raises(OSError) as e:
    train.train_and_evaluate(c)
  assert e.value.errno == errno.ENOSPC and '.tfevents.' in e.value.filename
  with open(os.path.join(path, workdir.METRICS), encoding='utf-8') as f:
    steps = [json.loads(line)['step'] for line in f]  # each row whole
  assert steps[:6] == list(range(1, 7)) and 6 < steps[-1] < 12
  monkeypatch.undo()
  train.train_and_evaluate(c)  # with room again: resumed from checkpoint 6 (or 9)


@pytest.mark.parametrize(
  'text, error',
  [
    ('{"train_minutes": 1.0', 'unreadable'),
    ('[1, 2]', 'not a decision of train_minutes: \\[1, 2\\]'),
    ('{"train_minutes": 1}', 'unreadable .*missing 4 required'),
    (
      '{"train_minutes": 1, "num_train_steps": "9", "step_seconds": 1, "eval_seconds": 1, '
      '"start_seconds": 1}',
      'not a decision of train_minutes',
    ),
    (
      '{"train_minutes": 1, "num_train_steps": -3, "step_seconds": 1, "eval_seconds": 1, '
      '"start_seconds": 1}',
      'not a decision of train_minutes',
    ),
  ],
)
def test_a_damaged_budget_is_named_in_one_line_before_any_work(tmp_path, text, error):
  path = str(tmp_path / 'run')
  c = tiny_config(path, train_minutes=1.0)
  os.makedirs(path)
  workdir.write_config(c)
  with open(os.path.join(path, workdir.BUDGET), 'w', encoding='utf-8') as f:
    f.write(text)
  before = sorted(os.listdir(path))
  with pytest.raises(ValueError, match=f'budget.json is {error}.*delete it to time the steps'):
    train.train_and_evaluate(c)
  assert sorted(os.listdir(path)) == before


def test_a_torn_hyper_parameter_row_is_cut_before_the_next_start_appends(tmp_path):
  path = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(path))
  with open(os.path.join(path, workdir.HPARAMS), 'a', encoding='utf-8') as f:
    f.write('{"step": 6, "time": 17')  # a kill mid-write
  c = tiny_config(path)
  c.opt.num_train_steps = 9
  train.train_and_evaluate(c)
  with open(os.path.join(path, workdir.HPARAMS), encoding='utf-8') as f:
    assert [json.loads(line)['step'] for line in f] == [0, 6]


def test_token_cache_metadata_edited_into_another_shape_is_rebuilt(tmp_path, capsys):
  split, sp = sources.Split('tiny-train', 'v1', lambda: iter(DOCS)), tokenizer.load(VOCAB)
  built = token_cache.load(split, sp, str(tmp_path), workers=1)
  [meta] = [n for n in os.listdir(tmp_path) if n.endswith('.json')]
  (tmp_path / meta).write_text('[]')
  capsys.readouterr()
  tokens = token_cache.load(split, sp, str(tmp_path), workers=1)
  assert 'its metadata is not a JSON object (corrupt); rebuilding it.' in capsys.readouterr().out
  np.testing.assert_array_equal(tokens.ids, built.ids)
