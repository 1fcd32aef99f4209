"""The device mesh: one axis over which per-worker computations are spread."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "workers"

def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple

def make_mesh(devices: Sequence[Any] | None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all local devices)."""
  devices = list(jax.local_devices() if devices is None else devices)
  if not devices:
    raise ValueError("`devices` is empty: pass at least one device.")
  return Mesh(np.array(devices), (AXIS,))

def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())

def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every leaf on every device of ``mesh`` (no copy if it is already)."""
  return jax.device_put(tree, replicated(mesh))

def per_worker(
    fn: Callable, mesh: Mesh, shared: tuple[Any, ...], split: tuple[Any, ...]
) -> Any:
  """``fn(*shared, *split)`` with ``split``'s leading axis spread over ``mesh``.

  ``shared`` arguments are replicated; every leaf of ``split`` and of the
  output has a leading slot axis whose length is a multiple of the mesh size,
  so each device computes its own contiguous block of slots.
  """
  if mesh.size == 1:
    return fn(*shared, *split)
  specs = (P(),) * len(shared) + (P(AXIS),) * len(split)
  # check_vma=False keeps ``fn`` purely local: with it on, a gradient taken
  # inside ``fn`` with respect to a replicated input is summed over devices.
  mapped = jax.shard_map(
      fn, mesh=mesh, in_specs=specs, out_specs=P(AXIS), check_vma=False
  )
  return mapped(*shared, *split)
