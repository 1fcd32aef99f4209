"""One server shard's state, and where its checkpoints go.

Shard ``k`` of ``K`` saves with the project's
:class:`~dcasgd_optax.extend.checkpoint.Checkpointer` under
``checkpoint_dir/shard-k-of-K/<step>`` (directories readable by their owner
only; a ``checkpoint_dir`` that other users can write to is refused, and the
counters of a restored checkpoint are checked). The driver saves every shard
at the same step, when no gradient is in flight (see :mod:`_driver`), so the
checkpoints of one step are consistent with each other; a run resumes from
the latest step that every shard holds.
Orbax cannot save empty arrays (the leaves a shard does not hold, see
:mod:`_layout`): only the non-empty leaves are saved, keyed by their index
in the state's leaves, and the empty ones are rebuilt from the template.
"""

from __future__ import annotations

import os
import stat
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dcasgd_optax.extend.checkpoint import Checkpointer


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


def _check_private(path: str, name: str) -> None:
  """Raises PermissionError if ``path`` is not a directory only its owner,
  this user, can write to (not a link)."""
  st = os.lstat(path)
  problem = None
  if stat.S_ISLNK(st.st_mode):
    problem = "is a symbolic link"
  elif not stat.S_ISDIR(st.st_mode):
    problem = "is not a directory"
  elif st.st_uid != os.getuid():
    problem = f"is owned by uid {st.st_uid}, not this user ({os.getuid()})"
  elif st.st_mode & 0o022:
    problem = (f"has mode {stat.S_IMODE(st.st_mode):o}: other users can "
               "write to it")
  if problem:
    raise PermissionError(
        f"`checkpoint_dir`: {name} {path} {problem}. Another user could then "
        "replace the checkpoints a run resumes from (and the code orbax "
        "loads with them). Use a directory of your own that only you can "
        f"write to (e.g. `chmod go-w {path}`).")


def open_shard(
    checkpoint_dir: str, shard: int, num_shards: int
) -> Checkpointer:
  """The Checkpointer of one shard, creating ``checkpoint_dir`` if missing.

  A directory created here gets mode ``0o700`` (owner only), like the shard
  and step directories the Checkpointer creates: checkpoints hold the model.

  Raises:
    PermissionError: ``checkpoint_dir`` (or the shard's directory in it) is
      a link, is another user's, or others can write to it.
  """
  root = os.path.abspath(os.fspath(checkpoint_dir))
  os.makedirs(root, mode=0o700, exist_ok=True)
  _check_private(root, "the directory")
  directory = shard_directory(checkpoint_dir, shard, num_shards)
  if os.path.lexists(directory):
    _check_private(directory, "the shard's directory")
  return Checkpointer(directory)


def _nonempty(state: ServerState) -> dict[str, Any]:
  return {f"{i:06d}": x for i, x in enumerate(jax.tree.leaves(state))
          if np.size(x)}


def save(checkpointer: Checkpointer, state: ServerState) -> None:
  """Starts saving ``state`` under its step (copied first: safe to donate)."""
  checkpointer.save(int(state.step), _nonempty(state))


def restore(checkpointer: Checkpointer, step: int,
            like: ServerState) -> ServerState:
  """The checkpoint of ``step``, shaped like ``like``, checked.

  Params and optax state come back as JAX arrays, the counters as int64
  NumPy arrays (the shard updates them in place).

  Raises:
    ValueError: the counters restored are not those of a run at ``step``
      (see :func:`check_counters`).
  """
  leaves, treedef = jax.tree.flatten(like)
  template = {k: np.empty(np.shape(x), x.dtype)
              for k, x in _nonempty(like).items()}
  saved = checkpointer.restore(step, template).tree
  keys = [f"{i:06d}" for i in range(len(leaves))]
  state = jax.tree.unflatten(treedef, [
      saved[k] if k in saved else np.asarray(x) for k, x in zip(keys, leaves)])
  check_counters(state, step, checkpointer.directory)
  return ServerState(
      params=jax.tree.map(jnp.asarray, state.params),
      opt_state=jax.tree.map(jnp.asarray, state.opt_state),
      step=np.int64(state.step),
      last_seq=np.array(state.last_seq, np.int64),
      last_pull=np.array(state.last_pull, np.int64),
  )


def check_counters(state: ServerState, step: int, where: Any) -> None:
  """Raises ValueError unless ``state``'s counters can be those at ``step``.

  Every processed gradient advanced ``step`` by one and was the next
  ``seq`` of its worker, so ``step`` is the sum of ``last_seq + 1``; each
  ``last_pull`` is in ``[0, step]``.
  """
  last_seq = np.asarray(state.last_seq)
  last_pull = np.asarray(state.last_pull)
  problem = None
  if int(state.step) != step:
    problem = f"its step is {int(state.step)}"
  elif (last_seq < -1).any():
    problem = f"a worker's last seq is below -1 ({last_seq.tolist()})"
  elif int((last_seq + 1).sum()) != step:
    problem = (f"its workers' gradient counts {(last_seq + 1).tolist()} do "
               "not add up to its step")
  elif ((last_pull < 0) | (last_pull > step)).any():
    problem = f"a worker's last pull is outside [0, {step}]"
  if problem:
    raise ValueError(
        f"The checkpoint of step {step} in {where} is inconsistent: {problem}; "
        "not restored.")
