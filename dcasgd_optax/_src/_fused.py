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
Measured costs: ``benchmarks/update_cost.md``.
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

from dcasgd_optax._src import _checks
from dcasgd_optax._src import _cpu_kernel
from dcasgd_optax._src import _rows
from dcasgd_optax._src.delay_compensation import MeanSquareSpec
from dcasgd_optax._src.delay_compensation import check_update
from dcasgd_optax._src.delay_compensation import fold_square
from dcasgd_optax._src.delay_compensation import next_mean_square
from dcasgd_optax._src.delay_compensation import worker_is_valid

# Elements per block on CPU: 8Ki float32 are 32 KiB per array, so an
# iteration's blocks stay in L2 even when other processes share the core.
# 4Ki to 16Ki measured alike, 32Ki and more slower (benchmarks/update_cost.md).
BLOCK_SIZE = 1 << 13


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
    composed: optax.GradientTransformationExtraArgs,
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

  def update_fn(updates, state, params=None, *, worker=None, **extra_args):
    del extra_args
    dc_state, tail_states = state[0], state[1:]
    check_update(updates, dc_state, params, worker, num_workers)
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
        step, row, updates, params, dc_state, trace
    )
    if not step.fresh_updates:  # Heavy-ball momentum: step_size * trace.
      new_updates = jax.tree.map(step.scale, trace)
    dc_state = counted._replace(backups=backups, mean_square=mean_square)
    return new_updates, (dc_state, *_with_trace(tail, tail_states, trace))

  return type(composed)(composed.init, update_fn)


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


def _map_leaves(step, row, updates, params, dc_state, trace):
  """Runs ``step`` over every parameter, in place.

  Returns:
    The new ``(updates, backups, mean_square, trace)`` trees (``updates``
    None unless ``step.fresh_updates``).
  """
  g_leaves, g_def = jax.tree.flatten(updates)
  trees = (params, dc_state.backups, dc_state.mean_square, trace)
  flat = [jax.tree.flatten(t) for t in trees]
  outs = []
  for k, g in enumerate(g_leaves):
    leaf = _Leaf(
        g, flat[0][0][k], flat[1][0][k],
        flat[2][0][k] if step.has_ms else None,
        flat[3][0][k] if step.has_trace else None,
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
  if _kernel_applies(step, leaf, size):
    kernel = functools.partial(_by_kernel, step)
    return lax.platform_dependent(leaf, row, cpu=kernel, default=whole)
  narrow = _rows.is_narrow(leaf.w.dtype) or _rows.is_narrow(leaf.g.dtype)
  if size < 2 * BLOCK_SIZE or narrow:
    return whole(leaf, row)
  blocked = functools.partial(_blocked, step)
  return lax.platform_dependent(leaf, row, cpu=blocked, default=whole)


def _kernel_applies(step: _Step, leaf: _Leaf, size: int) -> bool:
  """Whether the CPU kernel computes this parameter's update.

  DC-ASGD's correction (not a static zero lambda), float32 arrays but for
  float32 or bfloat16 backups, at least ``_cpu_kernel.MIN_SIZE`` elements,
  a CPU default backend, and the kernel built and switched on.
  """
  c = step.compensation
  if c is None or c.adaptive != step.has_ms:
    return False
  if _checks.is_static_zero(c.lambda_):  # The chain skips the correction.
    return False
  f32 = jnp.dtype(jnp.float32)
  wide = (leaf.g, leaf.w, leaf.ms, leaf.trace)
  if any(x is not None and x.dtype != f32 for x in wide):
    return False
  if leaf.backups.dtype not in (f32, jnp.dtype(jnp.bfloat16)):
    return False
  if size < _cpu_kernel.MIN_SIZE or jax.default_backend() != "cpu":
    return False
  return _cpu_kernel.enabled()


def _by_kernel(step: _Step, leaf: _Leaf, row: jax.Array) -> tuple:
  """The update by the CPU kernel, every state array aliased in place.

  Stand-in backups (:func:`_rows.stand_in_backups`) would be materialised
  if handed to the kernel whole: it gets the worker's row alone (of the
  backups and of a per-worker mean square, which must match them), written
  back after (unchanged for an invalid worker).
  """
  if not _rows.backups_are_stand_in():
    return _kernel_call(step, leaf, leaf.backups, leaf.ms, row)
  per_worker = step.stats.per_worker and leaf.ms is not None
  bits = lambda a: _rows.to_bits(a) if _rows.is_narrow(a.dtype) else a
  take = lambda a: _rows.from_bits(
      lax.dynamic_slice_in_dim(bits(a), row, 1), a.dtype)
  put = lambda a, value: _rows.from_bits(
      lax.dynamic_update_slice_in_dim(bits(a), bits(value), row, 0), a.dtype)
  u, backups, ms, trace = _kernel_call(
      step, leaf, take(leaf.backups),
      take(leaf.ms) if per_worker else leaf.ms, jnp.int32(0))
  return (u, put(leaf.backups, backups),
          put(leaf.ms, ms) if per_worker else ms, trace)


def _kernel_call(step: _Step, leaf: _Leaf, backups: jax.Array, ms: Any,
                 row: jax.Array) -> tuple:
  """:func:`_cpu_kernel.leaf_update` on ``backups`` and ``ms`` at ``row``."""
  u, backups, ms, trace = _cpu_kernel.leaf_update(
      leaf.g, leaf.w, backups, ms, leaf.trace, _kernel_scalars(step), row,
      _kernel_flags(step, leaf.backups.dtype),
  )
  if u is not None:
    u = u.astype(leaf.g.dtype)
  return u, backups, ms, trace


def _kernel_flags(step: _Step, backup_dtype: Any) -> _cpu_kernel.Flags:
  """Which parts of the update the kernel computes."""
  return _cpu_kernel.flags_for(
      step.compensation, per_worker_ms=step.stats.per_worker,
      weight_decay=step.scalars.weight_decay is not None,
      momentum=step.has_trace, nesterov=step.tail.nesterov,
      bf16_backups=backup_dtype == jnp.bfloat16,
  )


def _kernel_scalars(step: _Step) -> jax.Array:
  """This update's scalars for the kernel."""
  s = step.scalars
  return _cpu_kernel.scalars_for(
      step.compensation, valid=step.valid, decay=step.stats.decay,
      count=step.count, total_count=jnp.sum(step.counted.count),
      weight_decay=s.weight_decay, momentum=step.tail.momentum,
      step_size=s.step_size,
  )


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
  held = _rows.read_row(leaf.backups, row)
  u = step.gradient(leaf.g, leaf.w, held, new_ms)
  trace = step.momentum(u, leaf.trace) if step.has_trace else None
  u = step.updates(u, trace) if step.fresh_updates else None
  pulled = step.pull(leaf.w, trace, u)
  backups = _rows.write_row(leaf.backups, row, pulled, step.valid)
  return u, backups, ms, trace


def _blocked(step: _Step, leaf: _Leaf, row: jax.Array) -> tuple:
  """The phases block by block, each output written in place.

  Iteration ``i`` writes, for block ``i - 1``, the pull into the worker's
  backup row, then, for block ``i``, the mean square, the momentum (and the
  updates), each phase reading the arrays as the one before wrote them.
  Every value is written by one fusion that reads only that array's block
  being overwritten or arrays already written, so XLA updates all of them
  in place; computing several outputs from the same reads makes it copy
  whole arrays. The pull is one block late because it needs the new
  momentum while the momentum needs the old backup. Blocks are aligned to
  the end: the first starts at 0 and overlaps the second, writing back the
  elements it does not own as it read them, before the second is read.

  Narrow-float backups (bfloat16) are not sliced in the loop: XLA:CPU would
  convert all of them to float32 first. The worker's row is copied out as
  same-width integers, updated in the loop, and written back after it. So
  are stand-in backups (:func:`_rows.stand_in_backups`), which carried
  whole through the loop would be materialised.
  """
  shape, size = leaf.w.shape, int(np.prod(leaf.w.shape))
  num_blocks = -(-size // BLOCK_SIZE)
  per_worker = step.stats.per_worker
  narrow = _rows.is_narrow(leaf.backups.dtype)
  one_row = narrow or _rows.backups_are_stand_in()  # Loop over the row only.
  bits = lambda a: _rows.to_bits(a) if narrow else a
  flat = lambda a: None if a is None else a.reshape(-1)
  g, w, trace = flat(leaf.g), flat(leaf.w), flat(leaf.trace)
  ms = leaf.ms
  if ms is not None:
    ms = ms.reshape(-1, size) if per_worker else ms.reshape(-1)
  if one_row:
    held = _rows.read_row(bits(leaf.backups), row).reshape(-1)
  else:
    held = leaf.backups.reshape(-1, size)
  u = jnp.zeros((size,), leaf.g.dtype) if step.fresh_updates else None

  def span(k):
    """Block ``k``'s start and which of its elements it owns."""
    end = size - (num_blocks - 1 - k) * BLOCK_SIZE
    start = jnp.clip(end - BLOCK_SIZE, 0, size - BLOCK_SIZE)
    return start, start + jnp.arange(BLOCK_SIZE) < end

  def get(a, start, stacked=False):
    if stacked:
      return lax.dynamic_slice(a, (row, start), (1, BLOCK_SIZE))[0]
    return lax.dynamic_slice_in_dim(a, start, BLOCK_SIZE)

  def put(a, value, start, stacked=False):
    if stacked:
      return lax.dynamic_update_slice(a, value[None], (row, start))
    return lax.dynamic_update_slice_in_dim(a, value, start, 0)

  def get_held(held, start):
    block = get(held, start, stacked=not one_row)
    return _rows.from_bits(block, leaf.backups.dtype)

  def put_held(held, value, start):
    value = bits(value.astype(leaf.backups.dtype))
    return put(held, value, start, stacked=not one_row)

  def body(i, carry):
    held, ms, trace, u = carry
    start, owned = span(i - 1)  # The pull of the block before.
    pulled = step.pull(get(w, start),
                       None if trace is None else get(trace, start),
                       None if u is None else get(u, start))
    now = get_held(held, start)
    held = put_held(held, jnp.where(owned & step.valid, pulled, now), start)
    start, owned = span(i)
    owned &= i < num_blocks  # The extra last iteration only pulls.
    new_ms = None
    if ms is not None:
      now = get(ms, start, per_worker)
      ms = put(ms, jnp.where(owned, step.mean_square(now, get(g, start)), now),
               start, per_worker)
      new_ms = get(ms, start, per_worker)
    grad = step.gradient(get(g, start), get(w, start), get_held(held, start),
                         new_ms)
    new_trace = None
    if trace is not None:
      now = get(trace, start)
      trace = put(trace, jnp.where(owned, step.momentum(grad, now), now), start)
      new_trace = get(trace, start)
    if u is not None:
      now = get(u, start)
      u = put(u, jnp.where(owned, step.updates(grad, new_trace), now), start)
    return held, ms, trace, u

  held, ms, trace, u = lax.fori_loop(
      0, num_blocks + 1, body, (held, ms, trace, u)
  )
  if one_row:  # The loop kept the row as it was if not valid.
    backups = _rows.from_bits(lax.dynamic_update_index_in_dim(
        bits(leaf.backups), held.reshape(shape), row, 0
    ), leaf.backups.dtype)
  else:
    backups = held.reshape(leaf.backups.shape)
  return (
      None if u is None else u.reshape(shape),
      backups,
      None if ms is None else ms.reshape(leaf.ms.shape),
      None if trace is None else trace.reshape(shape),
  )
