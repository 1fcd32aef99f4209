"""The constructor arguments both simulators share, and their defaults."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from jax.sharding import Mesh

from dcasgd_optax._src import _checks as core_checks
from dcasgd_optax.harness import _checks
from dcasgd_optax.harness import _devices
from dcasgd_optax.harness import _slots

# How a replay runs: one compiled program, or the host looping over chunks.
STRATEGIES = ("compiled", "host_chunks")

# Most gradient slots per device in one "host_chunks" call, by default: the
# program holds one unrolled copy of the gradient per slot, so its compile
# time grows with it.
HOST_SLOTS_PER_DEVICE = 8

def default_strategy(mesh: Mesh, strategy: str | None) -> str:
  """``strategy``, else ``"host_chunks"`` on CPU and ``"compiled"`` elsewhere.

  XLA:CPU compiles a convolution's kernel gradient inside a loop body
  (``while``, hence ``scan``) to a slow path, measured 9-24x slower than the
  same gradient outside any loop; ``"host_chunks"`` keeps gradients out of
  loops (benchmarks/harness_throughput.md).
  """
  if strategy is None:
    return "host_chunks" if mesh.devices.flat[0].platform == "cpu" else (
        "compiled")
  if strategy not in STRATEGIES:
    raise ValueError(
        f"`strategy` must be one of {STRATEGIES} or None, got {strategy!r}."
    )
  return strategy

class Setup(NamedTuple):
  """The constructor arguments both simulators share, validated."""

  num_workers: int
  loss3: Callable[..., Any]
  mesh: Any
  vmap_slots: int
  strategy: str

def setup(loss_fn, tx, num_workers, devices, has_model_state, vmap_slots,
          strategy) -> Setup:
  """Validates the shared constructor arguments and derives the defaults."""
  num_workers = core_checks.check_positive_int("num_workers", num_workers)
  if not hasattr(tx, "init") or not hasattr(tx, "update"):
    raise TypeError(f"`tx` must be an optax transformation, got {tx!r}.")
  if vmap_slots is not None:
    core_checks.check_positive_int("vmap_slots", vmap_slots)
  mesh = _devices.make_mesh(devices)
  return Setup(
      num_workers=num_workers,
      loss3=_checks.with_model_state(loss_fn, has_model_state),
      mesh=mesh,
      vmap_slots=_slots.default_vmap_slots(mesh, vmap_slots),
      strategy=default_strategy(mesh, strategy),
  )
