"""One server shard's state, and where its checkpoints go.

Shard ``k`` of ``K`` saves with the project's
:class:`~dcasgd_optax.checkpoint.Checkpointer` under
``checkpoint_dir/shard-k-of-K/<step>`` (directories readable by their owner
only). The driver saves every shard at the same step, when no gradient is in
flight (see :mod:`_driver`), so the checkpoints of one step are consistent
with each other; a run resumes from the latest step that every shard holds.
Orbax cannot save empty arrays (the leaves a shard does not hold, see
:mod:`_layout`): only the non-empty leaves are saved, keyed by their index
in the state's leaves, and the empty ones are rebuilt from the template.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np

from dcasgd_optax._src.checkpoint import Checkpointer


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


def shard_directory(checkpoint_dir: str, shard: int, num_shards: int) -> str:
  """Where shard ``shard`` of ``num_shards`` keeps its checkpoints."""
  return os.path.join(os.path.abspath(os.fspath(checkpoint_dir)),
                      f"shard-{shard}-of-{num_shards}")


def open_shard(
    checkpoint_dir: str, shard: int, num_shards: int
) -> Checkpointer:
  """The Checkpointer of one shard, creating ``checkpoint_dir`` if missing.

  A directory created here gets mode ``0o700`` (owner only), like the shard
  and step directories the Checkpointer creates: checkpoints hold the model.
  """
  os.makedirs(os.path.abspath(os.fspath(checkpoint_dir)), mode=0o700,
              exist_ok=True)
  return Checkpointer(shard_directory(checkpoint_dir, shard, num_shards))


def _nonempty(state: ServerState) -> dict[str, Any]:
  return {f"{i:06d}": x for i, x in enumerate(jax.tree.leaves(state))
          if np.size(x)}


def save(checkpointer: Checkpointer, state: ServerState) -> None:
  """Starts saving ``state`` under its step (copied first: safe to donate)."""
  checkpointer.save(int(state.step), _nonempty(state))


def restore(checkpointer: Checkpointer, step: int,
            like: ServerState) -> ServerState:
  """The checkpoint of ``step``, shaped like ``like`` (NumPy leaves)."""
  leaves, treedef = jax.tree.flatten(like)
  template = {k: np.empty(np.shape(x), x.dtype)
              for k, x in _nonempty(like).items()}
  saved = checkpointer.restore(step, template).tree
  keys = [f"{i:06d}" for i in range(len(leaves))]
  return jax.tree.unflatten(treedef, [
      saved[k] if k in saved else np.asarray(x) for k, x in zip(keys, leaves)])
