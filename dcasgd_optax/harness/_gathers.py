"""Host-side gathers: batches split into chunks, per-chunk outputs joined."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _take_rows(tree: Any, rows: jax.Array) -> Any:
  """``x[rows]`` for every leaf; with ``rows`` ``[N, C, S]`` and leaves
  ``[N, A, ...]`` (N simulations), simulation ``n``'s rows, as
  ``[C, N, S, ...]``."""
  if rows.ndim == 2:
    return jax.tree.map(lambda x: x[rows], tree)
  sims = jnp.arange(rows.shape[0])[:, None, None]
  return jax.tree.map(lambda x: jnp.swapaxes(x[sims, rows], 0, 1), tree)


def split_chunks(tree: Any, rows: np.ndarray) -> list[Any]:
  """``tree``'s rows of every chunk ``c``, ``rows[c]`` (``[C, S]``) or, for
  N simulations, ``rows[:, c]`` (``[N, C, S]``): one gather."""
  leaves, treedef = jax.tree.flatten(_take_rows(tree, rows))
  per_leaf = [list(x) for x in leaves]  # one unstack per leaf
  return [jax.tree.unflatten(treedef, row) for row in zip(*per_leaf)]


@functools.partial(jax.jit, static_argnames=("axis",))
def concat_rows(lists: Any, keep: jax.Array, axis: int = 0) -> Any:
  """Each list of arrays in ``lists`` concatenated along ``axis``, entries
  ``keep`` of that axis kept."""
  return tuple(
      jnp.take(jnp.concatenate(xs, axis), keep, axis=axis) for xs in lists
  )


@jax.jit
def copy_tree(tree: Any) -> Any:
  """A copy of ``tree`` (so that donating it leaves the original intact)."""
  return jax.tree.map(jnp.copy, tree)
