"""The full SGD-family optimizers' update in one pass over memory.

Composed, :func:`dcasgd` is a chain (delay compensation, weight decay, SGD,
then the pull) and XLA:CPU compiles every member to its own loop fusion: four
or five full passes over model-sized arrays per parameter, where one pass
that reads each input once and writes each output once would do (XLA:CPU
does not fuse sibling loops with several outputs). The fused update computes
the same numbers, parameter by parameter, with every output written in place:

* on CPU, a parameter larger than two blocks is processed by a loop over
  cache-sized blocks; each iteration reads one block of every input (the
  gradient, the params, the worker's backup row, the mean square, the
  momentum) and writes every output for it, so the passes of the chain's
  members run on data already in cache;
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

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from dcasgd_optax._src import _rows
from dcasgd_optax._src.delay_compensation import MeanSquareSpec
from dcasgd_optax._src.delay_compensation import check_update
from dcasgd_optax._src.delay_compensation import fold_square
from dcasgd_optax._src.delay_compensation import next_mean_square
from dcasgd_optax._src.delay_compensation import worker_is_valid

# Elements per block on CPU: 64Ki float32 are 256 KiB per array, so the ~9
# block-sized arrays of one iteration fit the cores' L2 caches.
BLOCK_SIZE = 1 << 16


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
    step = _Step(correct, count, counted, stats, tail, scalars, valid)
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


def _tail_scalars(tail: SgdTail, states: tuple) -> tuple[_Scalars, tuple]:
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
  """One update's elementwise maths, as the composed chain computes it."""

  correct: Callable[..., Any]  # the backups transformation's
  count: Any  # the mean square's count, this update included
  counted: Any  # the DelayCompensationState with the counts updated
  stats: MeanSquareSpec
  tail: SgdTail
  scalars: _Scalars
  valid: Any  # the worker id is in range

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

  def __call__(self, g, w, held, ms, trace):
    """Returns ``(ms, trace, updates)``, None where not kept or not fresh."""
    if self.stats.decay is not None:
      new_ms = fold_square(ms, g, self.stats.decay)
      stored_ms = jnp.where(self.valid, new_ms, ms)
    else:
      new_ms = stored_ms = None
    ms_seen = () if new_ms is None else new_ms
    u = self.correct(g, w, held, ms_seen, self.count, self.counted)
    u = jnp.where(self.valid, u, jnp.asarray(np.nan, u.dtype))
    if self.scalars.weight_decay is not None:
      u = u + self.scalars.weight_decay * w
    new_trace = None
    if self.has_trace:
      new_trace = u + self.tail.momentum * trace
      u = u + self.tail.momentum * new_trace if self.tail.nesterov else new_trace
    return stored_ms, new_trace, self.scale(u) if self.fresh_updates else None

  def pull(self, w, trace, u):
    """What the worker pulls: ``params + updates`` (written only if valid)."""
    if not self.fresh_updates:
      u = self.scale(trace)
    return (w + u).astype(w.dtype)


def _map_leaves(step, row, updates, params, dc_state, trace):
  """Runs ``step`` over every parameter, in place.

  Returns:
    The new ``(updates, backups, mean_square, trace)`` trees (``updates``
    None unless ``step.fresh_updates``).
  """
  g_leaves, g_def = jax.tree.flatten(updates)
  trees = (params, dc_state.backups, dc_state.mean_square, trace)
  flat = [jax.tree.flatten(t) for t in trees]
  has_ms = step.stats.decay is not None
  outs = []
  for k, g in enumerate(g_leaves):
    arrays, stacked = [g], [False]
    for (leaves, _), s, kept in zip(
        flat,
        (False, True, step.stats.per_worker, False),
        (True, True, has_ms, step.has_trace),
    ):
      if kept:
        arrays.append(leaves[k])
        stacked.append(s)
    outs.append(_leaf_update(step, arrays, stacked, row))
  columns = list(zip(*outs)) if outs else [()] * 4
  kept = (step.fresh_updates, True, has_ms, step.has_trace)
  defs = (g_def, flat[1][1], flat[2][1], flat[3][1])
  old = (None, dc_state.backups, dc_state.mean_square, trace)
  return tuple(
      d.unflatten(c) if k else o
      for d, c, k, o in zip(defs, columns, kept, old)
  )


def _leaf_update(step, arrays, stacked, row):
  """``step`` over one parameter: its ``(updates, backup, ms, trace)``.

  ``arrays`` are the gradient, the param, the backups, then the mean square
  and the momentum where kept.
  """
  at = {"ms": 3} if step.stats.decay is not None else {}
  if step.has_trace:
    at["trace"] = len(arrays) - 1

  def fn(*blocks):
    get = lambda name: blocks[at[name]] if name in at else None
    ms, trace, u = step(*blocks[:3], get("ms"), get("trace"))
    written = [blocks[2]] + [v for v in (ms, trace) if v is not None]
    return written, [] if u is None else [u]

  def pulled(w, results):  # results: ms, trace (where kept), then updates.
    trace = results[len(at) - 1] if step.has_trace else None
    u = results[-1] if step.fresh_updates else None
    return step.pull(w, trace, u)

  fresh = [arrays[0].dtype] if step.fresh_updates else []
  written = [2, *at.values()]
  new, fresh_out = map_in_place(
      fn, arrays, stacked, row, step.valid, written, fresh,
      late=(2, 1, pulled),
  )
  pick = lambda name: new[at[name]] if name in at else None
  u = fresh_out[0] if fresh_out else None
  return u, new[2], pick("ms"), pick("trace")


def map_in_place(
    fn: Callable[..., tuple[list, list]],
    arrays: Sequence[jax.Array],
    stacked: Sequence[bool],
    row: jax.Array,
    valid: jax.Array,
    written: Sequence[int],
    fresh: Sequence[Any],
    late: Any = None,
) -> tuple[list[jax.Array], list[jax.Array]]:
  """An elementwise ``fn`` over one parameter's arrays, written in place.

  Args:
    fn: ``fn(*blocks) -> (written_blocks, fresh_blocks)``, elementwise: the
      blocks are same-shaped pieces of ``arrays`` (of row ``row`` where
      stacked); ``written_blocks[j]`` replaces ``arrays[written[j]]`` there,
      ``fresh_blocks[j]`` is a piece of a new array of dtype ``fresh[j]``.
    arrays: arrays shaped like the parameter, or with a leading axis of
      workers where ``stacked``.
    stacked: which arrays have the leading workers axis.
    row: the worker whose rows are read and written (in range).
    valid: whether the stacked arrays' rows are written at all.
    written: indices of the arrays ``fn`` overwrites.
    fresh: dtypes of the new arrays ``fn`` returns.
    late: optional ``(j, k, h)``: the value written into ``arrays[j]`` (one
      of ``written``; ``fn`` returns a placeholder for it) is
      ``h(block of arrays[k], results)``, ``results`` being ``fn``'s other
      written and fresh blocks in order. On CPU it is computed when the block
      is written, from results already computed, so no fusion recomputes
      them (XLA:CPU fuses a cheap producer into each of its consumers).

  Returns:
    ``arrays`` with the written ones replaced, and the fresh arrays.
  """
  size = int(np.prod(arrays[0].shape))
  args = (list(arrays), row, valid)
  whole = functools.partial(_whole, fn, stacked, written, late)
  narrow = any(_rows.is_narrow(a.dtype) for a, s in zip(arrays, stacked)
               if not s)
  if size < 2 * BLOCK_SIZE or narrow:
    return whole(*args)
  blocked = functools.partial(_blocked, fn, stacked, written, fresh, late)
  return lax.platform_dependent(*args, cpu=blocked, default=whole)


def _whole(fn, stacked, written, late, arrays, row, valid):
  """``fn`` on whole arrays (one fusion per output, XLA's own choice)."""
  blocks = [_rows.read_row(a, row) if s else a for a, s in zip(arrays, stacked)]
  outs, fresh = fn(*blocks)
  if late is not None:
    j, k, h = late
    others = [o for i, o in zip(written, outs) if i != j] + list(fresh)
    outs = [h(blocks[k], others) if i == j else o for i, o in zip(written, outs)]
  arrays = list(arrays)
  for j, out in zip(written, outs):
    a = arrays[j]
    if stacked[j]:
      arrays[j] = _rows.write_row(a, row, out, valid)
    else:
      arrays[j] = out.astype(a.dtype)
  return arrays, list(fresh)


def _blocked(fn, stacked, written, fresh, late, arrays, row, valid):
  """``fn`` block by block, software-pipelined so every write is in place.

  Iteration ``i`` writes block ``i - 1``'s results (carried from the
  iteration before), then reads block ``i`` from the arrays as just written
  and computes its results. Every read of an array follows its write, so
  XLA updates all of them in place; writing a block from values read in the
  same iteration makes it copy whole arrays (each output's fusion reads
  arrays that sibling outputs overwrite). Blocks are aligned to the end: the
  first one starts at 0 and overlaps the second, whose elements it writes
  back as it read them, before the second block is written.

  A stacked narrow-float array (bfloat16 backups) is neither read nor
  written in the loop: XLA:CPU would convert all of it to float32 there.
  Its row is copied out as same-width integers first, updated in the loop,
  and written back after it (:func:`_rows.write_row`).
  """
  shape = arrays[0].shape
  size = int(np.prod(shape))
  narrow = [s and _rows.is_narrow(a.dtype) for a, s in zip(arrays, stacked)]
  in_loop_stacked = [s and not n for s, n in zip(stacked, narrow)]
  flat = []
  for a, s, n in zip(arrays, stacked, narrow):
    if n:
      a = _rows.read_row(_rows.to_bits(a), row)
    flat.append(a.reshape(a.shape[0], size) if s and not n else a.reshape(size))
  buffers = [jnp.zeros((size,), d) for d in fresh]
  num_blocks = -(-size // BLOCK_SIZE)

  def read(j, a, start):
    if in_loop_stacked[j]:
      return lax.dynamic_slice(a, (row, start), (1, BLOCK_SIZE))[0]
    block = lax.dynamic_slice_in_dim(a, start, BLOCK_SIZE)
    return _rows.from_bits(block, arrays[j].dtype)

  def compute(i, flat, buffers):
    end = size - (num_blocks - 1 - i) * BLOCK_SIZE
    start = jnp.maximum(end - BLOCK_SIZE, 0)
    blocks = [read(j, a, start) for j, a in enumerate(flat)]
    outs, new = fn(*blocks)
    current = [blocks[j] for j in written]
    current += [lax.dynamic_slice_in_dim(b, start, BLOCK_SIZE) for b in buffers]
    todo = start + jnp.arange(BLOCK_SIZE) < end
    masks = [todo & valid if stacked[j] else todo for j in written]
    masks += [todo] * len(buffers)
    results = [
        cur if late is not None and j == late[0] else
        jnp.where(mask, out.astype(cur.dtype), cur)
        for j, mask, out, cur in zip(
            [*written, *[None] * len(new)], masks, [*outs, *new], current
        )
    ]
    if late is not None:  # Its mask, for the write.
      results.append(masks[written.index(late[0])])
    return start, results

  def write(start, results, flat, buffers):
    flat = list(flat)
    if late is not None:
      j, k, h = late
      mask, results = results[-1], list(results[:-1])
      at = written.index(j)
      others = results[:at] + results[at + 1:]
      value = h(read(k, flat[k], start), others)
      results[at] = jnp.where(mask, value.astype(results[at].dtype),
                              results[at])
    for j, value in zip(written, results):
      if in_loop_stacked[j]:
        flat[j] = lax.dynamic_update_slice(flat[j], value[None], (row, start))
      else:
        value = _rows.to_bits(value) if narrow[j] else value
        flat[j] = lax.dynamic_update_slice_in_dim(flat[j], value, start, 0)
    buffers = [
        lax.dynamic_update_slice_in_dim(b, v, start, 0)
        for b, v in zip(buffers, results[len(written):])
    ]
    return flat, buffers

  def body(i, carry):
    start, results, flat, buffers = carry
    flat, buffers = write(start, results, flat, buffers)
    start, results = compute(i, flat, buffers)
    return start, results, flat, buffers

  # One iteration more than blocks: the last one writes the last block (what
  # it computes is discarded). Writing after the loop instead makes XLA copy
  # the arrays it writes into.
  start, results = compute(0, flat, buffers)
  carry = (start, results, flat, buffers)
  _, _, flat, buffers = lax.fori_loop(1, num_blocks + 1, body, carry)
  out = list(arrays)
  for j in written:
    if narrow[j]:  # The loop kept the row as it was if not valid.
      value = flat[j].reshape((1, *shape))
      bits = lax.dynamic_update_index_in_dim(
          _rows.to_bits(arrays[j]), value[0], row, 0
      )
      out[j] = _rows.from_bits(bits, arrays[j].dtype)
    else:
      out[j] = flat[j].reshape(arrays[j].shape)
  return out, [b.reshape(shape) for b in buffers]
