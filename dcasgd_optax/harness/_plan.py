"""Planning a replay (host side): chunks of arrivals, and SSGD's rounds.

Greedy maximal runs with no repeated worker are exactly the sets of arrivals
whose gradients can be computed together. Each device holds the backups of a
contiguous block of workers (``rows_per_device`` of them) and computes the
gradients of those workers only, so a run is cut into chunks in which no
device has more than ``slots_per_device`` arrivals; a chunk's slots are laid
out device-major (slot ``d * slots_per_device + j`` is device ``d``'s
``j``-th). Where a chunk has as many slots per device as each device holds
workers (``by_row``), slot ``j`` is always the worker of row ``j`` (a
padding slot where that worker does not arrive): the gradients are then taken
at the backups as they lie, with no gather of the workers' rows. ``N``
simulations replayed together (``replay_many``) share the cuts: a run ends
where any of them repeats a worker.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dcasgd_optax.harness import _checks
from dcasgd_optax.harness import _devices

# Fixed cost of one chunk (gather, loop step, launch), in units of one
# gradient; used only to pick the chunk length.
_CHUNK_OVERHEAD = 1.0
# On CPU a chunk's gradients are kept within this many bytes per device by
# default, so they stay in cache: bigger chunks are slower per gradient
# (benchmarks/harness_throughput.md).
_CPU_CHUNK_BYTES = 16 * 2**20


class Plan(NamedTuple):
  """How concrete arrival orders are cut into chunks (NumPy, host side).

  ``C`` chunks of ``S = num_devices * slots_per_device`` slots; the arrays
  are padded to ``A`` chunks (one per arrival at most), so a compiled replay
  is keyed on ``A`` alone. ``N`` is the number of simulations.
  """

  slots_per_device: int
  num_chunks: int  # C
  num_runs: int
  starts: np.ndarray  # int32 [A]: first arrival of chunk c (0 past C)
  lengths: np.ndarray  # int32 [A]: arrivals in chunk c (0 past C)
  slot_rows: np.ndarray  # int32 [N, A, S]: arrival each slot computes
  slot_workers: np.ndarray  # int32 [N, A, S]: worker each slot computes for
  arrival_slots: np.ndarray  # int32 [N, A, S]: slot of chunk c's k-th arrival
  by_row: bool  # slot j computes for the worker of row j, in every chunk

  @property
  def chunk(self) -> int:
    return self.slot_rows.shape[-1]


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
    nbytes = sum(math.prod(np.shape(x)) * jnp.dtype(x.dtype).itemsize
                 for x in leaves)
    limit = min(limit, max(1, _CPU_CHUNK_BYTES // max(nbytes, 1)) * size)
  if max_parallel is None and per_device_cap is not None:
    limit = min(limit, per_device_cap * size)
  limit = min(limit, _devices.round_up(num_workers, size))
  return max(size, limit // size * size)


def _run_starts(arrivals_NxA: np.ndarray) -> list[int]:
  """Where the greedy maximal runs begin (no simulation repeats a worker)."""
  num_sims, num_arrivals = arrivals_NxA.shape
  starts = [0]
  last_seen: list[dict[int, int]] = [{} for _ in range(num_sims)]
  columns = arrivals_NxA.T.tolist()
  for k, workers in enumerate(columns):
    if any(seen.get(m, -1) >= starts[-1]
           for seen, m in zip(last_seen, workers)):
      starts.append(k)
    for seen, m in zip(last_seen, workers):
      seen[m] = k
  return starts


def _cut(owners_NxA: np.ndarray, run_starts: list[int],
         slots_per_device: int, num_devices: int) -> list[tuple[int, int]]:
  """Chunks ``(start, length)``: each run cut greedily so that no device
  computes more than ``slots_per_device`` of a chunk's arrivals."""
  num_arrivals = owners_NxA.shape[1]
  bounds = run_starts + [num_arrivals]
  if num_devices == 1:  # one device owns every worker: equal pieces
    return [(k, min(slots_per_device, b - k))
            for a, b in zip(bounds[:-1], bounds[1:])
            for k in range(a, b, slots_per_device)]
  columns = owners_NxA.T.tolist()
  chunks = []
  for a, b in zip(bounds[:-1], bounds[1:]):
    k = a
    while k < b:
      start, counts = k, [[0] * num_devices for _ in columns[0]]
      while k < b and all(c[d] < slots_per_device
                          for c, d in zip(counts, columns[k])):
        for c, d in zip(counts, columns[k]):
          c[d] += 1
        k += 1
      chunks.append((start, k - start))
  return chunks


def _layout(arrivals_A, owners_A, chunks, slots_per_device, num_devices,
            rows_per_device, num_arrivals):
  """One simulation's slot arrays ``[A, S]`` for ``chunks``."""
  num_slots = slots_per_device * num_devices
  by_row = slots_per_device == rows_per_device
  rows = np.zeros((num_arrivals, num_slots), np.int32)
  workers = np.zeros((num_arrivals, num_slots), np.int32)
  slot_of = np.zeros((num_arrivals, num_slots), np.int32)
  for c, (start, length) in enumerate(chunks):
    # Padding: device d's slots compute its first worker (by_row: the
    # slot's own) on the chunk's first batch; their results are never used.
    rows[c] = start
    workers[c] = np.arange(num_slots) if by_row else (
        np.arange(num_slots) // slots_per_device * rows_per_device)
    used = [0] * num_devices
    for k in range(length):
      d = owners_A[start + k]
      slot = arrivals_A[start + k] if by_row else d * slots_per_device + used[d]
      used[d] += 1
      rows[c, slot], workers[c, slot] = start + k, arrivals_A[start + k]
      slot_of[c, k] = slot
  return rows, workers, slot_of


def make_plan(arrivals_NxA: np.ndarray, limit: int, num_devices: int,
              rows_per_device: int) -> Plan:
  """Cuts ``arrivals_NxA`` (N simulations' orders) into runs, then chunks.

  The number of slots per device is chosen among powers of two up to
  ``limit / num_devices`` to minimise padded slots plus per-chunk overhead.
  """
  num_sims, num_arrivals = arrivals_NxA.shape
  owners = arrivals_NxA // rows_per_device
  run_starts = _run_starts(arrivals_NxA)
  candidates, size = {limit // num_devices}, 1
  while size < limit // num_devices:
    candidates.add(size)
    size *= 2

  def cost(per_device):
    chunks = _cut(owners, run_starts, per_device, num_devices)
    return len(chunks) * (per_device * num_devices + _CHUNK_OVERHEAD), chunks

  per_device = min(sorted(candidates), key=lambda p: cost(p)[0])
  chunks = cost(per_device)[1]
  layouts = [
      _layout(arrivals_NxA[n], owners[n], chunks, per_device, num_devices,
              rows_per_device, num_arrivals)
      for n in range(num_sims)
  ]
  pad = num_arrivals - len(chunks)
  starts, lengths = (list(x) for x in zip(*chunks))
  return Plan(
      slots_per_device=per_device,
      num_chunks=len(chunks),
      num_runs=len(run_starts),
      starts=np.array(starts + [0] * pad, np.int32),
      lengths=np.array(lengths + [0] * pad, np.int32),
      slot_rows=np.stack([x[0] for x in layouts]),
      slot_workers=np.stack([x[1] for x in layouts]),
      arrival_slots=np.stack([x[2] for x in layouts]),
      by_row=per_device == rows_per_device,
  )


# --- SSGD: rounds in which every worker computes once ---------------------


class Rounds(NamedTuple):
  """Which batch each gradient slot of each round computes (host side)."""

  rows_RxNxG: np.ndarray  # int32: batch row of group n's slot g in round r
  weights_NxG: np.ndarray  # float32: 1/M for a worker's slot, 0 for padding
  loss_at: np.ndarray  # int32 [R*M]: arrival k's loss in the flat R*N*G slots


def plan_rounds(arrivals: np.ndarray, num_workers: int, limit: int,
                num_devices: int) -> Rounds:
  """Slot ``j < M`` of a round is worker ``j``; rounds cut into equal groups.

  A round's ``round_up(M, D)`` slots are split into ``N`` groups of ``G``
  slots (``G`` a multiple of the device count, at most ``limit``, padded as
  little as possible); padding slots repeat worker ``M - 1``'s batch with
  weight 0.
  """
  m = num_workers
  slots = _devices.round_up(m, num_devices)
  num_groups = -(-slots // limit)
  group = _devices.round_up(-(-slots // num_groups), num_devices)
  arrivals_RxM = arrivals.reshape(-1, m)
  num_rounds = arrivals_RxM.shape[0]
  # Worker w's batch in round r: the position of w among the round's arrivals.
  rows_RxM = (
      np.argsort(arrivals_RxM, axis=1) + m * np.arange(num_rounds)[:, None]
  )
  pad = np.minimum(np.arange(num_groups * group), m - 1)
  rows = rows_RxM[:, pad].reshape(num_rounds, num_groups, group)
  weights = np.where(np.arange(num_groups * group) < m, 1.0 / m, 0.0)
  flat = num_groups * group * np.arange(num_rounds)[:, None] + arrivals_RxM
  return Rounds(
      rows.astype(np.int32),
      weights.reshape(num_groups, group).astype(np.float32),
      flat.reshape(-1).astype(np.int32),
  )


def check_rounds(arrivals: Any, num_workers: int, num: int) -> np.ndarray:
  """``arrivals`` (default: worker ``j`` computes batch ``r*M + j``) as
  rounds in which every worker arrives once."""
  if arrivals is None:
    if num == 0 or num % num_workers:
      raise ValueError(
          "`batches` leaves need a leading axis of R * num_workers "
          f"(num_workers={num_workers}, R >= 1), got {num}."
      )
    return np.tile(np.arange(num_workers, dtype=np.int32), num // num_workers)
  arrivals = _checks.check_arrivals(arrivals, num_workers)[0]
  if len(arrivals) % num_workers:
    raise ValueError(
        f"`arrivals` must be whole rounds of num_workers={num_workers} "
        f"arrivals (SSGD), got {len(arrivals)}."
    )
  rounds = np.sort(arrivals.reshape(-1, num_workers), axis=1)
  bad = np.flatnonzero(np.any(rounds != np.arange(num_workers), axis=1))
  if bad.size:
    r = int(bad[0])
    raise ValueError(
        f"`arrivals` must hold every worker once per round of "
        f"num_workers={num_workers} (SSGD); round {r} is "
        f"{arrivals[r * num_workers:(r + 1) * num_workers].tolist()}."
    )
  return arrivals
