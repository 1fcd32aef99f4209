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
from scipy import stats as scipy_stats

from experiments import algorithms

CONFIDENCE = 0.95
"""The confidence of the paired differences' t-intervals."""


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


def paired_interval(differences: Sequence[float],
                    confidence: float = CONFIDENCE) -> dict | None:
  r"""The t-interval of the mean of paired differences (one per seed).

  .. math::
    \bar d \pm t_{(1 + c)/2,\, n - 1}\, s_d / \sqrt{n},

  with :math:`s_d` the sample standard deviation of the :math:`n`
  differences. The difference is *resolved* when the interval excludes 0.

  Returns:
    ``{"mean", "low", "high", "n", "resolved"}``, or ``None`` with fewer
    than two differences (or a NaN among them: a diverged run).
  """
  d = np.asarray(differences, np.float64)
  if d.size < 2 or np.isnan(d).any():
    return None
  half = (scipy_stats.t.ppf((1 + confidence) / 2, d.size - 1)
          * d.std(ddof=1) / np.sqrt(d.size))
  mean = float(d.mean())
  low, high = mean - float(half), mean + float(half)
  return dict(mean=mean, low=low, high=high, n=int(d.size),
              resolved=bool(low > 0 or high < 0))


def time_to_target(errors: Sequence[float], times: Sequence[float],
                   gradients: Sequence[int], target: float) -> dict:
  """When a run first reaches ``target``: the first evaluation (one per
  epoch) whose error is at most ``target``, its simulated time and the
  gradients applied by then. A NaN error (a diverged run) never reaches it.

  Returns:
    ``{"reached": bool, "time": float or None, "gradients": int or None}``
    (``None``: not reached within the run).
  """
  e = np.asarray(errors, np.float64)
  hits = np.flatnonzero(e <= target)  # NaN compares False
  if not hits.size:
    return dict(reached=False, time=None, gradients=None)
  i = int(hits[0])
  return dict(reached=True, time=float(times[i]), gradients=int(gradients[i]))


def _median_time(hits: Sequence[dict]) -> dict:
  """Seeds' :func:`time_to_target` results summarized: the median time and
  gradients (a seed that does not reach counts as infinitely late, so the
  median is "not reached", ``None``, when half or more do not), how many
  reach (``reached`` of ``runs``), and ``known``: False when the clock of a
  run that reached is unknown (NaN: a harness without the clock)."""
  times = np.array([h["time"] if h["reached"] else np.inf for h in hits])
  grads = np.array([h["gradients"] if h["reached"] else np.inf for h in hits])
  known = not np.isnan(times).any()
  t = float(np.median(times)) if hits and known else np.inf
  g = float(np.median(grads)) if hits else np.inf
  ok = bool(np.isfinite(t))
  return dict(reached=int(sum(h["reached"] for h in hits)), runs=len(hits),
              time=t if ok else None, gradients=g if ok else None,
              known=bool(known))


def _by_seed(rows, **where) -> dict[int, dict]:
  return {r["seed"]: r for r in rows
          if all(r[k] == v for k, v in where.items())}


def _paired(mine: dict[int, dict], reference: dict[int, dict]) -> dict | None:
  common = sorted(set(mine) & set(reference))
  return paired_interval([mine[s]["final_test_error"]
                          - reference[s]["final_test_error"] for s in common])


def cell_stats(rows: Sequence[dict[str, Any]], *, min_gap: float) -> list[dict]:
  """Per cell: mean and std of the final test error, and the gap closed.

  ``rows`` are the runs of :func:`experiments.methods.report` (keys
  ``optimizer``, ``schedule``, ``num_workers``, ``algorithm``,
  ``final_test_error``, and for the added keys ``seed`` and ``curve``).
  Sequential SGD and ASGD are the references of every cell with the same
  optimizer (and schedule and workers, for ASGD); SSGD (``ssgd``) of the
  same cell is the parallel reference.

  Each cell's dict has the keys ``optimizer``, ``schedule``,
  ``num_workers``, ``algorithm``, ``mean``, ``std``, ``seeds`` (how many),
  ``gap_closed`` (:func:`gap_closed` against sequential SGD), and these
  (``None`` where they do not apply or a reference is missing):

  * ``seed_errors``: ``{seed: final test error}``.
  * ``gap_closed_ssgd``: the share of ASGD's gap to SSGD closed,
    ``(ASGD - method) / (ASGD - SSGD)``, when SSGD is better than ASGD by
    ``min_gap`` or more.
  * ``vs_asgd`` / ``vs_ssgd``: the method's final error minus ASGD's / SSGD's
    on the same seeds, :func:`paired_interval` (mean, low, high, n,
    resolved).
  * ``time_to_sequential`` / ``time_to_ssgd``: the simulated time and
    gradients at which the run first reaches sequential SGD's / the cell's
    SSGD's mean final error, median over seeds (:func:`time_to_target`;
    ``reached``: how many of ``runs`` seeds do; ``time`` ``None``: not
    reached by half of them).
  * ``final_time``: the simulated time at the end of the run (median over
    seeds), ``None`` if the clock is unknown.
  * ``speedup``: sequential SGD's simulated time for its whole budget (it
    reaches its final error at its end) over ``time_to_sequential``'s time
    (ideal: M).
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
  sequential_time = {
      r["optimizer"]: float(np.median([
          x["curve"]["time"][-1] for x in rows
          if x["optimizer"] == r["optimizer"]
          and x["algorithm"] == r["algorithm"]
      ]))
      for r in rows
      if r["algorithm"] == algorithms.SEQUENTIAL.name and "curve" in r
  }
  for opt, schedule, m, name in keys:
    where = dict(optimizer=opt, schedule=schedule, num_workers=m)
    errs = _group(rows, algorithm=name, **where)
    asgd = _group(rows, algorithm=algorithms.ASGD.name, **where)
    ssgd = _group(rows, algorithm=SSGD, **where)
    share = share_ssgd = None
    if opt in sequential and asgd.size:
      share = gap_closed(sequential[opt], asgd.mean(), errs.mean(),
                         min_gap=min_gap)
    if ssgd.size and asgd.size:
      share_ssgd = gap_closed(ssgd.mean(), asgd.mean(), errs.mean(),
                              min_gap=min_gap)
    mine = _by_seed(rows, algorithm=name, **where)
    single = algorithms.get(name).single_worker
    stat = dict(optimizer=opt, schedule=schedule, num_workers=m,
                algorithm=name, mean=float(errs.mean()),
                std=std(errs), seeds=int(errs.size),
                gap_closed=share,
                seed_errors={s: r["final_test_error"]
                             for s, r in sorted(mine.items())},
                gap_closed_ssgd=None if single else share_ssgd,
                vs_asgd=None, vs_ssgd=None, time_to_sequential=None,
                time_to_ssgd=None, speedup=None, final_time=None)
    if not single:
      stat["vs_asgd"] = _paired(
          mine, _by_seed(rows, algorithm=algorithms.ASGD.name, **where))
      stat["vs_ssgd"] = _paired(mine, _by_seed(rows, algorithm=SSGD, **where))
    curves = [r for r in mine.values() if "curve" in r]
    if curves:
      final = float(np.median([r["curve"]["time"][-1] for r in curves]))
      stat["final_time"] = None if np.isnan(final) else final
    if curves and opt in sequential:
      stat["time_to_sequential"] = median_time_to_target(
          curves, sequential[opt])
      t = stat["time_to_sequential"]["time"]
      if t and opt in sequential_time and np.isfinite(sequential_time[opt]):
        stat["speedup"] = sequential_time[opt] / t
    if curves and ssgd.size:
      stat["time_to_ssgd"] = median_time_to_target(curves,
                                                   float(ssgd.mean()))
    stats.append(stat)
  return stats


def median_time_to_target(runs: Sequence[dict], target: float) -> dict:
  """When the seeds' runs first reach ``target``, summarized over seeds.

  Args:
    runs: one row per seed, each with a ``curve`` (per epoch
      ``test_error``, ``time`` and ``gradients``:
      :func:`experiments.methods.curve`).
    target: the test error to reach.

  Returns:
    ``{"reached", "runs", "time", "gradients", "known"}``: how many of the
    ``runs`` seeds reach ``target`` (:func:`time_to_target`), the median
    time and gradients (``None`` when half the seeds or more do not), and
    ``known`` (False when a run that reached has no clock).
  """
  return _median_time([
      time_to_target(r["curve"]["test_error"], r["curve"]["time"],
                     r["curve"]["gradients"], target) for r in runs])


SSGD = "ssgd"
"""The registry name of synchronous SGD, the parallel reference."""


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
