"""Pytree helpers: leaf-by-leaf structure checks with readable paths."""

from __future__ import annotations

from typing import Any

import jax
import optax


def is_masked(x: Any) -> bool:
  """True for the placeholder optax.masked leaves in place of excluded params."""
  return isinstance(x, optax.MaskedNode)


def check_matches_backups(name: str, tree: Any, backups: Any) -> None:
  """Raises ValueError unless ``tree`` has the structure and shapes of one backup.

  Args:
    name: the argument's name, used in the message.
    tree: a params-shaped pytree.
    backups: the stored backups, each leaf with a leading ``num_workers`` axis.
  """
  if tree is None:
    raise ValueError(
        f"`{name}` is None: delay compensation needs the current global "
        "parameters w to form w - backup[worker]. Pass `params` to "
        "`tx.update(grads, state, params, worker=m)`."
    )
  want = jax.tree.structure(backups, is_leaf=is_masked)
  got = jax.tree.structure(tree, is_leaf=is_masked)
  if want != got:
    raise ValueError(
        f"`{name}` has a different tree structure from the params the "
        f"optimizer state was initialised with.\n  expected: {want}\n  got:"
        f"      {got}"
    )
  leaves = jax.tree_util.tree_flatten_with_path(backups, is_leaf=is_masked)[0]
  for (path, b), x in zip(leaves, jax.tree.leaves(tree, is_leaf=is_masked)):
    if is_masked(b):
      continue
    shape = getattr(x, "shape", None)
    if shape is None or tuple(shape) != tuple(b.shape[1:]):
      raise ValueError(
          f"`{name}` leaf {jax.tree_util.keystr(path)} has shape {shape}, "
          f"expected {tuple(b.shape[1:])} (the shape at init)."
      )
