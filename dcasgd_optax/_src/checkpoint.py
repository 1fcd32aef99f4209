"""Checkpoints of a pytree of arrays with orbax: :class:`Checkpointer`."""

from __future__ import annotations

import numbers
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

# The items of every checkpoint (an orbax Composite).
_TREE, _METADATA = "tree", "metadata"
# Checkpoint directories are the owner's only: they hold a whole model state.
_DIR_MODE = 0o700


class Restored(NamedTuple):
  """A restored checkpoint.

  Attributes:
    step: the step it was saved under (a Python int).
    tree: the saved pytree, with the template's structure, shapes and
      dtypes.
    metadata: the JSON value saved with it (``None`` if none was).
  """

  step: int
  tree: Any
  metadata: Any


def _paths_and_leaves(tree: Any) -> tuple[list[str], list[Any]]:
  """``tree``'s leaves and their paths (``jax.tree_util.keystr``)."""
  paths_leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return ([jax.tree_util.keystr(path) for path, _ in paths_leaves],
          [leaf for _, leaf in paths_leaves])


def _name(i: int) -> str:
  """The name leaf ``i`` is saved under."""
  return f"{i:06d}"


def _describe(paths: list[str], leaves: list[Any]) -> dict[str, list]:
  """What a checkpoint records of its tree, to check a template against."""
  leaves = [x if hasattr(x, "dtype") else np.asarray(x) for x in leaves]
  return {
      "paths": paths,
      "shapes": [list(np.shape(x)) for x in leaves],
      "dtypes": [str(x.dtype) for x in leaves],
  }


@jax.jit
def _device_copy(x: jax.Array) -> jax.Array:
  return jnp.copy(x)


def _own_copy(leaf: Any) -> Any:
  """A copy of ``leaf`` that its owner may donate or overwrite: on the host
  (NumPy), except for an array split across processes, copied where it
  lies (each process then writes its own shards)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return _device_copy(leaf)
  return np.array(leaf)


def _restore_target(leaf: Any) -> Any:
  """How orbax should restore a leaf shaped like ``leaf``."""
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  leaf = np.asarray(leaf)
  return np.empty(leaf.shape, leaf.dtype)


def _check_matches(saved: dict[str, list], like: dict[str, list],
                   where: str) -> None:
  """Raises naming the first leaf of ``like`` that the checkpoint lacks or
  holds with another shape or dtype."""
  if saved["paths"] != like["paths"]:
    missing = sorted(set(like["paths"]) - set(saved["paths"]))
    extra = sorted(set(saved["paths"]) - set(like["paths"]))
    raise ValueError(
        f"The checkpoint {where} does not have the structure of `like`: "
        f"leaves only in `like`: {missing[:5]}; only in the checkpoint: "
        f"{extra[:5]}."
    )
  for i, path in enumerate(like["paths"]):
    saved_kind = (tuple(saved["shapes"][i]), saved["dtypes"][i])
    like_kind = (tuple(like["shapes"][i]), like["dtypes"][i])
    if saved_kind != like_kind:
      raise ValueError(
          f"The checkpoint {where} holds leaf {path} with (shape, dtype) "
          f"{saved_kind}, but `like` has {like_kind}."
      )


class Checkpointer:
  r"""Saves a pytree of arrays under increasing steps; restores the latest.

  Each checkpoint holds a pytree whose leaves are arrays (JAX or NumPy) and
  an optional JSON-serializable ``metadata`` value, written by orbax under
  ``directory/<step>``. :meth:`save` copies every leaf to host memory
  (NumPy) before it returns, so the caller may donate or overwrite its
  buffers right away; with ``asynchronous=True`` orbax then writes the files
  in a background thread (:meth:`wait_until_finished` or :meth:`close` waits
  for them). Orbax writes into a temporary directory and renames it when
  complete, so a save cut short by a crash is never restored. The directory
  (if this creates it) and every step directory get mode ``0o700``: only
  their owner may read or change a checkpoint.

  In a multi-process program (a pod slice: docs/pod.md) every process
  makes the same calls: an array split across processes (a simulator's
  backups) is copied where it lies and each process writes its own shards;
  the rest is written once, by process 0. ``directory`` must then be one
  that every process sees (a shared file system or a ``gs://`` bucket).

  :meth:`restore_latest` reads the newest checkpoint into the structure,
  shapes and dtypes of a template: the simulators' ``SimState``, the Ray
  parameter server's ``ServerState``, any pytree of arrays. Leaves come back
  as NumPy arrays, or as ``jax.Array``\ s with the template leaf's sharding
  where the template's leaf is a ``jax.Array``.

  Needs orbax-checkpoint (extras ``experiments`` or ``ray``).

  Args:
    directory: where the checkpoints go (created if missing).
    max_to_keep: how many of the most recent checkpoints to keep (older ones
      are deleted), or ``None`` to keep all.
    asynchronous: write in a background thread (``True``) or before
      :meth:`save` returns.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> from dcasgd_optax.extend.checkpoint import Checkpointer
    >>> state = {'w': jnp.ones(3), 'step': jnp.int32(7)}
    >>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
    ...   ckpt.save(7, state, metadata={'epochs': [0.25]})
    ...   ckpt.wait_until_finished()
    ...   restored = ckpt.restore_latest(state)
    True
    >>> restored.step, restored.metadata
    (7, {'epochs': [0.25]})
    >>> restored.tree['w'].tolist(), int(restored.tree['step'])
    ([1.0, 1.0, 1.0], 7)
  """

  def __init__(
      self,
      directory: str | os.PathLike[str],
      *,
      max_to_keep: int | None = 2,
      asynchronous: bool = True,
  ):
    if max_to_keep is not None and (
        isinstance(max_to_keep, bool)
        or not isinstance(max_to_keep, numbers.Integral)
        or max_to_keep < 1
    ):
      raise ValueError(
          f"`max_to_keep` must be an int >= 1 or None, got {max_to_keep!r}."
      )
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.fspath(directory)),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=asynchronous,
            file_options=ocp.options.FileOptions(
                path_permission_mode=_DIR_MODE),
        ),
    )

  @property
  def directory(self) -> str:
    """The directory holding the checkpoints."""
    return os.fspath(self._manager.directory)

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or ``None`` if none."""
    return self._manager.latest_step()

  def steps(self) -> list[int]:
    """The steps of all complete checkpoints kept, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, tree: Any, *, metadata: Any = None) -> bool:
    """Starts saving ``tree`` (and ``metadata``) under ``step``.

    Args:
      step: an int >= 0, at least the latest saved step.
      tree: a pytree of arrays.
      metadata: a JSON-serializable value saved with it.

    Returns:
      False if ``step`` is already saved (nothing is written), else True.

    Raises:
      ValueError: if ``step`` is not an int >= 0 or is below the latest
        saved step, or if ``tree`` has no leaves.
    """
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
      raise ValueError(f"`step` must be an int >= 0, got {step!r}.")
    latest = self._manager.latest_step()
    if step < 0 or (latest is not None and step < latest):
      raise ValueError(
          f"`step` must be >= 0 and >= the latest saved step {latest}, got "
          f"{step}."
      )
    if step == latest:
      return False
    paths, leaves = _paths_and_leaves(tree)
    if not leaves:
      raise ValueError("`tree` must have at least one array leaf, got none.")
    # Copies: the caller may donate or overwrite its buffers at once.
    leaves = [_own_copy(x) for x in leaves]
    record = {**_describe(paths, leaves), "value": metadata}
    self._manager.save(
        int(step),
        args=ocp.args.Composite(**{
            _TREE: ocp.args.StandardSave(
                {_name(i): x for i, x in enumerate(leaves)}),
            _METADATA: ocp.args.JsonSave(record),
        }),
    )
    return True

  def restore_latest(self, like: Any) -> Restored | None:
    """The newest checkpoint, shaped like ``like``; ``None`` if there is none.

    Args:
      like: a pytree with the structure, shapes and dtypes of the saved one
        (for example a freshly initialized state). Only its structure and
        its leaves' shapes, dtypes and shardings are used.

    Raises:
      ValueError: naming the first leaf whose path, shape or dtype differs
        between the checkpoint and ``like``.
    """
    step = self._manager.latest_step()
    return None if step is None else self.restore(step, like)

  def restore(self, step: int, like: Any) -> Restored:
    """The checkpoint of ``step`` (one of :meth:`steps`), shaped like ``like``.

    Raises:
      ValueError: as :meth:`restore_latest`.
    """
    record = self._manager.restore(
        step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
    )[_METADATA]
    paths, leaves = _paths_and_leaves(like)
    _check_matches(record, _describe(paths, leaves),
                   f"of step {step} in {self.directory}")
    targets = {_name(i): _restore_target(x) for i, x in enumerate(leaves)}
    flat = self._manager.restore(
        step,
        args=ocp.args.Composite(**{_TREE: ocp.args.StandardRestore(targets)}),
    )[_TREE]
    tree = jax.tree.unflatten(
        jax.tree.structure(like), [flat[_name(i)] for i in range(len(leaves))]
    )
    return Restored(step, tree, record["value"])

  def wait_until_finished(self) -> None:
    """Blocks until every started save is written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
