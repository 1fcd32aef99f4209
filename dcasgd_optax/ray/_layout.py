"""How the params (and the optax state) are split across server shards.

A :class:`Layout` assigns every element of the params to exactly one of
``num_shards`` shards, balanced by size. Leaves stay whole where that keeps
the shards balanced; a leaf too large for that is cut, in its row-major
(C-order) flattening, into contiguous pieces on different shards. A shard
never holds two pieces of one leaf.

Each shard runs the optax transformation on its own *shard tree*: the params'
tree structure with every leaf replaced by the shard's piece of it (a whole
leaf keeps its shape, a cut one is 1-D, a leaf the shard does not hold is an
empty 1-D array). All shard trees therefore have the params' structure, so
their optax states have the structure of the full state and
:func:`join_states` can reassemble it. This is exact for elementwise
transformations (SGD, momentum, Adam, delay compensation, ...); one that
combines values across leaves (``optax.clip_by_global_norm``, ...) sees only
its shard's part when ``num_shards > 1``.

:func:`split` and :func:`join` move between a full params-shaped tree and the
per-shard lists of pieces that travel on the wire; both work on NumPy arrays
and inside ``jax.jit``.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# A leaf goes whole to the least-loaded shard if that shard then holds at
# most this much more than an equal share (else the leaf is cut).
_SLACK = 0.05
# Sizes of the probe leaves that tell which state leaves belong to which
# param (see `_state_owners`): large, distinct, never a state's own axis.
_PROBE_BASE = 1_000_003


class Piece(NamedTuple):
  """A contiguous part of one leaf, held by one shard.

  Attributes:
    leaf: the leaf's index in ``jax.tree.leaves(params)``.
    start: its first element in the leaf's row-major flattening.
    stop: one past its last element.
  """

  leaf: int
  start: int
  stop: int


class Layout(NamedTuple):
  """Which shard holds which elements of the params.

  Attributes:
    treedef: the params' tree structure.
    shapes: each leaf's shape.
    dtypes: each leaf's dtype (``np.dtype``).
    pieces: ``pieces[k]``, shard ``k``'s pieces, ordered by leaf.
  """

  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[np.dtype, ...]
  pieces: tuple[tuple[Piece, ...], ...]

  @property
  def num_shards(self) -> int:
    return len(self.pieces)

  def is_whole(self, piece: Piece) -> bool:
    """Whether ``piece`` is its whole leaf (it then keeps the leaf's shape)."""
    return piece.start == 0 and piece.stop == math.prod(self.shapes[piece.leaf])

  def piece_shape(self, piece: Piece) -> tuple[int, ...]:
    if self.is_whole(piece):
      return self.shapes[piece.leaf]
    return (piece.stop - piece.start,)

  def shard_size(self, shard: int) -> int:
    """How many elements shard ``shard`` holds."""
    return sum(p.stop - p.start for p in self.pieces[shard])

  def split(self, tree: Any) -> list[list[Any]]:
    """``tree`` (params-shaped) as each shard's list of pieces."""
    return split(self, tree)

  def join(self, pieces_by_shard: Sequence[Sequence[Any]]) -> Any:
    """The params-shaped tree made of each shard's pieces (see :func:`join`)."""
    return join(self, pieces_by_shard)

  def shard_tree(self, shard: int, pieces: Sequence[Any]) -> Any:
    """Shard ``shard``'s params-structured tree (see :func:`shard_tree`)."""
    return shard_tree(self, shard, pieces)

  def join_states(self, init: Any, states: Sequence[Any]) -> Any:
    """The full optax state from each shard's (see :func:`join_states`)."""
    return join_states(init, self, states)


def _leaf_specs(params: Any) -> tuple[Any, list[tuple[int, ...]], list[Any]]:
  """``params``' tree structure, leaf shapes and leaf dtypes."""
  leaves, treedef = jax.tree.flatten(params)
  return treedef, [np.shape(x) for x in leaves], [
      np.dtype(jnp.result_type(x)) for x in leaves]


def _balance(sizes: Sequence[int], num_shards: int) -> list[list[Piece]]:
  """Largest leaves first, whole to the least-loaded shard, cut if too big.

  A shard takes at most an equal share (plus ``_SLACK`` for a whole leaf),
  and never so much that another shard would be left empty.
  """
  remaining = sum(sizes)
  cap = -(-remaining // num_shards)
  slack = int(cap * _SLACK)
  load = [0] * num_shards
  shards: list[list[Piece]] = [[] for _ in range(num_shards)]
  for leaf in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
    size, start = sizes[leaf], 0
    if size == 0:  # An empty leaf: shard 0 holds it, whole.
      shards[0].append(Piece(leaf, 0, 0))
    while start < size:
      k = min(range(num_shards), key=lambda j: (load[j], j))
      # Leave at least one element for every other empty shard.
      most = remaining - sum(1 for j, n in enumerate(load) if not n and j != k)
      if start == 0 and load[k] + size <= cap + slack and size <= most:
        take = size
      else:
        take = max(1, min(size - start, cap - load[k], most))
      shards[k].append(Piece(leaf, start, start + take))
      load[k] += take
      start += take
      remaining -= take
  return [sorted(s) for s in shards]


def make_layout(params: Any, num_shards: int) -> Layout:
  """Splits ``params`` over ``num_shards`` shards, balanced by size.

  Args:
    params: the params pytree (arrays or anything with a shape and dtype).
    num_shards: an int in ``[1, number of param elements]``.

  Returns:
    A :class:`Layout`; every shard holds at least one element.
  """
  if isinstance(num_shards, bool) or not isinstance(
      num_shards, numbers.Integral):
    raise TypeError(f"`num_shards` must be an int >= 1, got {num_shards!r}.")
  treedef, shapes, dtypes = _leaf_specs(params)
  sizes = [math.prod(s) for s in shapes]
  total = sum(sizes)
  if not 1 <= num_shards <= max(total, 1):
    raise ValueError(
        f"`num_shards` must be in [1, {total}] (every shard holds at least "
        f"one of the params' {total} elements), got {num_shards}."
    )
  pieces = _balance(sizes, int(num_shards))
  return Layout(treedef, tuple(tuple(s) for s in shapes), tuple(dtypes),
                tuple(tuple(p) for p in pieces))


def _cut(layout: Layout, x: Any, piece: Piece) -> Any:
  if layout.is_whole(piece):
    return x
  return x.reshape(-1)[piece.start:piece.stop]


def split(layout: Layout, tree: Any) -> list[list[Any]]:
  """``tree`` (params-shaped) as each shard's list of pieces."""
  leaves = layout.treedef.flatten_up_to(tree)
  return [[_cut(layout, leaves[p.leaf], p) for p in pieces]
          for pieces in layout.pieces]


def join(layout: Layout, pieces_by_shard: Sequence[Sequence[Any]]) -> Any:
  """The params-shaped tree whose shards' pieces are ``pieces_by_shard``.

  NumPy pieces give NumPy leaves; traced ones give ``jax.Array`` leaves.
  """
  parts: list[list[tuple[int, Any]]] = [[] for _ in layout.shapes]
  for pieces, arrays in zip(layout.pieces, pieces_by_shard, strict=True):
    for piece, x in zip(pieces, arrays, strict=True):
      parts[piece.leaf].append((piece.start, x))
  leaves = []
  for shape, leaf_parts in zip(layout.shapes, parts):
    leaf_parts.sort(key=lambda sx: sx[0])
    if len(leaf_parts) == 1:
      leaves.append(leaf_parts[0][1].reshape(shape))
      continue
    xs = [x.reshape(-1) for _, x in leaf_parts]
    xp = np if all(isinstance(x, np.ndarray) for x in xs) else jnp
    leaves.append(xp.concatenate(xs).reshape(shape))
  return layout.treedef.unflatten(leaves)


def shard_tree(layout: Layout, shard: int, pieces: Sequence[Any]) -> Any:
  """The params-structured tree of shard ``shard`` holding ``pieces``.

  Leaves the shard does not hold are empty 1-D arrays of the leaf's dtype.
  """
  leaves = [jnp.zeros((0,), d) for d in layout.dtypes]
  for piece, x in zip(layout.pieces[shard], pieces, strict=True):
    leaves[piece.leaf] = x
  return layout.treedef.unflatten(leaves)


def owned(layout: Layout, shard: int, tree: Any) -> list[Any]:
  """The pieces shard ``shard`` holds, from its shard tree ``tree``."""
  leaves = layout.treedef.flatten_up_to(tree)
  return [leaves[p.leaf] for p in layout.pieces[shard]]


def piece_specs(
    layout: Layout, shard: int
) -> list[tuple[tuple[int, ...], np.dtype]]:
  """``(shape, dtype)`` of each of shard ``shard``'s pieces, in order."""
  return [(layout.piece_shape(p), layout.dtypes[p.leaf])
          for p in layout.pieces[shard]]


def leaf_names(layout: Layout) -> list[str]:
  """Each leaf's path in the params, as ``jax.tree_util.keystr`` writes it."""
  dummy = layout.treedef.unflatten(range(len(layout.shapes)))
  paths = jax.tree_util.tree_flatten_with_path(dummy)[0]
  return [jax.tree_util.keystr(path) for path, _ in paths]


def _state_owners(init: Any, layout: Layout) -> list[tuple[int, tuple] | None]:
  """Each leaf of ``init(params)``'s state: ``(param leaf, prefix)`` or None.

  Runs ``init`` abstractly on probe params whose leaves have distinct large
  1-D sizes: a state leaf whose last axis has probe size ``i`` is derived
  elementwise from leaf ``i`` (``prefix`` its leading axes, e.g. the
  workers' axis of the backups); any other (a step count, a hyperparameter)
  is global to the state.
  """
  sizes = {_PROBE_BASE + 2 * i: i for i in range(len(layout.shapes))}
  probe = layout.treedef.unflatten(
      [jax.ShapeDtypeStruct((n,), d) for n, d in zip(sizes, layout.dtypes)])
  owners = []
  for x in jax.tree.leaves(jax.eval_shape(init, probe)):
    leaf = sizes.get(x.shape[-1]) if x.shape else None
    owners.append(None if leaf is None else (leaf, tuple(x.shape[:-1])))
  return owners


def check_shardable(init: Any, params: Any, layout: Layout) -> None:
  """Raises unless ``init``'s state splits elementwise along ``layout``."""
  full = jax.eval_shape(init, params)
  try:
    owners = _state_owners(init, layout)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        "`tx` cannot be split across shards (`num_shards` > 1): its init "
        f"fails on a part of the params ({type(e).__name__}: {e}). Use "
        "`num_shards=1`."
    ) from e
  for x, owner in zip(jax.tree.leaves(full), owners, strict=True):
    if owner is None:
      continue
    leaf, prefix = owner
    if tuple(x.shape) != prefix + layout.shapes[leaf]:
      raise ValueError(
          "`tx` cannot be split across shards (`num_shards` > 1): a leaf of "
          f"its state has shape {x.shape}, not a per-parameter shape. Use "
          "`num_shards=1`."
      )


def join_states(init: Any, layout: Layout, states: Sequence[Any]) -> Any:
  """The full optax state from each shard's state (NumPy leaves).

  A per-parameter leaf is concatenated from the shards' pieces; a global one
  (a step count, ...) is taken from shard 0 (all shards hold the same).
  """
  owners = _state_owners(init, layout)
  flat = [jax.tree.flatten(s) for s in states]
  treedef = flat[0][1]
  leaves = []
  for j, owner in enumerate(owners):
    if owner is None:
      leaves.append(np.asarray(flat[0][0][j]))
      continue
    leaf, prefix = owner
    parts = []
    for k, pieces in enumerate(layout.pieces):
      held = [p for p in pieces if p.leaf == leaf]
      if held:
        x = np.asarray(flat[k][0][j])
        parts.append((held[0].start, x.reshape(*prefix, -1)))
    parts.sort(key=lambda sx: sx[0])
    joined = np.concatenate([x for _, x in parts], axis=-1)
    leaves.append(joined.reshape(prefix + layout.shapes[leaf]))
  return jax.tree.unflatten(treedef, leaves)
