"""Slot mapping: a function over a leading axis of slots, batched or
unrolled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh


def default_vmap_slots(mesh: Mesh, vmap_slots: int | None,
                       convolves: bool = True) -> int | None:
  """Slots vmapped together: ``vmap_slots``, else all of them, except 1 on
  CPU for a ``loss_fn`` that ``convolves``.

  XLA:CPU runs a vmapped convolution whose kernel differs per slot as a
  grouped convolution, much slower than one convolution per slot; matrix
  products at different models batch well (benchmarks/harness_throughput.md).
  """
  if vmap_slots is not None:
    return vmap_slots
  cpu = mesh.devices.flat[0].platform == "cpu"
  return 1 if cpu and convolves else None

def map_slots(
    fn: Callable, xs: tuple[Any, ...], vmap_slots: int | None, *,
    unroll: bool = False,
) -> Any:
  """``fn`` over the leading axis of ``xs``: vmapped ``vmap_slots`` at a time
  (all at once for ``None``), over the groups in a loop, or one after the
  other in the program if ``unroll`` (no loop: see
  :func:`_protocol.cpu_strategy`).
  """
  if vmap_slots is None:
    return jax.vmap(fn)(*xs)
  if not unroll:
    batch_size = vmap_slots if vmap_slots > 1 else None
    return jax.lax.map(lambda args: fn(*args), xs, batch_size=batch_size)
  outs = []
  for i in range(0, jax.tree.leaves(xs)[0].shape[0], vmap_slots):
    if vmap_slots == 1:  # unbatched, so a convolution stays a plain one
      out = fn(*jax.tree.map(lambda x, i=i: x[i], xs))
      outs.append(jax.tree.map(lambda y: y[None], out))
    else:
      outs.append(jax.vmap(fn)(*jax.tree.map(
          lambda x, i=i: x[i:i + vmap_slots], xs)))
  return jax.tree.map(lambda *ys: jnp.concatenate(ys), *outs)
