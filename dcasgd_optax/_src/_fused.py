"""The full SGD-family optimizers' update in one pass over memory.

Composed, :func:`dcasgd` is a chain (delay compensation, weight decay, SGD,
then the pull) and XLA:CPU compiles every member to its own loop fusion: four
or five full passes over model-sized arrays per parameter, where one pass
that reads each input once and writes each output once would do (XLA:CPU
does not fuse sibling loops with several outputs). The fused update computes
the same numbers, parameter by parameter, with every output written in place:

* on CPU, :func:`dcasgd`'s large float32 parameters go to a hand-written
  kernel (:mod:`._cpu_kernel`, an XLA FFI custom call): one pass that reads
  each input once and updates the state in place, on all of XLA's threads.
  Where it does not apply (Gap-Aware, other dtypes, no C++ compiler, or
  ``DCASGD_OPTAX_CPU_KERNEL=0``), a parameter larger than two blocks is
  processed by a loop over cache-sized blocks; each iteration reads one
  block of every input (the gradient, the params, the worker's backup row,
  the mean square, the momentum) and writes every output for it, so the
  passes of the chain's members run on data already in cache (XLA:CPU runs
  that loop on one core);
* elsewhere (GPU and TPU fuse multi-output loops themselves), and for small
  parameters, the same elementwise function runs on whole arrays.

Only the elementwise maths is written here, for the SGD tail (weight decay,
momentum, Nesterov, the learning rate or its schedule, the pull): the
backups-holding part is the very ``correct`` function the composed
transformation applies (:func:`compensation_correction`,
:func:`gap_correction`), applied here to blocks, and the counts come from
:func:`next_mean_square`. The tests check equality with the composed chain.
Measured costs: ``benchmarks/update_cost.md``. The CPU kernel's path is
:mod:`._fused_kernel`, XLA's loop over blocks :mod:`._fused_blocked`; both
take this module's ``_Step`` (the maths) and ``_Leaf`` (one parameter).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from dcasgd_optax._src import _cpu_kernel
from dcasgd_optax._src import _fused_blocked
from dcasgd_optax._src import _fused_kernel
from dcasgd_optax._src import _rows
from dcasgd_optax._src._backups import MeanSquareSpec
from dcasgd_optax._src._backups import check_update
from dcasgd_optax._src._backups import fold_square
from dcasgd_optax._src._backups import held_of
from dcasgd_optax._src._backups import next_mean_square
from dcasgd_optax._src._backups import worker_is_valid
from dcasgd_optax._src.pull_after_push import PullAfterPush


class SgdTail(NamedTuple):
  """The chain members after the backups-holding transformation.

  Attributes:
    learning_rate: a scalar or an optax schedule (``optax.sgd``'s).
    momentum: heavy-ball momentum, or None for none.
    nesterov: Nesterov momentum.
    weight_decay: ``optax.add_decayed_weights``' coefficient or schedule, or
      None where the chain has no such member.
  """

  learning_rate: Any
  momentum: Any
  nesterov: bool
  weight_decay: Any


def fused_sgd(
    composed: PullAfterPush,
    num_workers: int,
    stats: MeanSquareSpec,
    correct: Callable[..., Any],
    tail: SgdTail,
    compensation: _cpu_kernel.Compensation | None = None,
) -> Any:
  """``composed``'s init with an update that gives its numbers in one pass.

  Args:
    composed: ``pull_after_push(optax.chain(backups_tx, [weight decay],
      optax.sgd(...)))``, whose state the fused update reads and returns.
    num_workers: the backups-holding transformation's worker count.
    stats: its mean-square spec.
    correct: its ``correct`` (see :func:`backups_transformation`), applied
      to blocks of each parameter.
    tail: the members after it.
    compensation: ``correct``'s arguments when it is
      :func:`compensation_correction` (DC-ASGD), for the CPU kernel; None
      keeps XLA's path everywhere.

  Returns:
    A transformation of ``composed``'s type, with ``composed.init``.
  """

  def update_fn(updates, state, params=None, *, worker=None, held_params=None,
                **extra_args):
    del extra_args
    dc_state, tail_states = state.inner_state[0], state.inner_state[1:]
    check_update(updates, dc_state, params, worker, num_workers)
    if held_params is not None:  # The caller's row: read no row of backups.
      held_params = held_of(dc_state.backups, worker, num_workers, held_params)
    valid = worker_is_valid(worker, num_workers)
    _, count, counted = next_mean_square(
        dc_state._replace(mean_square=()), updates, worker, num_workers,
        stats._replace(decay=None),
    )
    scalars, tail_states = _tail_scalars(tail, tail_states)
    step = _Step(correct, count, counted, stats, tail, scalars, valid,
                 compensation)
    row = jnp.clip(jnp.asarray(worker, jnp.int32), 0, num_workers - 1)
    trace = _trace_of(tail, tail_states)
    new_updates, backups, mean_square, trace = _map_leaves(
        step, row, updates, params, dc_state, trace, held_params
    )
    if not step.fresh_updates:  # Heavy-ball momentum: step_size * trace.
      new_updates = jax.tree.map(step.scale, trace)
    dc_state = counted._replace(backups=backups, mean_square=mean_square)
    inner = (dc_state, *_with_trace(tail, tail_states, trace))
    return new_updates, type(state)(inner)

  return type(composed)(composed.init, update_fn, composed.compensation)


class _Scalars(NamedTuple):
  weight_decay: Any  # the coefficient this update, or None
  step_size: Any  # -learning_rate this update
  scheduled: bool  # the step size comes from a schedule (cast per leaf)


def _tail_scalars(tail: SgdTail, states: Any) -> tuple[_Scalars, tuple]:
  """This update's weight decay and step size, and the tail's counted states.

  Mirrors ``optax.add_decayed_weights`` and ``optax.scale_by_learning_rate``.
  """
  states = list(states)
  wd = None
  if tail.weight_decay is not None:
    wd = tail.weight_decay
    if callable(wd):
      wd = wd(states[0].count)
      states[0] = states[0]._replace(
          count=optax.safe_increment(states[0].count)
      )
  sgd_trace, scale = states[-1]
  lr = tail.learning_rate
  if callable(lr):
    step = -1 * lr(scale.count)
    scale = scale._replace(count=optax.safe_increment(scale.count))
  else:
    step = -1 * lr
  states[-1] = (sgd_trace, scale)
  return _Scalars(wd, step, callable(lr)), tuple(states)


def _trace_of(tail: SgdTail, states: tuple) -> Any:
  return states[-1][0].trace if tail.momentum is not None else None


def _with_trace(tail: SgdTail, states: tuple, trace: Any) -> tuple:
  if tail.momentum is None:
    return states
  sgd_trace, scale = states[-1]
  return (*states[:-1], (sgd_trace._replace(trace=trace), scale))


class _Step(NamedTuple):
  """One update's elementwise maths, as the composed chain computes it.

  In three phases, so that on CPU each can write its output in place before
  the next reads it: the mean square, then the momentum (and the updates
  where they are an output), then the pull.
  """

  correct: Callable[..., Any]  # the backups transformation's
  count: Any  # the mean square's count, this update included
  counted: Any  # the DelayCompensationState with the counts updated
  stats: MeanSquareSpec
  tail: SgdTail
  scalars: _Scalars
  valid: Any  # the worker id is in range
  compensation: Any  # _cpu_kernel.Compensation, or None (no CPU kernel)

  @property
  def has_ms(self) -> bool:
    return self.stats.decay is not None

  @property
  def has_trace(self) -> bool:
    return self.tail.momentum is not None

  @property
  def fresh_updates(self) -> bool:
    """The update is an output of its own (else it is step_size * trace)."""
    return self.tail.momentum is None or self.tail.nesterov

  def scale(self, u: jax.Array) -> jax.Array:
    """``optax.scale`` / ``optax.scale_by_schedule`` applied to ``u``."""
    if self.scalars.scheduled:
      return jnp.array(self.scalars.step_size, dtype=u.dtype) * u
    return self.scalars.step_size * u

  def mean_square(self, ms, g):
    """The stored mean square (unchanged for an out-of-range worker)."""
    return jnp.where(self.valid, fold_square(ms, g, self.stats.decay), ms)

  def gradient(self, g, w, held, ms):
    """The corrected gradient plus weight decay (NaN if out of range).

    ``ms`` is the stored one: it differs from what the chain's correction
    sees only for an out-of-range worker, whose result is NaN either way.
    """
    u = self.correct(g, w, held, () if ms is None else ms, self.count,
                     self.counted)
    u = jnp.where(self.valid, u, jnp.asarray(np.nan, u.dtype))
    if self.scalars.weight_decay is not None:
      u = u + self.scalars.weight_decay * w
    return u

  def momentum(self, u, trace):
    """``optax.trace``'s new momentum."""
    return u + self.tail.momentum * trace

  def updates(self, u, new_trace):
    """The updates, from the gradient and the new momentum (if fresh)."""
    if self.has_trace:
      u = u + self.tail.momentum * new_trace  # Nesterov.
    return self.scale(u)

  def pull(self, w, new_trace, u):
    """What the worker pulls: ``params + updates`` (written only if valid)."""
    if not self.fresh_updates:
      u = self.scale(new_trace)
    return (w + u).astype(w.dtype)


class _Leaf(NamedTuple):
  """One parameter's arrays; None where the state keeps none."""

  g: jax.Array
  w: jax.Array
  backups: jax.Array  # (num_workers, *shape)
  ms: Any  # shape, or (num_workers, *shape) per worker
  trace: Any  # shape
  held: Any  # shape: the worker's row given by the caller (held_params), or
  # None: read it from ``backups``. Given, the update loops over that row
  # alone and writes it back to ``backups`` (which may be a stand-in).


def _map_leaves(step, row, updates, params, dc_state, trace, held=None):
  """Runs ``step`` over every parameter, in place (``held``: the worker's
  model given by the caller, in the backups' dtype, or None).

  Returns:
    The new ``(updates, backups, mean_square, trace)`` trees (``updates``
    None unless ``step.fresh_updates``).
  """
  g_leaves, g_def = jax.tree.flatten(updates)
  trees = (params, dc_state.backups, dc_state.mean_square, trace, held)
  flat = [jax.tree.flatten(t) for t in trees]
  outs = []
  for k, g in enumerate(g_leaves):
    leaf = _Leaf(
        g, flat[0][0][k], flat[1][0][k],
        flat[2][0][k] if step.has_ms else None,
        flat[3][0][k] if step.has_trace else None,
        flat[4][0][k] if held is not None else None,
    )
    outs.append(_leaf_update(step, leaf, row))
  columns = list(zip(*outs)) if outs else [()] * 4
  kept = (step.fresh_updates, True, step.has_ms, step.has_trace)
  defs = (g_def, flat[1][1], flat[2][1], flat[3][1])
  old = (None, dc_state.backups, dc_state.mean_square, trace)
  return tuple(
      d.unflatten(c) if k else o
      for d, c, k, o in zip(defs, columns, kept, old)
  )


def _leaf_update(step: _Step, leaf: _Leaf, row: jax.Array) -> tuple:
  """One parameter's ``(updates, backups, ms, trace)`` (None where not kept).

  On CPU, by the kernel where it applies, else block by block when the
  parameter is larger than two blocks (and not a narrow float: XLA:CPU
  converts those whole for any slice written).
  """
  size = int(np.prod(leaf.w.shape))
  whole = functools.partial(_whole, step)
  if _fused_kernel.applies(step, leaf, size):
    kernel = functools.partial(_fused_kernel.update, step)
    return lax.platform_dependent(leaf, row, cpu=kernel, default=whole)
  narrow = _rows.is_narrow(leaf.w.dtype) or _rows.is_narrow(leaf.g.dtype)
  if size < 2 * _fused_blocked.BLOCK_SIZE or narrow:
    return whole(leaf, row)
  blocked = functools.partial(_fused_blocked.update, step)
  return lax.platform_dependent(leaf, row, cpu=blocked, default=whole)


def _whole(step: _Step, leaf: _Leaf, row: jax.Array) -> tuple:
  """The phases on whole arrays (one fusion per output, XLA's choice)."""
  per_worker = step.stats.per_worker
  ms = leaf.ms
  if step.has_ms:
    seen = _rows.read_row(ms, row) if per_worker else ms
    new_ms = step.mean_square(seen, leaf.g)
    ms = _rows.write_row(ms, row, new_ms, step.valid) if per_worker else new_ms
  else:
    new_ms = None
  held = _rows.read_row(leaf.backups, row) if leaf.held is None else leaf.held
  u = step.gradient(leaf.g, leaf.w, held, new_ms)
  trace = step.momentum(u, leaf.trace) if step.has_trace else None
  u = step.updates(u, trace) if step.fresh_updates else None
  pulled = step.pull(leaf.w, trace, u)
  backups = _rows.write_row(leaf.backups, row, pulled, step.valid)
  return u, backups, ms, trace
