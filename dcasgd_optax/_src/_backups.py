"""The per-worker backups a parameter server keeps, and the transformation
built on them.

What :func:`delay_compensation` and :func:`gap_aware` share: the state
(:class:`DelayCompensationState`), its construction and checks, reading the
model a worker holds (or taking it from the caller, ``held_params``), the
running mean square and counts, and the transformation that corrects a
gradient with them (:func:`backups_transformation`), into which each method
plugs its own ``correct``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcasgd_optax._src import _checks
from dcasgd_optax._src import _tree


class DelayCompensationState(NamedTuple):
  """The parameter server's memory of what each worker holds.

  :func:`delay_compensation` and :func:`gap_aware` both keep this state (one
  per optimizer: the simulator, :func:`record_pull`, :func:`worker_params`
  and :func:`pull` read the backups from it).

  Attributes:
    backups: a pytree shaped like params whose every leaf has a leading axis
      of size ``num_workers``: ``backups[m]`` is the model worker ``m`` holds
      (the one it pulled last). Dtype ``backup_dtype`` (default: each param's
      own dtype). Every worker starts holding the initial params.
    mean_square: the running mean of ``g * g`` (DC-ASGD-a's MeanSquare,
      gap-aware's second moment), a pytree shaped like params in float32
      (float64 for float64 params), each leaf with a leading ``num_workers``
      axis when kept per worker; ``()`` for DC-ASGD-c.
    count: int32 number of updates applied (shape ``()``), or per worker
      when the mean square is kept per worker (shape ``(num_workers,)``):
      the ``t`` of the bias correction and the λ warm-up.
  """

  backups: Any
  mean_square: Any
  count: Any = ()


class MeanSquareSpec(NamedTuple):
  """Which running mean of ``g * g`` a backups-holding state keeps.

  Attributes:
    decay: the running mean's decay, or ``None`` for no mean square.
    per_worker: one mean square (and count) per worker.
  """

  decay: Any
  per_worker: bool = False


def stats_dtype(dtype: Any) -> Any:
  """At least float32: float64 stays, bf16/f16 (and ints) widen to float32.

  Spelled out rather than ``jnp.promote_types(dtype, float32)``, which JAX's
  strict dtype promotion refuses for bf16.
  """
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 4:
    return dtype
  return jnp.dtype(jnp.float32)


def backups_transformation(
    num_workers: int, backup_dtype: Any, stats: MeanSquareSpec, correct: Any
) -> optax.GradientTransformationExtraArgs:
  """A transformation that keeps per-worker backups and corrects with them.

  What :func:`delay_compensation` and :func:`gap_aware` share: the
  :class:`DelayCompensationState`, the checks, the worker's backup, the mean
  square and count, and NaN updates for a traced out-of-range worker.

  Args:
    num_workers: number of workers (checked by the caller).
    backup_dtype: dtype of the backups, or ``None`` for each param's.
    stats: which mean square the state keeps.
    correct: ``correct(updates, params, held, ms, count, state)`` returns
      the corrected updates, given the worker's backup ``held``, the mean
      square ``ms`` this update sees and its ``count``, and the new state.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``(updates, state, params, *, worker, held_params=None,
    **extra_args)`` (see :func:`held_of` for ``held_params``).
  """

  def init_fn(params):
    return init_state(params, num_workers, backup_dtype, stats)

  def update_fn(updates, state, params=None, *, worker=None, held_params=None,
                **extra_args):
    del extra_args
    check_update(updates, state, params, worker, num_workers)
    held = held_of(state.backups, worker, num_workers, held_params)
    ms, count, state = next_mean_square(
        state, updates, worker, num_workers, stats
    )
    out = correct(updates, params, held, ms, count, state)
    return nan_unless(worker_is_valid(worker, num_workers), out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def init_state(
    params: Any, num_workers: int, backup_dtype: Any, stats: MeanSquareSpec
) -> DelayCompensationState:
  """Every worker holds ``params``; the mean square and count start at zero."""
  if params is None:
    raise ValueError("`params` is None: init needs the initial params.")
  lead = (num_workers,) if stats.per_worker else ()

  def backup(p):
    p = jnp.asarray(p, backup_dtype or jnp.asarray(p).dtype)
    return jnp.broadcast_to(p[None], (num_workers, *p.shape)).copy()

  def zeros(p):
    return jnp.zeros(lead + jnp.shape(p), stats_dtype(jnp.result_type(p)))

  with_stats = stats.decay is not None
  return DelayCompensationState(
      backups=jax.tree.map(backup, params),
      mean_square=jax.tree.map(zeros, params) if with_stats else (),
      count=jnp.zeros(lead, jnp.int32),
  )


def check_backup_dtype(backup_dtype: Any) -> None:
  """Raises unless ``backup_dtype`` is None or a floating dtype."""
  if backup_dtype is not None and not jnp.issubdtype(
      backup_dtype, jnp.floating
  ):
    raise TypeError(
        f"`backup_dtype` must be a floating dtype or None, got {backup_dtype}."
    )


def check_update(
    updates: Any, state: Any, params: Any, worker: Any, num_workers: int
) -> None:
  """The checks of an update, before any state is touched."""
  _checks.check_worker(worker, num_workers)
  _tree.check_matches_backups("params", params, state.backups)
  _tree.check_matches_backups("updates", updates, state.backups)
  stored = num_workers_of(state)
  if stored not in (None, num_workers):
    raise ValueError(
        f"The state holds backups for {stored} workers, but this "
        f"transformation was built with num_workers={num_workers}."
    )


def worker_is_valid(worker: Any, num_workers: int) -> jax.Array:
  """Whether ``worker`` lies in ``[0, num_workers)`` (a traced bool)."""
  return jnp.logical_and(worker >= 0, worker < num_workers)


def nan_unless(valid: Any, tree: Any) -> Any:
  """``tree`` where ``valid``, else all NaN (a traced out-of-range worker)."""
  return jax.tree.map(
      lambda u: jnp.where(valid, u, jnp.asarray(np.nan, u.dtype)), tree
  )


def held_of(backups: Any, worker: Any, num_workers: int,
            held_params: Any = None) -> Any:
  """The model ``worker`` holds, which the compensation compares with ``w``.

  The compensation proper is a function of the gradient, the server's params
  and this model; the backups-holding transformation is a thin wrapper that
  reads it from its state, ``backups[worker]``, unless the caller passes it
  as the keyword extra argument ``held_params`` of ``update``. A driver
  whose backups live elsewhere (the simulator, with the backups sharded by
  worker over several devices) passes the worker's row that way, with any
  array of the backups' shape in the state (e.g. that row broadcast, never
  materialised): the update then reads no row of the state's backups, and
  what it writes to them is the caller's to keep or drop.

  Args:
    backups: the state's backups (each leaf ``[num_workers, ...]``).
    worker: the worker's id (clamped; callers mask an invalid one).
    num_workers: the backups' leading axis.
    held_params: ``None``, or the params-shaped model the worker holds (cast
      to the backups' dtype, as its backup would be).

  Returns:
    A params-shaped pytree in the backups' dtype.
  """
  if held_params is None:
    return held_by(backups, worker, num_workers)
  _tree.check_matches_backups("held_params", held_params, backups)
  return _tree.map_like(
      lambda b, h: b if _tree.is_masked(b) else jnp.asarray(h).astype(b.dtype),
      backups, held_params,
  )


def held_by(backups: Any, worker: Any, num_workers: int) -> Any:
  """The params worker ``worker`` holds (clamped index; callers mask)."""
  idx = jnp.clip(jnp.asarray(worker, jnp.int32), 0, num_workers - 1)
  return jax.tree.map(
      lambda b: jax.lax.dynamic_index_in_dim(b, idx, 0, keepdims=False),
      backups,
  )


def next_mean_square(
    state: DelayCompensationState,
    grads: Any,
    worker: Any,
    num_workers: int,
    stats: MeanSquareSpec,
    squares: Any = None,
) -> tuple[Any, Any, DelayCompensationState]:
  """Folds ``g * g`` (or ``squares``, when given) into the worker's (or the
  global) mean square.

  Returns the mean square this update sees (params-shaped; ``()`` without
  one), its count (the number of gradients in it, including this one), and
  the new state, unchanged for an invalid ``worker``.
  """
  valid = worker_is_valid(worker, num_workers)
  ms, count = state.mean_square, state.count
  if stats.per_worker:
    ms = held_by(ms, worker, num_workers)
    count = held_by(count, worker, num_workers)
  if stats.decay is not None and squares is not None:
    d = stats.decay
    ms = jax.tree.map(
        lambda m, s: d * m + (1 - d) * s.astype(m.dtype), ms, squares)
  elif stats.decay is not None:
    ms = jax.tree.map(lambda m, g: fold_square(m, g, stats.decay), ms, grads)
  count = count + 1
  new_state = state._replace(
      mean_square=_store(state.mean_square, ms, worker, valid, stats),
      count=_store(state.count, count, worker, valid, stats),
  )
  return ms, count, new_state


def fold_square(ms: Any, g: Any, decay: Any) -> Any:
  """One step of the running mean of ``g * g``: ``d * ms + (1 - d) * g * g``."""
  return decay * ms + (1 - decay) * jnp.square(g.astype(ms.dtype))


def _store(old: Any, new: Any, worker: Any, valid: Any,
           stats: MeanSquareSpec) -> Any:
  """Writes ``new`` into ``old`` (its worker's row when per worker)."""
  if isinstance(old, tuple) and not old:  # Not kept.
    return old
  if not stats.per_worker:
    return jax.tree.map(lambda o, n: jnp.where(valid, n, o), old, new)
  num_workers = jax.tree.leaves(old)[0].shape[0]
  idx = jnp.where(valid, jnp.asarray(worker, jnp.int32), num_workers)
  return jax.tree.map(
      lambda o, n: o.at[idx].set(n.astype(o.dtype), mode="drop"), old, new
  )


def num_workers_of(state: DelayCompensationState) -> int | None:
  """The backups' leading axis, or None for a params tree with no leaves."""
  leaves = jax.tree.leaves(state.backups)
  return leaves[0].shape[0] if leaves else None
