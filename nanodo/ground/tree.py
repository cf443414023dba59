"""Pytree helpers: parameter paths and statistics of every array."""

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any  # a nested structure of arrays


def path_str(path: tuple) -> str:
  """'blocks/0/attn/wq_DxHxK' for a parameter's tree path."""
  return jax.tree_util.keystr(path, simple=True, separator='/').removesuffix('/value')


def by_path(tree: PyTree) -> dict[str, Any]:
  """{'blocks/0/attn/wq_DxHxK': leaf, ...} of a parameter tree."""
  return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def stats(prefix: str, tree: PyTree) -> dict[str, jax.Array]:
  """rms, mean and std of each array, keyed 'prefix/path/stat' (path as in the model's state).

  A captured module output's path ends at the module ('blocks/0/mlp'); the model's own is
  'output'.
  """
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    name = f'{prefix}/{path_str(path).split("__call__")[0].strip("/") or "output"}'
    x = x.astype(jnp.float32)
    # std in two passes: rms² - mean² cancels for values far from 0 (LayerNorm scales near 1).
    out[f'{name}/rms'] = jnp.sqrt(jnp.mean(jnp.square(x)))
    out[f'{name}/mean'], out[f'{name}/std'] = jnp.mean(x), jnp.std(x)
  return out
