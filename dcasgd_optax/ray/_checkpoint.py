"""Saving and restoring one server shard's state with orbax-checkpoint.

Shard ``k`` of ``K`` writes under ``checkpoint_dir/shard-k-of-K/<step>``.
The driver saves every shard at the same step, when no gradient is in
flight (see :mod:`_driver`), so the checkpoints of one step are consistent
with each other; a run resumes from the latest step that every shard holds.
Saves are asynchronous: the arrays are copied to host memory first, so the
shard may keep donating its device buffers while orbax writes. Orbax cannot
save empty arrays (the leaves a shard does not hold): only the non-empty
leaves are saved, by their index in the state's leaves.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp


class ServerState(NamedTuple):
  """Everything a parameter-server shard needs to continue a run.

  Attributes:
    params: the shard's part of the model (its shard tree, see
      :mod:`_layout`).
    opt_state: the optax state of that part (holding its slice of each
      worker's backup, if any).
    step: int64 ``[]``, gradients processed so far.
    last_seq: int64 ``[num_workers]``, the seq of the last gradient processed
      from each worker (-1 before its first).
    last_pull: int64 ``[num_workers]``, the ``step`` at which each worker
      last pulled (its next gradient's staleness is measured from it).
  """

  params: Any
  opt_state: Any
  step: Any
  last_seq: Any
  last_pull: Any


def _name(i: int) -> str:
  return f"{i:06d}"


def shard_directory(checkpoint_dir: str, shard: int, num_shards: int) -> str:
  return os.path.join(os.path.abspath(os.fspath(checkpoint_dir)),
                      f"shard-{shard}-of-{num_shards}")


class ShardCheckpoints:
  """The checkpoints of one shard: save, list, restore by step.

  Args:
    directory: this shard's directory (created if missing).
    max_to_keep: how many of the newest checkpoints to keep.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           create=True)
    self._manager = ocp.CheckpointManager(directory, options=options)

  @property
  def directory(self) -> str:
    return os.fspath(self._manager.directory)

  def steps(self) -> list[int]:
    """The steps of the complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, state: ServerState) -> None:
    """Starts an asynchronous save of ``state`` under its step."""
    step = int(state.step)
    if step in self._manager.all_steps():
      return
    leaves = jax.tree.leaves(state)
    host = {_name(i): np.array(x)  # A copy: the shard may donate its buffers.
            for i, x in enumerate(leaves) if np.size(x)}
    self._manager.save(step, args=ocp.args.StandardSave(host))

  def restore(self, step: int, like: ServerState) -> ServerState:
    """The checkpoint of ``step``, shaped like ``like``."""
    leaves, treedef = jax.tree.flatten(like)
    abstract = {_name(i): jax.ShapeDtypeStruct(np.shape(x), x.dtype)
                for i, x in enumerate(leaves) if np.size(x)}
    saved = self._manager.restore(step,
                                  args=ocp.args.StandardRestore(abstract))
    return jax.tree.unflatten(treedef, [
        saved[_name(i)] if np.size(x) else np.asarray(x)
        for i, x in enumerate(leaves)])

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()
