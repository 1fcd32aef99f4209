"""The fused update's path through the CPU kernel (:mod:`._cpu_kernel`).

Whether the kernel computes a parameter's update, and the call, every state
array aliased in place. ``step`` and ``leaf`` are :mod:`._fused`'s ``_Step``
(one update's maths) and ``_Leaf`` (one parameter's arrays).
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from dcasgd_optax._src import _checks
from dcasgd_optax._src import _cpu_kernel
from dcasgd_optax._src import _rows


def applies(step: Any, leaf: Any, size: int) -> bool:
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


def update(step: Any, leaf: Any, row: jax.Array) -> tuple:
  """The update by the CPU kernel, every state array aliased in place.

  With the worker's row given (``leaf.held``) the backups may be a stand-in,
  which handed to the kernel whole would be materialised: the kernel gets
  that row alone (and the worker's row of a per-worker mean square), written
  back after (unchanged for an invalid worker).
  """
  if leaf.held is None:
    return _kernel_call(step, leaf, leaf.backups, leaf.ms, row)
  per_worker = step.stats.per_worker and leaf.ms is not None
  bits = lambda a: _rows.to_bits(a) if _rows.is_narrow(a.dtype) else a
  take = lambda a: _rows.from_bits(
      lax.dynamic_slice_in_dim(bits(a), row, 1), a.dtype)
  put = lambda a, value: _rows.from_bits(
      lax.dynamic_update_slice_in_dim(bits(a), bits(value), row, 0), a.dtype)
  u, backups, ms, trace = _kernel_call(
      step, leaf, leaf.held[None],
      take(leaf.ms) if per_worker else leaf.ms, jnp.int32(0))
  return (u, put(leaf.backups, backups),
          put(leaf.ms, ms) if per_worker else ms, trace)


def _kernel_call(step: Any, leaf: Any, backups: jax.Array, ms: Any,
                 row: jax.Array) -> tuple:
  """:func:`_cpu_kernel.leaf_update` on ``backups`` and ``ms`` at ``row``."""
  u, backups, ms, trace = _cpu_kernel.leaf_update(
      leaf.g, leaf.w, backups, ms, leaf.trace, _kernel_scalars(step), row,
      _kernel_flags(step, leaf.backups.dtype),
  )
  if u is not None:
    u = u.astype(leaf.g.dtype)
  return u, backups, ms, trace


def _kernel_flags(step: Any, backup_dtype: Any) -> _cpu_kernel.Flags:
  """Which parts of the update the kernel computes."""
  return _cpu_kernel.flags_for(
      step.compensation, per_worker_ms=step.stats.per_worker,
      weight_decay=step.scalars.weight_decay is not None,
      momentum=step.has_trace, nesterov=step.tail.nesterov,
      bf16_backups=backup_dtype == jnp.bfloat16,
  )


def _kernel_scalars(step: Any) -> jax.Array:
  """This update's scalars for the kernel."""
  s = step.scalars
  return _cpu_kernel.scalars_for(
      step.compensation, valid=step.valid, decay=step.stats.decay,
      count=step.count, total_count=jnp.sum(step.counted.count),
      weight_decay=s.weight_decay, momentum=step.tail.momentum,
      step_size=s.step_size,
  )
