"""Devices: several processes (jax.distributed), the ('data', 'fsdp') mesh, shardings."""

import os
import socket
import time

import jax
import ml_collections
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from nanodo.ground.console import log
from nanodo.ground.tree import PyTree

# FSDP: every weight is sharded over the 'fsdp' mesh axis along one dimension, and copied
# over the 'data' axis (data parallel). Batches are split along B over every device.
FSDP, DATA = 'fsdp', 'data'
BATCH = (DATA, FSDP)
# How JAX's runtime begins the message with which it aborts the processes left when one is lost.
LOST_PROCESS = 'Terminating process because the JAX distributed service detected fatal errors'


def launched_as_one_of_several() -> bool:
  """Whether a cluster launcher started this process as one of several.

  JAX_COORDINATOR_ADDRESS (JAX's own variable), SLURM with several tasks, Open MPI's mpirun,
  and Cloud TPU VMs of a multi-host slice.
  """
  env = os.environ
  slurm, tpu = int(env.get('SLURM_NTASKS', '1')) > 1, ',' in env.get('TPU_WORKER_HOSTNAMES', '')
  return 'JAX_COORDINATOR_ADDRESS' in env or 'OMPI_MCA_orte_hnp_uri' in env or slurm or tpu


def _wait_for(address: str, timeout: float) -> None:
  """Returns once address accepts TCP connections; ConnectionError after timeout seconds."""
  host, port = address.rsplit(':', 1)
  deadline = time.monotonic() + timeout
  while True:
    try:
      socket.create_connection((host.strip('[]'), int(port)), timeout=2).close()
      return
    except OSError as e:
      if time.monotonic() > deadline:
        raise ConnectionError(
          f'distributed.coordinator_address={address!r} could not be reached within '
          f'{timeout:g} s ({e}); start process 0 there, or fix the address.'
        ) from None
      time.sleep(0.5)


def initialize_distributed(d: ml_collections.ConfigDict) -> None:
  """Joins the processes of one run, if the config or a cluster launcher asks for several.

  Must run before anything touches the devices. Unset values (coordinator_address '',
  num_processes 0, process_id -1) are read by JAX from the launcher's environment.
  """
  if not d.coordinator_address and not launched_as_one_of_several():
    return
  address = d.coordinator_address or None
  num_processes = d.num_processes or None
  process_id = None if d.process_id < 0 else d.process_id
  # JAX aborts the process when the coordinator never answers: check it can be reached first.
  if address and process_id:
    _wait_for(address, d.initialization_timeout)
  if process_id == 0:  # not log(): JAX may not ask for the process index before this joins
    wait = f'waiting up to {d.initialization_timeout} s for the others at {address}'
    print(f'Process 0 of {num_processes}: {wait}.', flush=True)
  timeouts = {
    'initialization_timeout': d.initialization_timeout,
    'heartbeat_timeout_seconds': d.heartbeat_timeout,
  }
  jax.distributed.initialize(address, num_processes, process_id, **timeouts)
  # A lost process makes JAX abort the others from C++, where Python can print nothing: say now
  # what that will look like and what to do.
  stop = f'JAX stops the rest ({LOST_PROCESS!r})'
  resume = 'run the same command on every process to resume from the last checkpoint'
  n, t = jax.process_count(), d.heartbeat_timeout
  log(f'{n} processes joined; if one stops answering for {t} s, {stop}: then {resume}.')


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """The (data, fsdp) axis sizes; -1 takes the devices the other axis leaves."""
  if data == -1 and fsdp > 0 and num_devices % fsdp == 0:
    data = num_devices // fsdp
  elif fsdp == -1 and data > 0 and num_devices % data == 0:
    fsdp = num_devices // data
  if data < 1 or fsdp < 1 or data * fsdp != num_devices:
    raise ValueError(
      f'mesh.data={data}, mesh.fsdp={fsdp} is not valid: their product must be '
      f'the device count, {num_devices} (-1 on one axis: the devices the other '
      'leaves).'
    )
  return data, fsdp


def make_mesh(data: int, fsdp: int) -> jax.sharding.Mesh:
  """The ('data', 'fsdp') mesh over every device of every process.

  Auto axes (not jax.make_mesh's Explicit default): jit propagates the declared shardings
  through the model as GSPMD does, so the model code has no sharding annotations.
  """
  shape = mesh_shape(data, fsdp, jax.device_count())
  return jax.make_mesh(shape, (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batches are split along B over every device."""
  return NamedSharding(mesh, P(BATCH))


def _fits(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
  """The spec, or replication where a sharded dimension does not divide the axis size.

  A state of another rank than its parameter (Adafactor's factored moments) is replicated.
  """
  if len(spec) != len(shape):
    return P()
  return P(*(None if name and shape[i] % mesh.shape[name] else name for i, name in enumerate(spec)))


def _name(path: tuple) -> str:
  """A weight's attribute name: the last string key of its path in the state."""
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]


def state_shardings(abstract_state: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Shardings of a train state: declared specs for parameters, replicated scalars.

  Optimizer moments mirror the parameters (same tree paths), so they inherit their specs.
  Specs are matched by path: masked-out moments (Optax's MaskedNode) hold no array. A weight
  whose sharded dimension does not divide the axis size is replicated, and named in one logged
  line.
  """
  is_spec = lambda x: isinstance(x, P)
  specs = dict(
    jax.tree_util.tree_flatten_with_path(nnx.get_partition_spec(abstract_state), is_leaf=is_spec)[0]
  )
  replicated = set()

  def sharding(path: tuple, x: jax.ShapeDtypeStruct) -> NamedSharding:
    if not x.ndim:
      return NamedSharding(mesh, P())
    fitted = _fits(specs[path], x.shape, mesh)
    if len(specs[path]) == x.ndim and fitted != specs[path]:
      replicated.add(f'{_name(path)} {x.shape}')
    return NamedSharding(mesh, fitted)

  shardings = jax.tree_util.tree_map_with_path(sharding, abstract_state)
  if replicated:
    log(
      f'Replicated, as a dimension does not divide its mesh axis {dict(mesh.shape)}: '
      f'{", ".join(sorted(replicated))}.'
    )
  return shardings
