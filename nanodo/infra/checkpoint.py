"""Orbax checkpoints of the train state and data position, each verified by a fingerprint."""

import contextlib
import os
import re
from collections.abc import Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from nanodo.ground import files
from nanodo.ground.console import log
from nanodo.ground.tree import PyTree

Manager = ocp.CheckpointManager
DataIter = grain.DatasetIterator
_UINTS = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


class SaveError(Exception):
  """A checkpoint could not be written; the message names it, why, and the last complete one."""


def manager(directory: str, max_to_keep: int | None = None) -> Manager:
  """Orbax manager of 'state', 'data' (Grain iterator) and 'fingerprint' items.

  With max_to_keep it writes: it creates the directory and removes the temporary directories
  of saves that a killed run never finished. Without, it only reads.
  """
  writes = max_to_keep is not None
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep, create=writes, cleanup_tmp_directories=writes
  )
  return Manager(os.path.abspath(directory), options=options)


def _checksum(tree: PyTree) -> jax.Array:
  """Sum of the bit patterns of tree's arrays, each times an odd weight that depends on its place.

  Odd weights: a flipped bit always changes the sum; place weights: so do swapped values.
  """
  total = jnp.uint32(0)
  for i, x in enumerate(jax.tree.leaves(tree)):
    bits = jax.lax.bitcast_convert_type(x, _UINTS[x.dtype.itemsize]).astype(jnp.uint32)
    weights = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape) * 2 + 1
    total += jnp.sum(bits * weights, dtype=jnp.uint32) * np.uint32(2 * i + 1)
  return total


@jax.jit
def fingerprint(state: PyTree) -> dict[str, jax.Array]:
  """A uint32 checksum of every bit of each top-level item of state (params, opt_state, step)."""
  return {k: _checksum(v) for k, v in state.items()}


def _fingerprint(state: PyTree) -> dict[str, int]:
  return {k: int(v) for k, v in jax.device_get(fingerprint(state)).items()}


def save(mngr: Manager, step: int, state: PyTree, data_iter: DataIter) -> None:
  """Starts an asynchronous save of state, the data position and their fingerprint.

  SaveError if this save, or the one before it (still in flight until now), cannot be written.
  """
  wait(mngr)
  saved = {'state': _fingerprint(state), 'data': data_iter.get_state()}
  args = ocp.args.Composite(
    state=ocp.args.StandardSave(state),
    data=grain.checkpoint.CheckpointSave(data_iter),
    fingerprint=ocp.args.JsonSave(saved),
  )
  try:
    mngr.save(step, args=args)
  # Any error: the arrays' writes (TensorStore) raise ValueError, the files' OSError.
  except Exception as e:
    raise _save_error(mngr, step, e) from e


def wait(mngr: Manager) -> None:
  """Waits until the save in flight, if any, is complete on disk; SaveError if it failed."""
  step = mngr.latest_step()  # a save in flight is already the latest step
  try:
    mngr.wait_until_finished()
    mngr.check_for_errors()  # its metadata, written apart
  except Exception as e:
    raise _save_error(mngr, step, e) from e


@contextlib.contextmanager
def opened(directory: str, max_to_keep: int) -> Iterator[Manager]:
  """A manager that writes, closed on the way out once the save in flight is done; SaveError if
  that failed. A SaveError of that save supersedes another error that ends the body.
  """
  mngr = manager(directory, max_to_keep)
  try:
    yield mngr
  except SaveError:
    with contextlib.suppress(Exception):  # the failed save's other writes: reported already
      mngr.close()
    raise
  except BaseException:
    _close(mngr)
    raise
  _close(mngr)


def _close(mngr: Manager) -> None:
  try:
    wait(mngr)
  except SaveError:
    with contextlib.suppress(Exception):
      mngr.close()
    raise
  mngr.close()


def _save_error(mngr: Manager, step: int, e: Exception) -> SaveError:
  """The error of checkpoint step, naming the last complete checkpoint on disk."""
  # TensorStore reports the OS error inside its message: ... [os_error_code='28']
  code = re.search(r"os_error_code='?(\d+)", str(e))
  code = e.errno if isinstance(e, OSError) else int(code[1]) if code else None
  why = f'OSError: [Errno {code}] {os.strerror(code)}' if code else _one_line(e)
  mngr.reload()  # the steps on disk: a failed save left at most a temporary directory
  last, directory = mngr.latest_step(), mngr.directory
  kept = f'the last complete checkpoint is step {last} in {directory}'
  kept = kept if last is not None else f'{directory} holds no complete checkpoint'
  fix = 'Free some space' if code in files.NO_SPACE else 'Fix the cause'
  resume = f'{fix} and run the same command to resume.'
  return SaveError(f'checkpoint {step} could not be written ({why}); {kept}. {resume}')


def _one_line(e: Exception) -> str:
  """The first line of e with its type, at most 200 characters."""
  why = f'{type(e).__name__}: {e}'.strip().splitlines()[0]
  return why if len(why) <= 200 else why[:197] + '...'


def _abstract(tree: PyTree, shardings: PyTree) -> PyTree:
  """Shapes and dtypes of tree placed with shardings: the target that Orbax restores into."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def _restore_step(
  mngr: Manager, step: int, state_args: ocp.args.CheckpointArgs, data_iter: DataIter | None = None
) -> PyTree:
  """The state of one checkpoint, data_iter moved to it; ValueError(why, in a line) if damaged."""
  args = {'state': state_args, 'fingerprint': ocp.args.JsonRestore()}
  if data_iter is not None:
    args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**args))
    state, saved = restored['state'], restored['fingerprint']
    moved = data_iter is not None and data_iter.get_state() != saved['data']
    if _fingerprint(state) != {k: saved['state'][k] for k in state} or moved:
      raise ValueError('its data does not match the fingerprint written with it')
  # Any error: Orbax and TensorStore raise many types on damaged files.
  except Exception as e:
    raise ValueError(_one_line(e)) from e
  return state


def restore_params(
  mngr: Manager, step: int, params: PyTree, shardings: PyTree, key: str = 'params'
) -> PyTree:
  """The parameters of one checkpoint (key 'ema': their moving average), placed with
  shardings; ValueError if damaged.

  The optimizer state (twice their size) and the data position stay on disk.
  """
  target = {key: _abstract(params, shardings)}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
  try:
    return _restore_step(mngr, step, args)[key]
  except ValueError as e:
    raise ValueError(f'Checkpoint {step} in {mngr.directory} is unreadable ({e}).') from e


def restore(
  mngr: Manager, state: PyTree, shardings: PyTree, data_iter: DataIter, set_aside: bool = True
) -> PyTree:
  """The newest checkpoint that reads back intact, placed with shardings; data_iter moved to it.

  A damaged checkpoint (truncated, corrupted, missing files) is skipped for the one before it,
  with one line saying so. With set_aside, the skipped ones are renamed <step>.unreadable (kept,
  never deleted) so that the run can save those steps again. ValueError if none can be
  restored; then nothing is renamed.
  """
  args = ocp.args.StandardRestore(_abstract(state, shardings))
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = _restore_step(mngr, step, args, data_iter)
    except ValueError as e:
      damaged.append((step, str(e)))
      continue
    for bad, error in damaged:
      if jax.process_index():  # process 0 renames and reports for the run
        continue
      path = os.path.join(mngr.directory, str(bad))
      kept = _set_aside(path) if set_aside else path
      log(
        f'Checkpoint {bad} is unreadable ({error}); resuming from checkpoint {step} instead. '
        f'The unreadable one is kept as {kept}.'
      )
    mngr.reload()
    return restored
  if not damaged:
    raise ValueError(f'{mngr.directory} has no checkpoint.')
  step, error = damaged[0]
  newest = f'the newest, step {step}, fails with {error}'
  raise ValueError(f'No checkpoint in {mngr.directory} can be restored; {newest}')


def _set_aside(path: str) -> str:
  """Renames a damaged checkpoint to a name Orbax does not read as a step; returns the name."""
  dest, n = f'{path}.unreadable', 1
  while os.path.exists(dest):
    dest, n = f'{path}.unreadable{n}', n + 1
  os.rename(path, dest)
  return dest


def start(
  mngr: Manager, state: PyTree, shardings: PyTree, data_iter: DataIter, restore_dir: str
) -> tuple[PyTree, str]:
  """The workdir's last checkpoint, else the last of restore_dir's workdir, else state as it is.

  Also the line that says which checkpoint it is and where from; '' for state itself.
  """
  what = '(model, optimizer, data position)'
  if mngr.latest_step() is not None:
    restored = restore(mngr, state, shardings, data_iter)
    return restored, f'resumed from checkpoint {int(restored["step"])} in {mngr.directory} {what}'
  if not restore_dir:
    return state, ''
  with contextlib.closing(manager(os.path.join(restore_dir, 'checkpoints'))) as other:
    restored = restore(other, state, shardings, data_iter, set_aside=False)
    return restored, f'starting from checkpoint {int(restored["step"])} in {other.directory} {what}'
