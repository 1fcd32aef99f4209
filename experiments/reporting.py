"""Tables and plots of a comparison: results.csv, table.md and PNG figures.

Everything here reads the per-run summaries and per-epoch metrics that
:func:`experiments.train.train_and_evaluate` wrote, so a report can be
redrawn without training.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Files only; no display needed.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from experiments import algorithms

COLUMNS = (
    "algorithm", "workers", "schedule", "seed", "final_test_error",
    "best_test_error", "wall_time", "mean_staleness", "epochs",
)


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
  """One row per run, in :data:`COLUMNS` order."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def _errors(rows, algorithm: algorithms.Algorithm, workers: int, key: str) -> np.ndarray:
  """``key`` of every run (seed) of ``algorithm`` with ``workers`` workers."""
  workers = algorithm.effective_workers(workers)
  return np.array([
      r[key] for r in rows
      if r["algorithm"] == algorithm.name and r["workers"] == workers
  ])


def _parallel_workers(rows) -> list[int]:
  """The worker counts of the runs with several workers ([1] if none)."""
  return sorted({
      r["workers"] for r in rows
      if not algorithms.get(r["algorithm"]).single_worker
  }) or [1]


def _std(errors: np.ndarray) -> float:
  """Sample standard deviation over seeds (0 for a single seed)."""
  return float(errors.std(ddof=1)) if errors.size > 1 else 0.0


def _cell(errors: np.ndarray) -> str:
  if errors.size == 0:
    return "-"
  if errors.size == 1:
    return f"{100 * errors[0]:.2f}"
  return f"{100 * errors.mean():.2f} ± {100 * _std(errors):.2f}"


def markdown_table(rows: Sequence[dict[str, Any]], *, key: str = "final_test_error") -> str:
  """The paper's table: test error (%) per worker count (rows) and algorithm.

  Cells are the mean ± sample standard deviation over seeds. Sequential SGD
  has one worker; its value is repeated in every row, as in the paper.
  """
  algs = algorithms.ordered(r["algorithm"] for r in rows)
  workers = _parallel_workers(rows)
  seeds = sorted({r["seed"] for r in rows})
  header = "| M | " + " | ".join(a.label for a in algs) + " |"
  lines = [header, "|---" * (len(algs) + 1) + "|"]
  for m in workers:
    cells = [_cell(_errors(rows, a, m, key)) for a in algs]
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  what = key.replace("_", " ")
  note = (f"\n{what} (%), mean ± std over {len(seeds)} seed(s) "
          f"{', '.join(map(str, seeds))}.")
  return "\n".join(lines) + "\n" + note + "\n"


def _mean_curve(histories: Sequence[list[dict]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  n = min(len(h) for h in histories)
  errs = np.array([[e["test_error"] for e in h[:n]] for h in histories])
  return np.arange(1, n + 1), errs.mean(0), errs.std(0)


def plot_error_vs_epoch(
    histories: dict[tuple[str, int], list[list[dict]]], path: str, *, title: str = ""
) -> None:
  """Test error against epoch, one panel per worker count, one line per algorithm.

  Args:
    histories: ``(algorithm, workers) -> [per-seed list of epoch records]``.
    path: the PNG to write.
    title: a figure title.
  """
  workers = sorted({
      m for a, m in histories if not algorithms.get(a).single_worker
  }) or [1]
  fig, axes = plt.subplots(1, len(workers), figsize=(4.2 * len(workers), 4.0),
                           sharey=True, squeeze=False)
  for ax, m in zip(axes[0], workers):
    for a in algorithms.ordered(a for a, _ in histories):
      runs = histories.get((a.name, a.effective_workers(m)))
      if not runs:
        continue
      x, mean, std = _mean_curve(runs)
      ax.plot(x, 100 * mean, color=a.color, label=a.label, ls=a.linestyle)
      ax.fill_between(x, 100 * np.maximum(mean - std, 1e-3), 100 * (mean + std),
                      color=a.color, alpha=0.15)
    ax.set_title(f"M = {m}")
    ax.set_xlabel("epoch")
    _log_percent_axis(ax)
  axes[0][0].set_ylabel("test error (%), mean ± std over seeds")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8,
             bbox_to_anchor=(0.5, 0.0))
  _finish(fig, path, title, bottom=0.08)


def plot_error_vs_workers(rows: Sequence[dict[str, Any]], path: str, *, title: str = "") -> None:
  """Final test error (mean ± std over seeds) against the number of workers."""
  workers = _parallel_workers(rows)
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for a in algorithms.ordered(r["algorithm"] for r in rows):
    if a.single_worker:
      e = _errors(rows, a, 1, "final_test_error")
      ax.axhline(100 * e.mean(), color=a.color, ls=a.linestyle, label=a.label)
      continue
    stats = [_errors(rows, a, m, "final_test_error") for m in workers]
    ms = [m for m, e in zip(workers, stats) if e.size]
    mean = [100 * e.mean() for e in stats if e.size]
    std = [100 * _std(e) for e in stats if e.size]
    ax.errorbar(ms, mean, yerr=std, color=a.color, marker=a.marker, capsize=3,
                label=a.label)
  ax.set_xscale("log", base=2)
  _log_percent_axis(ax)
  ax.set_xticks(workers, [str(m) for m in workers])
  ax.set_xlabel("workers M")
  ax.set_ylabel("final test error (%), mean ± std over seeds")
  ax.legend(fontsize=8)
  _finish(fig, path, title)


def plot_staleness(staleness: dict[int, np.ndarray], path: str, *, title: str = "") -> None:
  """Histogram of the schedule's staleness, one panel per worker count."""
  ms = sorted(staleness)
  fig, axes = plt.subplots(1, len(ms), figsize=(3.6 * len(ms), 3), squeeze=False)
  for ax, m in zip(axes[0], ms):
    s = staleness[m]
    ax.hist(s, bins=np.arange(s.max() + 2) - 0.5, color="C0")
    ax.set_title(f"M = {m} (mean {s.mean():.1f})")
    ax.set_xlabel("staleness τ")
  axes[0][0].set_ylabel("arrivals")
  _finish(fig, path, title)


def _log_percent_axis(ax) -> None:
  """A log y-axis for errors in %, labelled in plain numbers."""
  ax.set_yscale("log")
  lo, hi = ax.get_ylim()
  ticks = [t for t in (1, 2, 5, 10, 20, 50, 100) if lo <= t <= hi]
  ax.set_yticks(ticks, [str(t) for t in ticks])
  ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.grid(alpha=0.3, which="both")


def _finish(fig, path: str, title: str, bottom: float = 0.0) -> None:
  if title:
    fig.suptitle(title)
  fig.tight_layout(rect=(0, bottom, 1, 1))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------ the evidence grid (methods)

METHODS_COLUMNS = (
    "optimizer", "schedule", "workers", "algorithm", "seed", "learning_rate",
    "dc_lambda", "final_test_error", "best_test_error", "wall_time",
    "mean_staleness", "epochs",
)


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
  keys = sorted({(r["optimizer"], r["schedule"], r["num_workers"], r["algorithm"])
                 for r in rows})
  sequential = {
      r["optimizer"]: _group(rows, optimizer=r["optimizer"],
                             algorithm=r["algorithm"]).mean()
      for r in rows if r["algorithm"] == algorithms.SEQUENTIAL.name
  }
  for opt, schedule, m, name in keys:
    errors = _group(rows, optimizer=opt, schedule=schedule, num_workers=m,
                    algorithm=name)
    asgd = _group(rows, optimizer=opt, schedule=schedule, num_workers=m,
                  algorithm=algorithms.ASGD.name)
    share = None
    if opt in sequential and asgd.size:
      share = gap_closed(sequential[opt], asgd.mean(), errors.mean(),
                         min_gap=min_gap)
    stats.append(dict(optimizer=opt, schedule=schedule, num_workers=m,
                      algorithm=name, mean=float(errors.mean()),
                      std=_std(errors), seeds=int(errors.size),
                      gap_closed=share))
  return stats


def _stat_cell(stat: dict | None) -> str:
  if stat is None:
    return "n/a"
  text = f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"
  if stat["gap_closed"] is not None and stat["algorithm"] != algorithms.ASGD.name:
    text += f" ({100 * stat['gap_closed']:.0f}%)"
  return text


def _columns(items: Sequence[dict]) -> list[tuple[str, int]]:
  """The (schedule, M) pairs of ``items``' multi-worker cells, in order."""
  return sorted({(s["schedule"], s["num_workers"]) for s in items
                 if not algorithms.get(s["algorithm"]).single_worker})


def _grid_table(items: Sequence[dict], text, title: str) -> str:
  """A row per method, a column per (schedule, M): ``text(item, algorithm)``
  of each cell's item (sequential SGD's single item in every column)."""
  algs = algorithms.ordered(s["algorithm"] for s in items)
  columns = _columns(items)
  lookup = {(s["schedule"], s["num_workers"], s["algorithm"]): s for s in items}
  lines = [f"**{title}**", "",
           "| method | " + " | ".join(f"{sc} M={m}" for sc, m in columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
  for a in algs:
    found = [lookup.get(("cyclic", 1, a.name) if a.single_worker
                        else (sc, m, a.name)) for sc, m in columns]
    lines.append(f"| {a.label} | " + " | ".join(
        "n/a" if f is None else text(f, a) for f in found) + " |")
  return "\n".join(lines) + "\n"


def methods_table(stats: Sequence[dict], optimizer: str, title: str) -> str:
  """One optimizer's table: a row per method, a column per (schedule, M).

  Cells: final test error (%), mean ± std over seeds, and in parentheses
  the share of ASGD's gap to sequential SGD closed (absent when ASGD is
  within the minimum gap of sequential SGD: nothing to close). Sequential
  SGD's row repeats its single value in every column.
  """
  mine = [s for s in stats if s["optimizer"] == optimizer]
  return _grid_table(mine, lambda s, a: _stat_cell(s), title)


def plot_gap_closed(stats: Sequence[dict], path: str, *, title: str = "",
                    optimizers: Sequence[str] = ()) -> None:
  """Share of ASGD's gap closed against M: a panel per optimizer (in
  ``optimizers``' order, default the stats'), a line per method (cyclic
  arrivals solid, Gamma dashed)."""
  optimizers = list(optimizers) or list(dict.fromkeys(s["optimizer"] for s in stats))
  fig, axes = plt.subplots(1, len(optimizers), figsize=(4.6 * len(optimizers), 4),
                           sharey=True, squeeze=False)
  for ax, opt in zip(axes[0], optimizers):
    mine = [s for s in stats if s["optimizer"] == opt and s["gap_closed"] is not None]
    for a in algorithms.ordered(s["algorithm"] for s in mine):
      for schedule, ls in (("cyclic", "-"), ("gamma", "--")):
        pts = sorted((s["num_workers"], 100 * s["gap_closed"]) for s in mine
                     if s["algorithm"] == a.name and s["schedule"] == schedule)
        if pts and a.name != algorithms.ASGD.name:
          ax.plot(*zip(*pts), color=a.color, marker=a.marker, ls=ls,
                  label=a.label if schedule == "cyclic" else None)
    ax.axhline(100, color="k", lw=0.8)
    ax.axhline(0, color=algorithms.ASGD.color, lw=0.8)
    ax.set_xscale("log", base=2)
    workers = sorted({s["num_workers"] for s in mine})
    ax.set_xticks(workers, [str(m) for m in workers])
    ax.set_title(opt)
    ax.set_xlabel("workers M (solid: cyclic, dashed: Gamma)")
    ax.set_ylim(-100, 150)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("share of ASGD's gap to sequential closed (%)")
  handles, labels = axes[0][0].get_legend_handles_labels()
  for ax in axes[0][1:]:
    for h, l in zip(*ax.get_legend_handles_labels()):
      if l not in labels:
        handles.append(h)
        labels.append(l)
  if labels:
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6),
               fontsize=8, bbox_to_anchor=(0.5, 0.0))
  _finish(fig, path, title, bottom=0.14)


def paired_table(stats: Sequence[dict], baseline: str, variant: str) -> str:
  """``variant`` against ``baseline`` in every cell they share: their errors,
  the difference, and whether the variant hurts (its mean is worse by more
  than the larger of the two standard deviations)."""
  by_cell = {(s["optimizer"], s["schedule"], s["num_workers"], s["algorithm"]): s
             for s in stats}
  lines = [f"| optimizer | arrivals | M | {algorithms.get(baseline).label} | "
           f"{algorithms.get(variant).label} | difference | hurts? |",
           "|---" * 7 + "|"]
  for (opt, schedule, m, name), b in by_cell.items():
    v = by_cell.get((opt, schedule, m, variant))
    if name != baseline or v is None:
      continue
    diff = v["mean"] - b["mean"]
    hurts = "yes" if diff > max(b["std"], v["std"]) else "no"
    lines.append(f"| {opt} | {schedule} | {m} | {_stat_cell(b)} | {_stat_cell(v)} "
                 f"| {100 * diff:+.2f} | {hurts} |")
  return "\n".join(lines) + "\n"


def _binned(x: np.ndarray, y: np.ndarray, edges: np.ndarray):
  """Mean of ``y`` per bin of ``x`` (bins with no sample dropped)."""
  which = np.digitize(x, edges) - 1
  keep = [b for b in range(len(edges) - 1) if np.any(which == b)]
  centers = np.array([(edges[b] + edges[b + 1]) / 2 for b in keep])
  return centers, np.array([y[which == b].mean() for b in keep])


def plot_diagnostics(traces: dict[tuple[str, str], dict], path: str, *,
                     title: str = "") -> None:
  """Is compensation helping? A row per optimizer: the cosine of the applied
  direction to the fresh gradient against staleness (left; ASGD's is its
  stale gradient's), and its relative error over training (right).

  Args:
    traces: ``(optimizer, algorithm) -> {"staleness", "step",
      "applied_cosine", "applied_error", ...}``, arrays of sampled arrivals.
    path: the PNG to write.
    title: a figure title.
  """
  optimizers = list(dict.fromkeys(o for o, _ in traces))
  fig, axes = plt.subplots(len(optimizers), 2, figsize=(11, 3.8 * len(optimizers)),
                           squeeze=False)
  for (ax_c, ax_e), opt in zip(axes, optimizers):
    for a in algorithms.ordered(n for o, n in traces if o == opt):
      t = {k: np.asarray(v) for k, v in traces[(opt, a.name)].items()}
      tau = t["staleness"]
      if tau.max() - tau.min() < 12:  # one bin per staleness
        edges = np.arange(tau.min(), tau.max() + 2) - 0.5
      else:
        edges = np.linspace(tau.min() - 0.5, tau.max() + 0.5, 12)
      ax_c.plot(*_binned(tau, t["applied_cosine"], edges), color=a.color,
                marker=a.marker, ms=4, label=a.label)
      window = max(1, len(t["step"]) // 40)
      kernel = np.ones(window) / window
      err = np.convolve(t["applied_error"], kernel, mode="valid")
      ax_e.plot(t["step"][window - 1:], err, color=a.color, label=a.label, lw=1)
    ax_c.set(xlabel="staleness τ", ylabel="cosine(applied, fresh gradient)",
             title=f"{opt}: direction vs staleness")
    ax_e.set(xlabel="server step", ylabel="‖applied − fresh‖ / ‖fresh‖",
             yscale="log", title=f"{opt}: error over training (moving mean)")
    for ax in (ax_c, ax_e):
      ax.grid(alpha=0.3)
    ax_e.legend(fontsize=7, ncol=2)
  _finish(fig, path, title)


def remedy_summary(stats: Sequence[dict], baseline: str,
                   variants: Sequence[str]) -> str:
  """One line per variant of ``baseline``: in how many of the cells they
  share its mean is lower, higher, and higher by more than the larger of
  the two standard deviations ("hurts", as in :func:`paired_table`), and
  the largest such difference."""
  by_cell = {(s["optimizer"], s["schedule"], s["num_workers"], s["algorithm"]): s
             for s in stats}
  lines = [f"| remedy (against {algorithms.get(baseline).label}) | cells | "
           "better | worse | hurts | worst difference (points) |",
           "|---" * 6 + "|"]
  for variant in variants:
    diffs = []
    for (opt, schedule, m, name), b in by_cell.items():
      v = by_cell.get((opt, schedule, m, variant))
      if name == baseline and v is not None:
        diffs.append((v["mean"] - b["mean"], max(b["std"], v["std"])))
    if not diffs:
      continue
    worse = sum(d > 0 for d, _ in diffs)
    hurts = sum(d > tol for d, tol in diffs)
    lines.append(
        f"| {algorithms.get(variant).label} | {len(diffs)} | "
        f"{sum(d < 0 for d, _ in diffs)} | {worse} | {hurts} | "
        f"{100 * max(d for d, _ in diffs):+.2f} |")
  return "\n".join(lines) + "\n"


def targets_table(stats: Sequence[dict], targets: Sequence[Sequence]) -> str:
  """Per target ``(optimizer, schedule, M, share)``: sequential SGD and ASGD
  in that cell, the methods whose mean closes at least ``share`` of ASGD's
  gap, and the best method (lowest mean error)."""
  lines = ["| optimizer | arrivals | M | needed | sequential SGD | ASGD | "
           "methods that reach it (share closed) | best method |",
           "|---" * 8 + "|"]
  for opt, schedule, m, share in targets:
    mine = [s for s in stats if s["optimizer"] == opt]
    cell = [s for s in mine if s["schedule"] == schedule and s["num_workers"] == m]
    seq = [s for s in mine if algorithms.get(s["algorithm"]).single_worker]
    asgd = [s for s in cell if s["algorithm"] == algorithms.ASGD.name]
    others = [s for s in cell if s["algorithm"] != algorithms.ASGD.name]
    if not (seq and asgd and others):
      continue
    reach = sorted((s for s in others if s["gap_closed"] is not None
                    and s["gap_closed"] >= share), key=lambda s: s["mean"])
    best = min(others, key=lambda s: s["mean"])
    named = ", ".join(f"{algorithms.get(s['algorithm']).label} "
                      f"({100 * s['gap_closed']:.0f}%)" for s in reach) or "none"
    lines.append(
        f"| {opt} | {schedule} | {m} | {100 * share:.0f}% | {_stat_cell(seq[0])} | "
        f"{_stat_cell(asgd[0])} | {named} | "
        f"{algorithms.get(best['algorithm']).label}: {_stat_cell(best)} |")
  return "\n".join(lines) + "\n"


# How tuned config fields are named in tables (DC's λ is λ0 for DC-ASGD-a).
FIELD_LABELS = {"dc_lambda": "λ"}


def _setting_text(row: dict, algorithm: algorithms.Algorithm) -> str:
  """``row``'s learning rate, then its other tuned fields: ``0.05, λ 8``."""
  return ", ".join([f"{row['learning_rate']:g}"] + [
      f"{FIELD_LABELS.get(f, f)} {row[f]:g}" for f in algorithm.tuned])


def tuned_table(rows: Sequence[dict], optimizer: str) -> str:
  """The setting each cell of ``optimizer`` was reported with: its learning
  rate (and the other tuned fields, ``Algorithm.tuned``)."""
  mine = [r for r in rows if r["optimizer"] == optimizer]
  return _grid_table(
      mine, _setting_text,
      f"{optimizer}: the tuned learning rate (and λ, DC-ASGD-a's λ0, where it "
      "is tuned)")


def plot_methods_errors(stats: Sequence[dict], path: str, *, title: str = "",
                        optimizers: Sequence[str] = ()) -> None:
  """Final test error (mean ± std) against M: a row per optimizer (in
  ``optimizers``' order, default the stats'), a column per arrival schedule,
  a line per method; sequential SGD as a level."""
  optimizers = list(optimizers) or list(dict.fromkeys(s["optimizer"] for s in stats))
  schedules = sorted({s["schedule"] for s in stats
                      if not algorithms.get(s["algorithm"]).single_worker})
  fig, axes = plt.subplots(len(optimizers), len(schedules), squeeze=False,
                           figsize=(5.2 * len(schedules), 3.8 * len(optimizers)))
  labels = {}
  for row, opt in zip(axes, optimizers):
    mine = [s for s in stats if s["optimizer"] == opt]
    for ax, schedule in zip(row, schedules):
      for a in algorithms.ordered(s["algorithm"] for s in mine):
        if a.single_worker:
          s = [s for s in mine if s["algorithm"] == a.name][0]
          h = ax.axhline(100 * s["mean"], color=a.color, ls=a.linestyle)
        else:
          pts = sorted((s["num_workers"], 100 * s["mean"], 100 * s["std"])
                       for s in mine
                       if s["algorithm"] == a.name and s["schedule"] == schedule)
          ms, mean, std = zip(*pts)
          h = ax.errorbar(ms, mean, yerr=std, color=a.color, marker=a.marker,
                          ms=4, capsize=2, lw=1)
        labels.setdefault(a.label, h)
      ax.set_xscale("log", base=2)
      workers = sorted({s["num_workers"] for s in mine} - {1})
      ax.set_xticks(workers, [str(m) for m in workers])
      ax.set_title(f"{opt}, {schedule} arrivals")
      ax.set_xlabel("workers M")
      _log_percent_axis(ax)
    row[0].set_ylabel("final test error (%)")
  fig.legend(list(labels.values()), list(labels), loc="lower center",
             ncol=min(len(labels), 6), fontsize=8, bbox_to_anchor=(0.5, 0.0))
  _finish(fig, path, title, bottom=0.07)


def rate_gap_table(items: Sequence[dict]) -> str:
  """ASGD's gap split in two (``experiments.methods.rate_gap``'s items):
  sequential SGD at ASGD's learning rate against sequential SGD at its own
  best rate (what the smaller rate costs), and ASGD against sequential SGD at
  the same rate (what staleness costs at that rate)."""
  lines = ["| optimizer | arrivals | M | ASGD's rate | sequential SGD (its best "
           "rate) | sequential SGD at ASGD's rate | ASGD | share of the gap "
           "from the rate |", "|---" * 8 + "|"]
  for r in items:
    gap = r["asgd"] - r["sequential"]
    share = ((r["sequential_at_asgd_rate"] - r["sequential"]) / gap
             if gap > 0 else math.nan)
    lines.append(
        f"| {r['optimizer']} | {r['schedule']} | {r['num_workers']} | "
        f"{r['learning_rate']:g} | {100 * r['sequential']:.2f} | "
        f"{100 * r['sequential_at_asgd_rate']:.2f} | {100 * r['asgd']:.2f} | "
        + ("-" if math.isnan(share) else f"{100 * share:.0f}%") + " |")
  return "\n".join(lines) + "\n"


def write_methods_report(config: Any, rows: Sequence[dict], workdir: str,
                         traces: dict | None = None,
                         rate_gap: Sequence[dict] = ()) -> str:
  """Writes results.csv, stats.json, table.md (the targets, one table per
  optimizer, the remedies against DC-ASGD-a), tuned.md (the settings) and
  the plots gap_closed.png, errors.png (and diagnostics.png from
  ``traces``); returns table.md's text."""
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=METHODS_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, "workers": r["num_workers"]} for r in rows)
  stats = cell_stats(rows, min_gap=config.report.min_gap)
  seeds = ", ".join(map(str, config.grid.seeds))
  r = config.report
  tables = ["**Targets: the share of ASGD's gap to sequential SGD one method "
            "must close**\n\n" + targets_table(stats, r.targets)]
  tables += [
      methods_table(stats, opt, f"{opt}: final test error (%), mean ± std over "
                    f"seeds {seeds} (share of ASGD's gap closed)")
      for opt in config.grid.optimizers
  ]
  tables.append("**The early-training remedies against "
                f"{algorithms.get(r.remedy_baseline).label}** (hurts: worse "
                "by more than the larger standard deviation)\n\n"
                + remedy_summary(stats, r.remedy_baseline, r.remedies))
  tables += [f"**{algorithms.get(v).label} against "
             f"{algorithms.get(r.remedy_baseline).label}**\n\n"
             + paired_table(stats, r.remedy_baseline, v) for v in r.remedies]
  if rate_gap:
    tables.append("**Where ASGD's gap comes from** (mean final test error (%) "
                  f"over the tuning seeds {', '.join(map(str, config.tuning.seeds))})"
                  "\n\n" + rate_gap_table(rate_gap))
  text = "\n".join(tables)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(text)
  with open(os.path.join(workdir, "tuned.md"), "w") as f:
    f.write("\n".join(tuned_table(rows, opt) for opt in config.grid.optimizers))
  with open(os.path.join(workdir, "stats.json"), "w") as f:
    json.dump(stats, f, indent=1)
  title = f"{config.num_epochs} epochs, tuned learning rates, seeds {seeds}"
  order = config.grid.optimizers
  plot_gap_closed(stats, os.path.join(workdir, "gap_closed.png"), title=title,
                  optimizers=order)
  plot_methods_errors(stats, os.path.join(workdir, "errors.png"), title=title,
                      optimizers=order)
  if traces:
    d = config.report.diagnostics
    plot_diagnostics(traces, os.path.join(workdir, "diagnostics.png"),
                     title=f"{d.schedule} arrivals, M = {d.num_workers}, seed "
                     f"{d.seed}, every {d.every}th arrival")
  return text
