"""The device mesh: one axis over which per-worker computations are spread."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from dcasgd_optax.harness import _multihost

AXIS = "workers"

def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple

def make_mesh(devices: Sequence[Any] | None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: ``jax.devices()``, every device
  of every process: in one process, its own)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("`devices` is empty: pass at least one device.")
  mesh = Mesh(np.array(devices), (AXIS,))
  _multihost.check_mesh(mesh)
  return mesh

def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())

def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every leaf on every device of ``mesh`` (no copy if it is already)."""
  return jax.device_put(tree, replicated(mesh))

def sharded(mesh: Mesh, leading: int = 0) -> NamedSharding:
  """The axis after ``leading`` ones split over the mesh's devices, in
  contiguous blocks."""
  return NamedSharding(mesh, P(*[None] * leading, AXIS))


def device_ids(mesh: Mesh) -> jax.Array:
  """``[0, 1, ..., D-1]``, one per device: inside :func:`spread` each device
  sees its own index as a length-1 array."""
  return jnp.arange(mesh.size, dtype=jnp.int32)


def spread(
    fn: Callable, mesh: Mesh, replicated: tuple[Any, ...],
    split: tuple[Any, ...],
) -> Any:
  """``fn(*replicated, *split)``, ``split``'s leading axes spread over ``mesh``.

  ``replicated`` arguments are whole on every device; every leaf of
  ``split`` and of the output has a leading axis whose length is a multiple
  of the mesh size, so each device computes on its own contiguous block.
  """
  if mesh.size == 1:
    return fn(*replicated, *split)
  specs = (P(),) * len(replicated) + (P(AXIS),) * len(split)
  # check_vma=False keeps ``fn`` purely local: with it on, a gradient taken
  # inside ``fn`` with respect to a replicated input is summed over devices.
  mapped = jax.shard_map(
      fn, mesh=mesh, in_specs=specs, out_specs=P(AXIS), check_vma=False
  )
  return mapped(*replicated, *split)


def take(mesh: Mesh, tree_S: Any, index: jax.Array) -> Any:
  """Entry ``index`` of ``tree_S``'s leading axis (split over ``mesh``), on
  every device.

  The device holding the entry contributes it and the others zeros to one
  sum over the mesh (exact: the other terms are zeros), so only that entry
  travels, never the whole axis.
  """
  if mesh.size == 1 or not jax.tree.leaves(tree_S):
    return jax.tree.map(lambda x: x[index], tree_S)

  def local(index, tree_L):
    size = jax.tree.leaves(tree_L)[0].shape[0]
    i = index - jax.lax.axis_index(AXIS) * size
    held = jnp.logical_and(i >= 0, i < size)
    i = jnp.clip(i, 0, size - 1)
    return jax.tree.map(
        lambda x: jax.lax.psum(jnp.where(held, x[i], jnp.zeros_like(x[i])),
                               AXIS),
        tree_L,
    )

  mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS)),
                         out_specs=P(), check_vma=False)
  return mapped(index, tree_S)
