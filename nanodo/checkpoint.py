"""Orbax checkpoints of the train state and data position, each verified by a fingerprint."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from nanodo.progress import log
from nanodo.tree import PyTree

_UINTS = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def manager(directory: str, max_to_keep: int | None = None) -> ocp.CheckpointManager:
  """Orbax manager of 'state', 'data' (Grain iterator) and 'fingerprint' items.

  With max_to_keep it writes: it creates the directory and removes the temporary directories
  of saves that a killed run never finished. Without, it only reads.
  """
  writes = max_to_keep is not None
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep, create=writes, cleanup_tmp_directories=writes
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _checksum(x: jax.Array) -> jax.Array:
  """Sum of the array's bit patterns, each times an odd weight that depends on its position.

  Odd weights: a flipped bit always changes the sum; position weights: so do swapped values.
  """
  bits = jax.lax.bitcast_convert_type(x, _UINTS[x.dtype.itemsize]).astype(jnp.uint32)
  weights = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape) * 2 + 1
  return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def fingerprint(state: PyTree) -> dict[str, jax.Array]:
  """A uint32 checksum of every bit of each top-level item of state (params, opt_state, step)."""
  return {
    k: sum(
      (_checksum(x) * np.uint32(2 * i + 1) for i, x in enumerate(jax.tree.leaves(v))), jnp.uint32(0)
    )
    for k, v in state.items()
  }


def _fingerprint(state: PyTree) -> dict[str, int]:
  return {k: int(v) for k, v in jax.device_get(fingerprint(state)).items()}


def save(
  mngr: ocp.CheckpointManager, step: int, state: PyTree, data_iter: grain.DatasetIterator
) -> None:
  """Starts an asynchronous save of state, the data position and their fingerprint."""
  mngr.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      fingerprint=ocp.args.JsonSave({'state': _fingerprint(state), 'data': data_iter.get_state()}),
    ),
  )


def _restore_step(
  mngr: ocp.CheckpointManager, step: int, abstract: PyTree, data_iter: grain.DatasetIterator
) -> PyTree:
  """The state of one checkpoint; ValueError if it differs from what was saved."""
  restored = mngr.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract),
      data=grain.checkpoint.CheckpointRestore(data_iter),
      fingerprint=ocp.args.JsonRestore(),
    ),
  )
  saved = restored['fingerprint']
  if _fingerprint(restored['state']) != saved['state'] or data_iter.get_state() != saved['data']:
    raise ValueError('its data does not match the fingerprint written with it')
  return restored['state']


def restore_params(
  mngr: ocp.CheckpointManager, step: int, params: PyTree, shardings: PyTree
) -> PyTree:
  """The parameters of one checkpoint, placed with shardings; ValueError if damaged.

  The optimizer state (twice their size) and the data position stay on disk.
  """
  target = {
    'params': jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
    )
  }
  try:
    restored = mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          target,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True,
        ),
        fingerprint=ocp.args.JsonRestore(),
      ),
    )
    params = restored['state']['params']
    if _fingerprint({'params': params})['params'] != restored['fingerprint']['state']['params']:
      raise ValueError('its data does not match the fingerprint written with it')
  # Any error: Orbax and TensorStore raise many types on damaged files.
  except Exception as e:
    raise ValueError(
      f'Checkpoint {step} in {mngr.directory} is unreadable ({_one_line(e)}).'
    ) from e
  return params


def _one_line(e: Exception) -> str:
  text = f'{type(e).__name__}: {e}'.strip().splitlines()[0]
  return text if len(text) <= 200 else text[:197] + '...'


def restore(
  mngr: ocp.CheckpointManager,
  state: PyTree,
  shardings: PyTree,
  data_iter: grain.DatasetIterator,
  set_aside: bool = True,
) -> PyTree:
  """The newest checkpoint that reads back intact, placed with shardings; data_iter moved to it.

  A damaged checkpoint (truncated, corrupted, missing files) is skipped for the one before it,
  with one line saying so. With set_aside, the skipped ones are renamed <step>.unreadable (kept,
  never deleted) so that the run can save those steps again. ValueError if none can be
  restored; then nothing is renamed.
  """
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = _restore_step(mngr, step, abstract, data_iter)
    # Any error: Orbax and TensorStore raise many types on damaged files.
    except Exception as e:
      damaged.append((step, _one_line(e)))
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
  raise ValueError(
    f'No checkpoint in {mngr.directory} can be restored; the newest, step {step}, '
    f'fails with {error}'
  )


def _set_aside(path: str) -> str:
  """Renames a damaged checkpoint to a name Orbax does not read as a step; returns the name."""
  dest, n = f'{path}.unreadable', 1
  while os.path.exists(dest):
    dest, n = f'{path}.unreadable{n}', n + 1
  os.rename(path, dest)
  return dest
