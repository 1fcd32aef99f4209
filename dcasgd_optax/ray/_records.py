"""What happened at each update: one 1-D array per field, as in the harness.

The server shards each keep their own trace of the gradients they processed
(:func:`shard_trace`); the driver merges them into the run's records
(:func:`merge`), ordered by the first shard's step, which :func:`train`
returns in a :class:`TrainResult`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

# The fields every shard records, with their dtypes.
SHARD_FIELDS = {
    "worker": np.int64,
    "seq": np.int64,
    "step": np.int64,
    "staleness": np.int64,
    "time": np.float64,
    "server_time": np.float64,
    "skipped": np.bool_,
    "shared": np.bool_,
}
# The fields only the first shard records (the worker sends them with its
# push there).
LEAD_FIELDS = {"loss": np.float32, "compute_time": np.float64}


class UpdateRecords(dict):
  """One entry per update of a run, in the server's order.

  A ``dict`` from field name to a 1-D NumPy array (the shape of the
  harness's ``metrics``); fields also read as attributes:
  ``records.staleness`` is ``records["staleness"]``.

  Fields:
    step: int64, the server step after the update (1, 2, ...; a resumed run
      starts after its checkpoint's step). With several shards, the first
      shard's step.
    worker: int64, whose gradient it was.
    seq: int64, that worker's gradient number (0, 1, ...).
    staleness: int64, updates applied between the worker's pull of the
      params its gradient was computed at and this update (0 for a fresh
      gradient). With several shards, as seen by the first shard.
    loss: float32, the worker's minibatch loss at the params it pulled.
    time: float64, seconds from the start of the run to the update (the
      first shard's clock against the driver's).
    compute_time: float64, seconds the worker spent loading the batch and
      computing the gradient.
    server_time: float64, seconds the busiest shard spent on the update
      (apply, pull and host copies).
    skipped: bool, the gradient was not finite and was not applied (the
      step still counts it; see docs/ray.md).
  """

  def __getattr__(self, name: str) -> np.ndarray:
    try:
      return self[name]
    except KeyError:
      raise AttributeError(
          f"UpdateRecords has no field {name!r}; fields: {sorted(self)}."
      ) from None


class TrainResult(NamedTuple):
  """What :func:`train` returns.

  Attributes:
    params: the final params, a NumPy pytree.
    opt_state: the final optax state, a NumPy pytree (with several shards,
      reassembled from theirs).
    step: the server's step, always the ``num_updates`` asked for.
    records: an :class:`UpdateRecords` trace of the updates of this run (a
      resumed run records only those after the checkpoint).
    wall_time: seconds from the start of the workers to the last update.
    server_time: seconds the busiest shard spent on updates and pulls.
    worker_failures: int64 ``[num_workers]``, per worker, how many times it
      died (or became unreachable) and was restarted.
    shard_records: each shard's own trace (fields ``worker``, ``seq``,
      ``step``, ``staleness``, ``time``, ``server_time``, ``skipped``, as in
      ``records``, and ``shared``: the gradient came through the worker's
      shared-memory channel, not in the call), in the order that shard
      processed the gradients.
    shard_times: float64 ``[num_shards]``, seconds each shard was busy.
  """

  params: Any
  opt_state: Any
  step: int
  records: UpdateRecords
  wall_time: float
  server_time: float
  worker_failures: np.ndarray
  shard_records: tuple[dict[str, np.ndarray], ...]
  shard_times: np.ndarray

  @property
  def server_share(self) -> float:
    """The fraction of the wall time the busiest shard was busy."""
    return self.server_time / max(self.wall_time, 1e-12)


def shard_trace(rows: Sequence[tuple], lead: bool) -> dict[str, np.ndarray]:
  """A shard's rows (one tuple per gradient, fields in order) as arrays."""
  fields = {**SHARD_FIELDS, **(LEAD_FIELDS if lead else {})}
  columns = list(zip(*rows)) if rows else [()] * len(fields)
  return {name: np.asarray(col, dtype)
          for (name, dtype), col in zip(fields.items(), columns)}


def merge(traces: Sequence[dict[str, np.ndarray]], start_time: float
          ) -> UpdateRecords:
  """The run's records from every shard's trace (``traces[0]`` the first's).

  Rows are matched by ``(worker, seq)``; ``server_time`` is the largest
  over the shards, ``skipped`` true if any shard skipped the gradient.
  """
  lead = traces[0]
  keys = list(zip(lead["worker"].tolist(), lead["seq"].tolist()))
  server_time = lead["server_time"].copy()
  skipped = lead["skipped"].copy()
  for trace in traces[1:]:
    row = {k: i for i, k in enumerate(
        zip(trace["worker"].tolist(), trace["seq"].tolist()))}
    idx = np.array([row.get(k, -1) for k in keys], np.int64)
    found = idx >= 0
    server_time[found] = np.maximum(server_time[found],
                                    trace["server_time"][idx[found]])
    skipped[found] |= trace["skipped"][idx[found]]
  return UpdateRecords(
      step=lead["step"], worker=lead["worker"], seq=lead["seq"],
      staleness=lead["staleness"], loss=lead["loss"],
      time=lead["time"] - start_time, compute_time=lead["compute_time"],
      server_time=server_time, skipped=skipped,
  )

