"""The fused update of one parameter as a hand-written CPU kernel (XLA FFI).

XLA:CPU compiles the fused update (``_fused.py``) either to one loop fusion
per output (several passes over memory) or, block by block, to a while loop
it runs on one core. ``cpu_kernel.cc`` does a parameter's whole update
(mean square, compensation, weight decay, momentum, updates and the pull
into the worker's backup row) in one pass, its elements shared out over
XLA's intra-op thread pool, every state array updated in place (the call
aliases its outputs to its inputs). The maths, its order of operations and
the aliasing contract are in the C++ file's header.

The kernel is compiled on first use, with the system C++ compiler (``$CXX``,
else ``c++``, ``g++`` or ``clang++``) and the XLA FFI headers shipped with
jaxlib, into a private per-user cache (``$DCASGD_OPTAX_CACHE_DIR``, else
``~/.cache/dcasgd_optax``), and loaded only from there once checked: how,
and what makes a cache private, is in :mod:`._kernel_build`. If no compiler
is found, or the build, the load or the kernel's symbol fails, ``dcasgd``
warns once and keeps XLA's blocked loop for the rest of the process (same
numbers, slower); ``DCASGD_OPTAX_CPU_KERNEL=0`` selects that loop without
building.
Measured costs: ``benchmarks/update_cost.md``.
"""

from __future__ import annotations

import enum
import functools
import os
from typing import Any, NamedTuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from dcasgd_optax._src import _checks
from dcasgd_optax._src import _kernel_build
from dcasgd_optax._src.delay_compensation import warm_up_ramp

# The XLA FFI target the kernel is registered as.
TARGET = "dcasgd_optax_sgd_update"

# Parameters with fewer elements keep XLA's path: below this a call costs
# more than the pass it saves (crossover in benchmarks/update_cost.md).
MIN_SIZE = 1 << 14

# "0" makes the fused update use XLA's blocked loop on CPU, without building.
SWITCH = "DCASGD_OPTAX_CPU_KERNEL"

class Flags(enum.IntFlag):
  """The kernel's ``flags`` attribute (``enum Flag`` in cpu_kernel.cc)."""

  ADAPTIVE = 1
  PER_WORKER_MS = 2
  BIAS_CORRECTION = 4
  CLIP = 8
  WEIGHT_DECAY = 16
  MOMENTUM = 32
  NESTEROV = 64
  BF16_BACKUPS = 128


class Scalars(NamedTuple):
  """The kernel's per-update scalars, in the order of ``enum Scalar``."""

  valid: Any  # 1.0 if the worker id is in range, else 0.0
  decay: Any  # the mean square's decay
  one_minus_decay: Any
  lambda_: Any
  eps: Any
  bias_denominator: Any  # 1 - decay ** count (with bias correction)
  ramp: Any  # lambda's warm-up factor (1 without warm-up)
  clip: Any  # the correction clip (with kClip)
  weight_decay: Any
  momentum: Any
  step_size: Any  # -learning_rate

  def stack(self) -> jax.Array:
    return jnp.stack([jnp.asarray(x, jnp.float32) for x in self])


class Compensation(NamedTuple):
  """What the kernel needs of :func:`compensation_correction`'s arguments.

  ``dcasgd`` passes it to the fused update; transformations without it
  (Gap-Aware) keep XLA's path.
  """

  lambda_: Any
  adaptive: bool
  eps: Any
  bias_correction: bool
  lambda_warmup: Any
  correction_clip: Any


def enabled() -> bool:
  """Whether the kernel may be used: not switched off, and it is loaded.

  Builds and registers it the first time (see the module docstring); on
  failure warns once and returns False from then on.
  """
  return os.environ.get(SWITCH, "1") != "0" and _loaded()


def leaf_update(
    g: jax.Array, w: jax.Array, backups: jax.Array, ms: Any, trace: Any,
    scalars: jax.Array, row: jax.Array, flags: Flags,
) -> tuple[Any, jax.Array, Any, Any]:
  """One parameter's ``(updates, backups, ms, trace)``, by the kernel.

  Args:
    g, w: float32 gradient and params.
    backups: float32 or bfloat16, ``(rows, *w.shape)``; row ``row`` is read,
      then written with the pull if the worker is valid.
    ms: float32, ``w.shape`` or ``(rows, *w.shape)``, or None.
    trace: float32 momentum, ``w.shape``, or None.
    scalars: ``Scalars(...).stack()``.
    row: int32 scalar in ``[0, rows)``.
    flags: which parts of the update apply.

  Returns:
    The updates (None for heavy-ball momentum, where they are
    ``step_size * trace``) and the new ``backups``, ``ms``, ``trace`` (None
    where not given).
  """
  none = jnp.zeros((0,), jnp.float32)
  fresh = not flags & Flags.MOMENTUM or flags & Flags.NESTEROV
  operands = (g, w, backups, none if ms is None else ms,
              none if trace is None else trace)
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in operands[2:]]
  shapes.append(jax.ShapeDtypeStruct(w.shape if fresh else (0,), w.dtype))
  call = jax.ffi.ffi_call(
      TARGET, shapes, input_output_aliases={2: 0, 3: 1, 4: 2},
      vmap_method="broadcast_all",  # The kernel loops over the batch.
  )
  backups, new_ms, new_trace, updates = call(
      *operands, scalars, row, flags=np.int64(flags)
  )
  return (updates if fresh else None, backups,
          None if ms is None else new_ms, None if trace is None else new_trace)


def flags_for(
    compensation: Compensation, *, per_worker_ms: bool, weight_decay: bool,
    momentum: bool, nesterov: bool, bf16_backups: bool,
) -> Flags:
  """The ``flags`` of a call (the mean square is kept iff adaptive)."""
  c, on = compensation, Flags(0)
  parts = {
      Flags.ADAPTIVE: c.adaptive,
      Flags.PER_WORKER_MS: c.adaptive and per_worker_ms,
      Flags.BIAS_CORRECTION: c.adaptive and c.bias_correction,
      Flags.CLIP: c.correction_clip is not None,
      Flags.WEIGHT_DECAY: weight_decay,
      Flags.MOMENTUM: momentum,
      Flags.NESTEROV: momentum and nesterov,
      Flags.BF16_BACKUPS: bf16_backups,
  }
  for flag, wanted in parts.items():
    if wanted:
      on |= flag
  return on


def scalars_for(
    compensation: Compensation, *, valid: Any, decay: Any, count: Any,
    total_count: Any, weight_decay: Any, momentum: Any, step_size: Any,
) -> jax.Array:
  """The kernel's scalars, each computed as the composed chain computes it.

  Args:
    compensation: the correction's arguments.
    valid: whether the worker id is in range (a traced bool).
    decay: the mean square's decay (None unless adaptive).
    count: the mean square's count, this update included (bias correction).
    total_count: the sum of the counts, this update included (warm-up).
    weight_decay, momentum, step_size: this update's (None where absent).

  Returns:
    ``Scalars(...).stack()``, float32.
  """
  c = compensation
  ramp: Any = 1.0
  if (c.lambda_warmup is not None
      and not _checks.is_static_zero(c.lambda_warmup)):
    ramp = warm_up_ramp(total_count, c.lambda_warmup)
  bias = c.adaptive and c.bias_correction
  zero = lambda x: 0.0 if x is None else x
  return Scalars(
      valid=valid, decay=zero(decay),
      one_minus_decay=0.0 if decay is None else 1 - decay,
      lambda_=c.lambda_, eps=c.eps,
      bias_denominator=1 - decay**count if bias else 1.0,
      ramp=ramp, clip=zero(c.correction_clip), weight_decay=zero(weight_decay),
      momentum=zero(momentum), step_size=step_size,
  ).stack()


@functools.cache
def _loaded() -> bool:
  """Loads (building it if needed) and registers the kernel, once.

  Any failure warns and returns False, for the rest of the process: a later
  trace takes XLA's loop and never raises.
  """
  try:
    library = _kernel_build.load()
    jax.ffi.register_ffi_target(
        TARGET, jax.ffi.pycapsule(library.DcasgdSgdUpdate), platform="cpu"
    )
  except Exception as e:  # pylint: disable=broad-exception-caught
    warnings.warn(
        f"dcasgd_optax: the CPU kernel of the fused update could not be "
        f"built or loaded ({type(e).__name__}: {e}); using XLA's slower "
        f"blocked loop instead (same numbers). Install a C++17 compiler (or "
        f"point $CXX at one) to get it; set {SWITCH}=0 to silence this.",
        RuntimeWarning, stacklevel=2,
    )
    return False
  return True
