"""Device mesh and shardings: FSDP over one mesh axis."""

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from nanodo.model import FSDP
from nanodo.optimizer import PyTree


def make_mesh() -> jax.sharding.Mesh:
  """All devices on the 'fsdp' axis; Auto axes so jit propagates shardings (GSPMD)."""
  return jax.make_mesh((jax.device_count(),), (FSDP,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batches are split along B over the devices."""
  return NamedSharding(mesh, P(FSDP))


def _fits(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
  """The spec, or replication where a sharded dimension does not divide the axis size.

  A state of another rank than its parameter (Adafactor's factored moments) is replicated.
  """
  if len(spec) != len(shape):
    return P()
  return P(*(None if name and shape[i] % mesh.shape[name] else name for i, name in enumerate(spec)))


def state_shardings(abstract_state: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Shardings of a train state: declared specs for parameters, replicated scalars.

  Optimizer moments mirror the parameters (same tree paths), so they inherit their specs.
  Specs are matched by path: masked-out moments (Optax's MaskedNode) hold no array.
  """
  is_spec = lambda x: isinstance(x, P)
  specs = dict(jax.tree_util.tree_flatten_with_path(
      nnx.get_partition_spec(abstract_state), is_leaf=is_spec)[0])
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, _fits(specs[path], x.shape, mesh) if x.ndim else P()),
      abstract_state)
