"""The fused update on CPU without the kernel: XLA's loop over blocks.

Each iteration reads one cache-sized block of every input and writes every
output for it (see :func:`update`). ``step`` and ``leaf`` are
:mod:`._fused`'s ``_Step`` (one update's maths) and ``_Leaf`` (one
parameter's arrays).
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from dcasgd_optax._src import _rows

# Elements per block on CPU: 8Ki float32 are 32 KiB per array, so an
# iteration's blocks stay in L2 even when other processes share the core.
# 4Ki to 16Ki measured alike, 32Ki and more slower (benchmarks/update_cost.md).
BLOCK_SIZE = 1 << 13


def update(step: Any, leaf: Any, row: jax.Array) -> tuple:
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
  is a row the caller gives (``leaf.held``): the backups may then be a
  stand-in, which carried whole through the loop would be materialised.
  """
  shape, size = leaf.w.shape, int(np.prod(leaf.w.shape))
  num_blocks = -(-size // BLOCK_SIZE)
  per_worker = step.stats.per_worker
  narrow = _rows.is_narrow(leaf.backups.dtype)
  one_row = narrow or leaf.held is not None  # Loop over the row only.
  bits = lambda a: _rows.to_bits(a) if narrow else a
  flat = lambda a: None if a is None else a.reshape(-1)
  g, w, trace = flat(leaf.g), flat(leaf.w), flat(leaf.trace)
  ms = leaf.ms
  if ms is not None:
    ms = ms.reshape(-1, size) if per_worker else ms.reshape(-1)
  if leaf.held is not None:
    held = bits(leaf.held).reshape(-1)
  elif one_row:
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
    # Rounded to the backups' dtype first: the same numbers (the choice is
    # elementwise), with no implicit promotion.
    pulled = pulled.astype(now.dtype)
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
