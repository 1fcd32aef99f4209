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
jaxlib, into a per-user cache (``$DCASGD_OPTAX_CACHE_DIR``, else
``~/.cache/dcasgd_optax``); the file name is a hash of the source, the
jaxlib version, the compiler, its flags and the CPU, so a cached build is
reused only where it was built for. If no compiler is found or the build
fails, ``dcasgd`` warns once and keeps XLA's blocked loop (same numbers,
slower); ``DCASGD_OPTAX_CPU_KERNEL=0`` selects that loop without building.
Measured costs: ``benchmarks/update_cost.md``.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from dcasgd_optax._src import _checks
from dcasgd_optax._src.delay_compensation import warm_up_ramp

# The XLA FFI target the kernel is registered as.
TARGET = "dcasgd_optax_sgd_update"

# Parameters with fewer elements keep XLA's path: below this a call costs
# more than the pass it saves (crossover in benchmarks/update_cost.md).
MIN_SIZE = 1 << 14

# "0" makes the fused update use XLA's blocked loop on CPU, without building.
SWITCH = "DCASGD_OPTAX_CPU_KERNEL"
CACHE_DIR = "DCASGD_OPTAX_CACHE_DIR"

SOURCE = pathlib.Path(__file__).with_name("cpu_kernel.cc")
_FLAGS = ("-O3", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")
_NATIVE = ("-march=native",)  # Dropped if the compiler refuses it.


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
  ramp = 1.0
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
  """Builds (or finds in the cache), loads and registers the kernel, once."""
  try:
    library = ctypes.CDLL(str(_build()))
  except (OSError, subprocess.SubprocessError, RuntimeError) as e:
    warnings.warn(
        f"dcasgd_optax: the CPU kernel of the fused update could not be "
        f"built ({e}); using XLA's slower blocked loop instead (same "
        f"numbers). Install a C++17 compiler (or point $CXX at one) to get "
        f"it; set {SWITCH}=0 to silence this.",
        RuntimeWarning, stacklevel=2,
    )
    return False
  jax.ffi.register_ffi_target(
      TARGET, jax.ffi.pycapsule(library.DcasgdSgdUpdate), platform="cpu"
  )
  return True


def _build() -> pathlib.Path:
  """The compiled kernel's path, compiling it into the cache if missing."""
  compiler = _compiler()
  source = SOURCE.read_bytes()
  key = hashlib.sha256(b"\0".join([
      source, jaxlib.__version__.encode(), compiler.encode(),
      " ".join(_FLAGS + _NATIVE).encode(), _cpu_id().encode(),
  ])).hexdigest()[:20]
  cache = pathlib.Path(
      os.environ.get(CACHE_DIR) or pathlib.Path.home() / ".cache"
      / "dcasgd_optax"
  )
  target = cache / f"cpu_kernel-{key}.so"
  if target.exists():
    return target
  cache.mkdir(parents=True, exist_ok=True)
  # Compile to a private name, then rename: concurrent builds (pytest-xdist)
  # each write their own file and the last rename wins, a complete file.
  fd, partial = tempfile.mkstemp(dir=cache, prefix=target.stem, suffix=".tmp")
  os.close(fd)
  try:
    _compile(compiler, partial)
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return target


def _compile(compiler: str, output: str) -> None:
  """Compiles SOURCE to ``output``, natively tuned if the compiler can."""
  include = ("-isystem", jax.ffi.include_dir())
  errors = ""
  for extra in (_NATIVE, ()):
    done = subprocess.run(
        [compiler, *_FLAGS, *extra, *include, str(SOURCE), "-o", output],
        capture_output=True, text=True, timeout=600, check=False,
    )
    if done.returncode == 0:
      return
    errors = done.stderr.strip().splitlines()[-1:] or [""]
  raise RuntimeError(f"{compiler} failed: {errors[0]}")


def _compiler() -> str:
  """``$CXX``, else the first C++ compiler on the PATH."""
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    found = name and shutil.which(name)
    if found:
      return found
  raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")


def _cpu_id() -> str:
  """The CPU's model and features, so a native build is not reused elsewhere."""
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    info = ""
  lines = [
      ln for ln in info.splitlines()
      if ln.startswith(("model name", "flags", "Features"))
  ]
  return "\n".join(sorted(set(lines))) or platform.processor() + platform.machine()
