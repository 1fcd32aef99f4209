"""Planning a replay: cutting a concrete arrival order into chunks (host side).

Greedy maximal runs with no repeated worker are exactly the sets of arrivals
whose gradients can be computed together; each run is cut into chunks of one
fixed length (a multiple of the device count), chosen per replay.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dcasgd_optax.harness import _devices

# Fixed cost of one chunk (gather, loop step, launch), in units of one
# gradient; used only to pick the chunk length.
_CHUNK_OVERHEAD = 1.0
# On CPU a chunk's gradients are kept within this many bytes per device by
# default, so they stay in cache: bigger chunks are slower per gradient
# (benchmarks/harness_throughput.md).
_CPU_CHUNK_BYTES = 16 * 2**20


class Plan(NamedTuple):
  """How a concrete arrival order is cut into chunks (NumPy, host side)."""

  chunk: int  # slots per chunk, a multiple of the device count
  starts: np.ndarray  # int32 [A]: first arrival of chunk c (padded with 0)
  lengths: np.ndarray  # int32 [A]: arrivals in chunk c (padded with 0)
  num_chunks: int
  num_runs: int


def _run_lengths(arrivals: np.ndarray) -> list[int]:
  """Lengths of the greedy maximal runs in which no worker repeats."""
  last_seen: dict[int, int] = {}
  starts = [0]
  for k, m in enumerate(arrivals.tolist()):
    if last_seen.get(m, -1) >= starts[-1]:
      starts.append(k)
    last_seen[m] = k
  return np.diff(starts + [len(arrivals)]).tolist()


def _choose_chunk(runs: np.ndarray, limit: int, num_devices: int) -> int:
  """The chunk length minimising padded slots plus per-chunk overhead."""
  candidates = {limit}
  size = num_devices
  while size < limit:
    candidates.add(size)
    size *= 2

  def cost(chunk):
    return np.sum(-(-runs // chunk)) * (chunk + _CHUNK_OVERHEAD)

  return min(sorted(candidates), key=cost)


def slot_limit(
    num_workers: int, max_parallel: int | None, mesh: Any, params: Any,
    per_device_cap: int | None = None,
) -> int:
  """Most slots per chunk: a multiple of the device count, >= 1 per device.

  ``per_device_cap`` bounds the default (not an explicit ``max_parallel``).
  """
  size = mesh.size
  limit = num_workers if max_parallel is None else max_parallel
  if max_parallel is None and mesh.devices.flat[0].platform == "cpu":
    leaves = jax.tree.leaves(params)
    nbytes = sum(np.size(x) * jnp.dtype(x.dtype).itemsize for x in leaves)
    limit = min(limit, max(1, _CPU_CHUNK_BYTES // max(nbytes, 1)) * size)
  if max_parallel is None and per_device_cap is not None:
    limit = min(limit, per_device_cap * size)
  limit = min(limit, _devices.round_up(num_workers, size))
  return max(size, limit // size * size)


def make_plan(arrivals: np.ndarray, limit: int, num_devices: int) -> Plan:
  """Cuts ``arrivals`` into runs with no repeated worker, then into chunks."""
  runs = np.array(_run_lengths(arrivals))
  chunk = _choose_chunk(runs, limit, num_devices)
  starts, lengths, at = [], [], 0
  for run in runs.tolist():
    for offset in range(0, run, chunk):
      starts.append(at + offset)
      lengths.append(min(chunk, run - offset))
    at += run
  pad = len(arrivals) - len(starts)
  return Plan(
      chunk=chunk,
      starts=np.array(starts + [0] * pad, np.int32),
      lengths=np.array(lengths + [0] * pad, np.int32),
      num_chunks=len(starts),
      num_runs=len(runs),
  )
