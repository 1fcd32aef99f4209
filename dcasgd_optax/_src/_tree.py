"""Pytree helpers: variable wrappers, structure checks with readable paths.

Flax NNX users hold params as ``nnx.State`` of ``nnx.Param`` and, inside
``nnx.Optimizer``, an optimizer state whose leaves are wrapped in
``OptVariable``. Such a variable is a pytree node around one array. The
helpers here see through it (duck-typed: the core does not import flax), so
a tree of wrapped arrays and the same tree of bare arrays match.
"""

from __future__ import annotations

from typing import Any

import jax
import optax


def is_masked(x: Any) -> bool:
  """True for the placeholder optax.masked leaves for excluded params."""
  return isinstance(x, optax.MaskedNode)


def is_variable(x: Any) -> bool:
  """True for a variable wrapper around one array (e.g. flax.nnx's Param).

  Duck-typed on the wrapper protocol (``get_metadata`` with ``get_value`` or
  ``value``), so flax is not imported.
  """
  cls = type(x)
  return hasattr(cls, "get_metadata") and (
      hasattr(cls, "get_value") or hasattr(cls, "value")
  )


def _value_of(x: Any) -> Any:
  if not is_variable(x):
    return x
  leaves = jax.tree.leaves(x)
  if len(leaves) != 1:
    raise TypeError(
        f"A {type(x).__name__} variable holds {len(leaves)} arrays; params "
        "and optimizer states must hold one array per variable."
    )
  return leaves[0]


def unwrap_variables(tree: Any) -> Any:
  """``tree`` with every variable wrapper replaced by the array it holds.

  Plain pytrees come back unchanged; an ``nnx.State`` of ``Param`` comes back
  as an ``nnx.State`` of arrays, which ``nnx.update`` accepts.
  """
  return jax.tree.map(_value_of, tree, is_leaf=is_variable)


def map_like(fn: Any, tree: Any, other: Any) -> Any:
  """``fn(leaf, other_leaf)`` over ``tree``'s leaves, keeping its wrappers.

  ``other`` must have ``tree``'s structure once variable wrappers are
  ignored (check it first with :func:`check_matches_backups`); masked leaves
  (``optax.MaskedNode``) are passed to ``fn`` as they are.
  """
  leaves, treedef = jax.tree.flatten(tree, is_leaf=is_masked)
  others = jax.tree.leaves(unwrap_variables(other), is_leaf=is_masked)
  return jax.tree.unflatten(treedef, [fn(a, b) for a, b in zip(leaves, others)])


def check_matches_backups(name: str, tree: Any, backups: Any) -> None:
  """Raises ValueError unless ``tree`` has one backup's structure and shapes.

  Variable wrappers on either side are ignored (see :func:`unwrap_variables`).

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
  tree, backups = unwrap_variables(tree), unwrap_variables(backups)
  want: Any = jax.tree.structure(backups, is_leaf=is_masked)
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
