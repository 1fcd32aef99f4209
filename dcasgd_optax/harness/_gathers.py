"""Host-side gathers: splitting batches into chunks and joining per-chunk outputs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

@jax.jit
def _take_rows(tree: Any, rows: jax.Array) -> Any:
  return jax.tree.map(lambda x: x[rows], tree)

def split_chunks(tree: Any, rows_CxL: np.ndarray) -> list[Any]:
  """``tree``'s rows ``rows_CxL[c]`` for every chunk ``c``: one gather."""
  leaves, treedef = jax.tree.flatten(_take_rows(tree, rows_CxL))
  per_leaf = [list(x) for x in leaves]  # one unstack per leaf
  return [treedef.unflatten(row) for row in zip(*per_leaf)]

@jax.jit
def concat_rows(lists: Any, keep: jax.Array) -> Any:
  """Each list of arrays in ``lists`` concatenated, rows ``keep`` kept."""
  return tuple(jnp.concatenate(xs)[keep] for xs in lists)

@jax.jit
def copy_tree(tree: Any) -> Any:
  """A copy of ``tree`` (so that donating it leaves the original intact)."""
  return jax.tree.map(jnp.copy, tree)
