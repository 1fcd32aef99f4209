"""One worker's row of a per-worker array: read it, write it in place.

XLA:CPU has no bfloat16 or float16 dynamic-update-slice or scatter: it
converts the whole operand to float32 and back, so writing one worker's row
of bfloat16 backups costs a pass over (and a second copy of) every worker's
backup. Seen as the unsigned integers of the same width the write is in
place and touches one row. Measured on XLA:CPU (JAX 0.10): the write must
not be fused with a read of the same array and its value must reach it in a
wide dtype, or XLA copies the whole array again; a conditional on the
validity, with the cast inside, does both.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

_UINT = {1: jnp.uint8, 2: jnp.uint16}


def is_narrow(dtype: Any) -> bool:
  """Whether ``dtype`` is a float narrower than 32 bits (bfloat16, float16)."""
  dtype = jnp.dtype(dtype)
  return bool(jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4)


def to_bits(a: jax.Array) -> jax.Array:
  """A narrow float array seen as same-width unsigned integers."""
  return lax.bitcast_convert_type(a, _UINT[a.dtype.itemsize])


def from_bits(a: jax.Array, dtype: Any) -> jax.Array:
  """Undoes :func:`to_bits` (``a`` unchanged if it has ``dtype`` already)."""
  return a if a.dtype == dtype else lax.bitcast_convert_type(a, dtype)


def read_row(a: jax.Array, row: jax.Array) -> jax.Array:
  """``a[row]`` for an in-range traced ``row``."""
  return lax.dynamic_index_in_dim(a, row, 0, keepdims=False)


def write_row(
    a: jax.Array, row: jax.Array, value: jax.Array, valid: jax.Array
) -> jax.Array:
  """``a`` with ``a[row] = value`` if ``valid``, else ``a``, in place.

  Args:
    a: an array with a leading axis of rows.
    row: the row, an int32 scalar in range (clamp it first).
    value: the new row (cast to ``a.dtype``).
    valid: a bool scalar; ``False`` leaves ``a`` as it was.

  Returns:
    The updated array (under ``jit`` with ``a`` donated, only that row is
    written). Under ``vmap`` with a batched ``valid``, narrow-float arrays
    are copied whole (the conditional becomes a select).
  """
  if not is_narrow(a.dtype):
    value = jnp.where(valid, value.astype(a.dtype), read_row(a, row))
    return lax.dynamic_update_index_in_dim(a, value, row, 0)

  def put(a, value):  # Cast inside: a narrow operand makes XLA copy ``a``.
    value = to_bits(value.astype(a.dtype))
    return from_bits(
        lax.dynamic_update_index_in_dim(to_bits(a), value, row, 0), a.dtype
    )

  return lax.cond(valid, put, lambda a, value: a, a, value)
