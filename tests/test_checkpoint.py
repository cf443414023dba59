"""Checkpoints: a fingerprint catches damage; a damaged checkpoint is skipped, kept, reported."""

import contextlib
import functools
import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config, tiny_model_config, tiny_steps, tokens_of

from nanodo import data
from nanodo.infra import checkpoint


@functools.cache
def _init() -> tuple:
  run = tiny_steps(tiny_model_config(), tiny_config('/unused'))
  return run.state, run.shardings


def _setup():
  """A fresh state, its shardings and a data iterator, as the train loop has them."""
  state, shardings = _init()
  rows = np.arange(4000, dtype=np.int32) % 90 + 4
  data_iter = iter(data.train_dataset(tokens_of([rows]), 16, 4, 0, 'packed'))
  return state, shardings, data_iter


def _write(directory: str) -> dict[int, dict]:
  """Checkpoints 3 and 6 of different states; returns what each holds, on the host."""
  state, shardings, data_iter = _setup()
  saved = {}
  with contextlib.closing(checkpoint.manager(directory, max_to_keep=5)) as mngr:
    for step in (3, 6):
      for _ in range(3):
        next(data_iter)
      state = jax.tree.map(lambda x: x + 1, state)
      saved[step] = {'state': jax.tree.map(np.asarray, state), 'data': data_iter.get_state()}
      checkpoint.save(mngr, step, state, data_iter)
  return saved


@pytest.fixture(scope='module')
def saved(tmp_path_factory) -> tuple[str, dict[int, dict]]:
  directory = str(tmp_path_factory.mktemp('ckpt') / 'checkpoints')
  return directory, _write(directory)


def _restore(directory: str, **kwargs) -> tuple[dict, dict]:
  state, shardings, data_iter = _setup()
  with contextlib.closing(checkpoint.manager(directory)) as mngr:
    restored = checkpoint.restore(mngr, state, shardings, data_iter, **kwargs)
  return jax.tree.map(np.asarray, restored), data_iter.get_state()


def _same(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def _fingerprint(state) -> dict[str, int]:
  return {k: int(v) for k, v in checkpoint.fingerprint(state).items()}


def test_fingerprint_changes_with_any_flipped_bit_or_swapped_values():
  on_device, _, _ = _setup()
  state = jax.tree.map(np.asarray, on_device)  # host arrays: one compile for all the variants
  before = _fingerprint(state)
  assert _fingerprint(on_device) == before
  rng = np.random.default_rng(0)
  leaves, treedef = jax.tree.flatten(state)
  for _ in range(20):
    i = int(rng.integers(len(leaves)))
    x = np.array(leaves[i]).reshape(-1)
    bits = x.view(np.uint32)
    bits[rng.integers(bits.size)] ^= np.uint32(1) << np.uint32(rng.integers(32))
    changed = [*leaves[:i], x.reshape(leaves[i].shape), *leaves[i + 1 :]]
    assert _fingerprint(jax.tree.unflatten(treedef, changed)) != before
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  i = next(i for i, p in enumerate(paths) if 'embed_VxD' in p and 'params' in p)
  embed = np.array(leaves[i])
  embed[[0, 1]] = embed[[1, 0]]
  swapped = _fingerprint(jax.tree.unflatten(treedef, [*leaves[:i], embed, *leaves[i + 1 :]]))
  assert swapped['params'] != before['params']
  assert swapped['opt_state'] == before['opt_state']


def test_an_intact_checkpoint_restores_bit_for_bit_with_its_data_position(saved, capsys):
  directory, expected = saved
  state, data_state = _restore(directory)
  assert _same(state, expected[6]['state'])
  assert data_state == expected[6]['data']
  assert capsys.readouterr().out == ''


def _largest_array_file(step_dir: str) -> str:
  return max(
    glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True), key=os.path.getsize
  )


def _truncate(step_dir: str) -> None:
  path = _largest_array_file(step_dir)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_a_byte(step_dir: str) -> None:
  path = _largest_array_file(step_dir)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))


def _empty_metadata(step_dir: str) -> None:
  open(os.path.join(step_dir, 'state', '_METADATA'), 'wb').close()


def _remove_fingerprint(step_dir: str) -> None:
  for path in glob.glob(os.path.join(step_dir, 'fingerprint', '*')):
    os.remove(path)


def _move_data_position(step_dir: str) -> None:
  path = glob.glob(os.path.join(step_dir, 'data', '*.json'))[0]
  with open(path, encoding='utf-8') as f:
    position = json.load(f)
  position['next_index'] += 1
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(position, f)


def _files(directory: str) -> list[str]:
  return sorted(
    os.path.relpath(p, directory) for p in glob.glob(os.path.join(directory, '**'), recursive=True)
  )


@pytest.mark.parametrize(
  'damage', [_truncate, _flip_a_byte, _empty_metadata, _remove_fingerprint, _move_data_position]
)
def test_a_damaged_latest_checkpoint_is_reported_kept_and_the_one_before_used(
  saved, tmp_path, capsys, damage
):
  directory = str(tmp_path / 'checkpoints')
  shutil.copytree(saved[0], directory)
  damage(os.path.join(directory, '6'))
  before = _files(os.path.join(directory, '6'))
  state, data_state = _restore(directory)
  assert _same(state, saved[1][3]['state'])
  assert data_state == saved[1][3]['data']
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith('Checkpoint 6 is unreadable (')
  assert 'resuming from checkpoint 3 instead' in lines[0]
  # Nothing deleted: the damaged checkpoint is renamed, every file still there.
  assert sorted(os.listdir(directory)) == ['3', '6.unreadable']
  assert _files(os.path.join(directory, '6.unreadable')) == before


def test_a_read_only_restore_skips_a_damaged_checkpoint_without_renaming(saved, tmp_path, capsys):
  directory = str(tmp_path / 'checkpoints')
  shutil.copytree(saved[0], directory)
  _truncate(os.path.join(directory, '6'))
  state, _ = _restore(directory, set_aside=False)
  assert _same(state, saved[1][3]['state'])
  assert 'Checkpoint 6 is unreadable' in capsys.readouterr().out
  assert sorted(os.listdir(directory)) == ['3', '6']


def test_when_no_checkpoint_restores_it_is_an_error_and_nothing_is_renamed(saved, tmp_path):
  directory = str(tmp_path / 'checkpoints')
  shutil.copytree(saved[0], directory)
  for step in ('3', '6'):
    _empty_metadata(os.path.join(directory, step))
  with pytest.raises(ValueError, match=r'No checkpoint in .* can be restored; the newest, step 6'):
    _restore(directory)
  assert sorted(os.listdir(directory)) == ['3', '6']


def test_restore_params_refuses_a_damaged_checkpoint(saved, tmp_path):
  directory = str(tmp_path / 'checkpoints')
  shutil.copytree(saved[0], directory)
  _flip_a_byte(os.path.join(directory, '6'))
  state, shardings, _ = _setup()
  with contextlib.closing(checkpoint.manager(directory)) as mngr:
    params = checkpoint.restore_params(mngr, 3, state['params'], shardings['params'])
    assert _same(jax.tree.map(np.asarray, params), saved[1][3]['state']['params'])
    with pytest.raises(ValueError, match='Checkpoint 6 in .* is unreadable'):
      checkpoint.restore_params(mngr, 6, state['params'], shardings['params'])
