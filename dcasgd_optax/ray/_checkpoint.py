"""Saving and restoring the parameter server's state with orbax-checkpoint.

A checkpoint is one pytree ``{params, opt_state, step, last_seq,
pulled_step}`` of host (NumPy) arrays, written by ``ocp.CheckpointManager``
under ``checkpoint_dir/<step>``. Saves are asynchronous: the arrays are
copied to host memory first, so the server may keep donating its device
buffers while orbax writes.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

# Checkpoint directories: owner only (they hold the model and optimizer state).
_DIR_MODE = 0o700


class ServerState(NamedTuple):
  """Everything a parameter server needs to continue a run.

  Attributes:
    params: the global model, a pytree.
    opt_state: the optax state (holding the per-worker backups, if any).
    step: number of updates applied so far, int64 scalar.
    last_seq: int64 ``[num_workers]``, the sequence number of the last
      gradient applied from each worker (-1 before its first).
    pulled_step: int64 ``[num_workers]``, the ``step`` at which each worker
      last pulled the params (its gradient's staleness is measured from it).
  """

  params: Any
  opt_state: Any
  step: Any
  last_seq: Any
  pulled_step: Any


def _to_host(state: ServerState) -> dict[str, Any]:
  # np.array copies, so later donation of the server's buffers is safe.
  return jax.tree.map(np.array, state._asdict())


def open_manager(
    directory: str, *, max_to_keep: int = 2
) -> ocp.CheckpointManager:
  """A CheckpointManager writing to ``directory`` (created if missing).

  ``directory`` (if this creates it) and every step directory get mode
  ``0o700``: a checkpoint holds the whole model and optimizer state, readable
  by its owner only.
  """
  directory = os.path.abspath(os.fspath(directory))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      file_options=ocp.options.FileOptions(path_permission_mode=_DIR_MODE),
  )
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, state: ServerState) -> None:
  """Starts an asynchronous save of ``state`` under its step."""
  step = int(state.step)
  if manager.latest_step() == step:
    return
  manager.save(step, args=ocp.args.StandardSave(_to_host(state)))


def restore_latest(
    manager: ocp.CheckpointManager, like: ServerState
) -> ServerState | None:
  """The latest checkpoint, shaped like ``like``; None if there is none."""
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_host(like))
  tree = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return ServerState(**tree)
