"""Argument validation shared by the public factories.

Static arguments are validated when a transformation is built, so a bad value
fails loudly before any optimizer state exists. Numeric hyperparameters may
arrive as arrays (``optax.inject_hyperparams`` turns them into arrays, and
traces them inside ``update``); those are checked whenever their value is
concrete and left alone when traced.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np


def concrete_value(x: Any) -> Any | None:
  """Returns ``x`` as a NumPy value if it is known now, else ``None``."""
  try:
    return np.asarray(x)
  except (
      jax.errors.ConcretizationTypeError,
      jax.errors.TracerArrayConversionError,
  ):
    return None


def is_static_zero(x: Any) -> bool:
  """Whether ``x`` is known at trace time to be the scalar 0."""
  v = concrete_value(x)
  return v is not None and v.shape == () and float(v) == 0.0


def check_positive_int(name: str, value: Any) -> int:
  """Returns ``value`` as an int, or raises if it is not an int >= 1."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    hint = ""
    if hasattr(value, "shape"):
      hint = (
          " Under optax.inject_hyperparams, pass it in `static_args` so it "
          "stays a Python int."
      )
    raise TypeError(
        f"`{name}` must be a positive Python int, got {value!r} of type "
        f"{type(value).__name__}.{hint}"
    )
  if value < 1:
    raise ValueError(f"`{name}` must be a positive int (>= 1), got {value}.")
  return int(value)


def check_scalar_range(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = float("inf"),
    low_inclusive: bool = True,
    high_inclusive: bool = False,
    allow_schedule: bool = False,
) -> None:
  """Raises if a concrete scalar ``value`` lies outside the given interval.

  A callable (an optax schedule) passes only with ``allow_schedule``.
  """
  if callable(value):
    if allow_schedule:
      return
    raise TypeError(
        f"`{name}` must be a number, not a schedule (got {value!r})."
    )
  v = concrete_value(value)
  if v is None:
    return
  if v.shape != ():
    raise ValueError(f"`{name}` must be a scalar, got shape {v.shape}.")
  if not np.issubdtype(v.dtype, np.number) or np.issubdtype(
      v.dtype, np.complexfloating
  ):
    raise TypeError(f"`{name}` must be a real number, got {value!r}.")
  v = float(v)
  low_ok = v >= low if low_inclusive else v > low
  high_ok = v <= high if high_inclusive else v < high
  if not (low_ok and high_ok) or np.isnan(v):
    lo = "[" if low_inclusive else "("
    hi = "]" if high_inclusive else ")"
    raise ValueError(
        f"`{name}` must lie in {lo}{low:g}, {high:g}{hi}, got {v:g}."
    )


def check_seed(seed: Any) -> int:
  """Returns ``seed`` if a non-negative int (``None`` is not deterministic)."""
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
    raise TypeError(
        f"`seed` must be a non-negative int (for a reproducible order), got "
        f"{seed!r}."
    )
  if seed < 0:
    raise ValueError(f"`seed` must be >= 0, got {seed}.")
  return int(seed)


def check_worker(worker: Any, num_workers: int) -> None:
  """Validates a worker id: an integer scalar, in range when concrete."""
  if worker is None:
    raise TypeError(
        "Missing keyword argument `worker`: the id (int in [0, num_workers)) "
        "of the worker whose gradient or pull this is. Call "
        "`tx.update(grads, state, params, worker=m)`."
    )
  if isinstance(worker, bool):
    raise TypeError(f"`worker` must be an integer scalar, got {worker!r}.")
  dtype = getattr(worker, "dtype", None)
  shape = getattr(worker, "shape", ())
  if dtype is not None and not np.issubdtype(dtype, np.integer):
    raise TypeError(f"`worker` must be an integer scalar, got dtype {dtype}.")
  if dtype is None and not isinstance(worker, numbers.Integral):
    raise TypeError(
        f"`worker` must be an integer scalar, got {type(worker).__name__}."
    )
  if tuple(shape) != ():
    raise ValueError(f"`worker` must be a scalar, got shape {tuple(shape)}.")
  v = concrete_value(worker)
  if v is not None and not 0 <= int(v) < num_workers:
    raise ValueError(
        f"`worker` must be in [0, {num_workers}) (num_workers={num_workers}), "
        f"got {int(v)}."
    )
