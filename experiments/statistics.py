"""Statistics over runs: per-seed errors, their mean and spread, the gap closed.

Pure functions of the rows that :func:`experiments.train.train_and_evaluate`
returns (one per run) and of the per-epoch records it writes; the tables
(:mod:`experiments.tables`) and plots (:mod:`experiments.plots`) format
what these compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments import algorithms


def errors(rows: Sequence[dict], algorithm: algorithms.Algorithm,
           workers: int, key: str) -> np.ndarray:
  """``key`` of every run (seed) of ``algorithm`` with ``workers`` workers."""
  workers = algorithm.effective_workers(workers)
  return np.array([
      r[key] for r in rows
      if r["algorithm"] == algorithm.name and r["workers"] == workers
  ])


def parallel_workers(rows: Sequence[dict]) -> list[int]:
  """The worker counts of the runs with several workers ([1] if none)."""
  return sorted({
      r["workers"] for r in rows
      if not algorithms.get(r["algorithm"]).single_worker
  }) or [1]


def std(values: np.ndarray) -> float:
  """Sample standard deviation over seeds (0 for a single seed)."""
  return float(values.std(ddof=1)) if values.size > 1 else 0.0


def mean_curve(
    histories: Sequence[list[dict]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Epochs ``1..n``, and the mean and std over seeds of the test error,
  ``n`` the shortest history's length."""
  n = min(len(h) for h in histories)
  errs = np.array([[e["test_error"] for e in h[:n]] for h in histories])
  return np.arange(1, n + 1), errs.mean(0), errs.std(0)


def gap_closed(
    sequential: float, asgd: float, method: float, *, min_gap: float
) -> float | None:
  """The share of ASGD's gap to sequential SGD that a method closes.

  ``(asgd - method) / (asgd - sequential)`` for mean errors: 1 when the
  method matches sequential SGD, 0 when it matches ASGD, above 1 when it
  beats sequential SGD, below 0 when it is worse than ASGD.

  Returns:
    The share, or ``None`` when ASGD is within ``min_gap`` of sequential
    SGD (no gap worth closing).
  """
  gap = asgd - sequential
  if gap < min_gap:
    return None
  return (asgd - method) / gap


def _group(rows, **where) -> np.ndarray:
  return np.array([
      r["final_test_error"] for r in rows
      if all(r[k] == v for k, v in where.items())
  ])


def cell_stats(rows: Sequence[dict[str, Any]], *, min_gap: float) -> list[dict]:
  """Per cell: mean and std of the final test error, and the gap closed.

  ``rows`` are the runs of :func:`experiments.methods.report` (keys
  ``optimizer``, ``schedule``, ``num_workers``, ``algorithm``,
  ``final_test_error``). Sequential SGD and ASGD are the references of
  every cell with the same optimizer (and schedule and workers, for ASGD).
  """
  stats = []
  keys = sorted(
      {
          (r["optimizer"], r["schedule"], r["num_workers"], r["algorithm"])
          for r in rows
      }
  )
  sequential = {
      r["optimizer"]: _group(rows, optimizer=r["optimizer"],
                             algorithm=r["algorithm"]).mean()
      for r in rows if r["algorithm"] == algorithms.SEQUENTIAL.name
  }
  for opt, schedule, m, name in keys:
    errs = _group(rows, optimizer=opt, schedule=schedule, num_workers=m,
                  algorithm=name)
    asgd = _group(rows, optimizer=opt, schedule=schedule, num_workers=m,
                  algorithm=algorithms.ASGD.name)
    share = None
    if opt in sequential and asgd.size:
      share = gap_closed(sequential[opt], asgd.mean(), errs.mean(),
                         min_gap=min_gap)
    stats.append(dict(optimizer=opt, schedule=schedule, num_workers=m,
                      algorithm=name, mean=float(errs.mean()),
                      std=std(errs), seeds=int(errs.size),
                      gap_closed=share))
  return stats


def paired_differences(stats: Sequence[dict], baseline: str,
                       variant: str) -> list[tuple[dict, dict]]:
  """``(baseline's stat, variant's stat)`` of every cell they share, in
  ``stats``' order."""
  by_cell = {
      (s["optimizer"], s["schedule"], s["num_workers"], s["algorithm"]): s
      for s in stats}
  pairs = []
  for (opt, schedule, m, name), b in by_cell.items():
    v = by_cell.get((opt, schedule, m, variant))
    if name == baseline and v is not None:
      pairs.append((b, v))
  return pairs


def samples_mean(samples: dict[str, np.ndarray]) -> float:
  """The common mean of staleness samples (with every worker busy it is
  about M - 1 anyway)."""
  return float(np.mean([v.mean() for v in samples.values()]))
