"""Tables of the studies: results.csv rows and markdown tables.

Each function formats what :mod:`experiments.statistics` computes (or the
runs' rows themselves) and returns the text; the studies
(:mod:`experiments.compare`, :mod:`experiments.methods`) write it.
"""

from __future__ import annotations

from collections.abc import Sequence
import csv
import math
from typing import Any

import numpy as np

from experiments import algorithms
from experiments import statistics

COLUMNS = (
    "algorithm", "workers", "schedule", "seed", "final_test_error",
    "best_test_error", "wall_time", "mean_staleness", "epochs",
)
"""The columns of the comparison's ``results.csv``."""

METHODS_COLUMNS = (
    "optimizer", "schedule", "workers", "algorithm", "seed", "learning_rate",
    "dc_lambda", "secant_lambda", "final_test_error", "best_test_error",
    "wall_time", "mean_staleness", "epochs",
)
"""The columns of the methods grid's ``results.csv``."""


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
  """One row per run, in :data:`COLUMNS` order."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def write_methods_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
  """One row per run of the methods grid, in :data:`METHODS_COLUMNS` order
  (``workers`` is the row's ``num_workers``)."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(
        f, fieldnames=METHODS_COLUMNS, extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows({**r, "workers": r["num_workers"]} for r in rows)


def _cell(errors: np.ndarray) -> str:
  if errors.size == 0:
    return "-"
  if errors.size == 1:
    return f"{100 * errors[0]:.2f}"
  return f"{100 * errors.mean():.2f} ± {100 * statistics.std(errors):.2f}"


def markdown_table(
    rows: Sequence[dict[str, Any]], *, key: str = "final_test_error"
) -> str:
  """The paper's table: test error (%) per worker count (rows) and algorithm.

  Cells are the mean ± sample standard deviation over seeds. Sequential SGD
  has one worker; its value is repeated in every row, as in the paper.
  """
  algs = algorithms.ordered(r["algorithm"] for r in rows)
  workers = statistics.parallel_workers(rows)
  seeds = sorted({r["seed"] for r in rows})
  header = "| M | " + " | ".join(a.label for a in algs) + " |"
  lines = [header, "|---" * (len(algs) + 1) + "|"]
  for m in workers:
    cells = [_cell(statistics.errors(rows, a, m, key)) for a in algs]
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  what = key.replace("_", " ")
  note = (f"\n{what} (%), mean ± std over {len(seeds)} seed(s) "
          f"{', '.join(map(str, seeds))}.")
  return "\n".join(lines) + "\n" + note + "\n"


def _stat_cell(stat: dict | None) -> str:
  if stat is None:
    return "n/a"
  text = f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"
  if (
      stat["gap_closed"] is not None
      and stat["algorithm"] != algorithms.ASGD.name
  ):
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
  lines = [
      f"**{title}**",
      "",
      "| method | " + " | ".join(f"{sc} M={m}" for sc, m in columns) + " |",
      "|---" * (len(columns) + 1) + "|",
  ]
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


def paired_table(stats: Sequence[dict], baseline: str, variant: str) -> str:
  """``variant`` against ``baseline`` in every cell they share: their errors,
  the difference, and whether the variant hurts (its mean is worse by more
  than the larger of the two standard deviations)."""
  lines = [f"| optimizer | arrivals | M | {algorithms.get(baseline).label} | "
           f"{algorithms.get(variant).label} | difference | hurts? |",
           "|---" * 7 + "|"]
  for b, v in statistics.paired_differences(stats, baseline, variant):
    diff = v["mean"] - b["mean"]
    hurts = "yes" if diff > max(b["std"], v["std"]) else "no"
    lines.append(f"| {b['optimizer']} | {b['schedule']} | {b['num_workers']} | "
                 f"{_stat_cell(b)} | {_stat_cell(v)} "
                 f"| {100 * diff:+.2f} | {hurts} |")
  return "\n".join(lines) + "\n"


def remedy_summary(stats: Sequence[dict], baseline: str,
                   variants: Sequence[str]) -> str:
  """One line per variant of ``baseline``: in how many of the cells they
  share its mean is lower, higher, and higher by more than the larger of
  the two standard deviations ("hurts", as in :func:`paired_table`), and
  the largest such difference."""
  lines = [f"| remedy (against {algorithms.get(baseline).label}) | cells | "
           "better | worse | hurts | worst difference (points) |",
           "|---" * 6 + "|"]
  for variant in variants:
    diffs = [
        (v["mean"] - b["mean"], max(b["std"], v["std"]))
        for b, v in statistics.paired_differences(stats, baseline, variant)
    ]
    if not diffs:
      continue
    worse = sum(d > 0 for d, _ in diffs)
    hurts = sum(d > tol for d, tol in diffs)
    lines.append(
        f"| {algorithms.get(variant).label} | {len(diffs)} | "
        f"{sum(d < 0 for d, _ in diffs)} | {worse} | {hurts} | "
        f"{100 * max(d for d, _ in diffs):+.2f} |")
  return "\n".join(lines) + "\n"


# Rows of a cell that are references, not a method a server runs: the
# synchronous baseline (it waits for every worker) and the exact Taylor
# correction (the ceiling: it needs the loss at the server). The targets
# table shows them in their own columns.
REFERENCES = ("ssgd", "exact-dc")


def targets_table(stats: Sequence[dict], targets: Sequence[Sequence]) -> str:
  """Per target ``(optimizer, schedule, M, share)``: sequential SGD, ASGD,
  SSGD and the exact correction in that cell, the asynchronous methods whose
  mean closes at least ``share`` of ASGD's gap, and the best of them (lowest
  mean error)."""
  lines = ["| optimizer | arrivals | M | needed | sequential SGD | ASGD | "
           "SSGD | exact Taylor (ceiling) | "
           "methods that reach it (share closed) | best method |",
           "|---" * 10 + "|"]
  for opt, schedule, m, share in targets:
    mine = [s for s in stats if s["optimizer"] == opt]
    cell = [
        s for s in mine if s["schedule"] == schedule and s["num_workers"] == m
    ]
    seq = [s for s in mine if algorithms.get(s["algorithm"]).single_worker]
    asgd = [s for s in cell if s["algorithm"] == algorithms.ASGD.name]
    refs = {s["algorithm"]: s for s in cell if s["algorithm"] in REFERENCES}
    others = [s for s in cell if s["algorithm"] != algorithms.ASGD.name
              and s["algorithm"] not in REFERENCES]
    if not (seq and asgd and others):
      continue
    reach = sorted((s for s in others if s["gap_closed"] is not None
                    and s["gap_closed"] >= share), key=lambda s: s["mean"])
    best = min(others, key=lambda s: s["mean"])
    named = (
        ", ".join(
            f"{algorithms.get(s['algorithm']).label} "
            f"({100 * s['gap_closed']:.0f}%)"
            for s in reach
        )
        or "none"
    )
    ref_cells = " | ".join(
        _stat_cell(refs[r]) if r in refs else "-" for r in REFERENCES)
    lines.append(
        f"| {opt} | {schedule} | {m} | {100 * share:.0f}% | "
        f"{_stat_cell(seq[0])} | {_stat_cell(asgd[0])} | {ref_cells} | "
        f"{named} | "
        f"{algorithms.get(best['algorithm']).label}: {_stat_cell(best)} |"
    )
  return "\n".join(lines) + "\n"


# How tuned config fields are named in tables (DC's λ is λ0 for DC-ASGD-a).
FIELD_LABELS = {"dc_lambda": "λ", "secant_lambda": "λ"}


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


def rate_gap_table(items: Sequence[dict]) -> str:
  """ASGD's gap split in two (``experiments.methods.rate_gap``'s items):
  sequential SGD at ASGD's learning rate against sequential SGD at its own
  best rate (what the smaller rate costs), and ASGD against sequential SGD at
  the same rate (what staleness costs at that rate)."""
  lines = [
      "| optimizer | arrivals | M | ASGD's rate | sequential SGD (its best "
      "rate) | sequential SGD at ASGD's rate | ASGD | share of the gap "
      "from the rate |",
      "|---" * 8 + "|",
  ]
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


def _interval_text(interval: dict | None) -> str:
  """``-0.53 [-0.91, -0.15]`` (points), with ``n.s.`` when the interval
  crosses 0 (the difference is not resolved)."""
  if interval is None:
    return "-"
  text = (f"{100 * interval['mean']:+.2f} [{100 * interval['low']:+.2f}, "
          f"{100 * interval['high']:+.2f}]")
  return text if interval["resolved"] else text + " n.s."


def paired_ci_table(stats: Sequence[dict], optimizer: str, reference: str,
                    title: str) -> str:
  """Each method's final error minus ``reference``'s (``"asgd"`` or
  ``"ssgd"``) on the same seeds, in points, with its t-interval
  (:func:`experiments.statistics.paired_interval`); ``n.s.``: the interval
  crosses 0, the grid cannot tell the two apart. Against SSGD the cell also
  gives the share of ASGD's gap to SSGD closed (``gap_closed_ssgd``)."""
  key = "vs_asgd" if reference == algorithms.ASGD.name else "vs_ssgd"

  def text(s, a):
    if a.single_worker or a.name == reference:
      return "-"
    out = _interval_text(s[key])
    if key == "vs_ssgd" and s.get("gap_closed_ssgd") is not None \
        and a.name != algorithms.ASGD.name:
      out += f" ({100 * s['gap_closed_ssgd']:.0f}%)"
    return out

  mine = [s for s in stats if s["optimizer"] == optimizer]
  return _grid_table(mine, text, title)


def _time_text(t: dict | None) -> str:
  if t is None:
    return "-"
  if not t["known"]:
    return f"time unknown ({t['reached']}/{t['runs']})"
  if t["time"] is None:
    return f"not reached ({t['reached']}/{t['runs']})"
  return f"{t['time']:.0f} ({t['gradients']:.0f} g, {t['reached']}/{t['runs']})"


def time_table(stats: Sequence[dict], optimizer: str, title: str) -> str:
  """Time to accuracy: per method and column, the simulated time (and
  gradients, and how many seeds get there) at which it first reaches
  sequential SGD's final error, then SSGD's, then its speed-up over
  sequential SGD (ideal: M); "not reached" when half the seeds or more do
  not within the run's epochs."""

  def text(s, a):
    if a.single_worker:  # the reference: its final error at its budget's end
      return ("-" if s["final_time"] is None
              else f"{s['final_time']:.0f} (its whole run)")
    parts = [_time_text(s["time_to_sequential"]),
             _time_text(s["time_to_ssgd"])]
    speed = "-" if s["speedup"] is None else f"{s['speedup']:.1f}x"
    return " / ".join(parts) + f" / {speed}"

  mine = [s for s in stats if s["optimizer"] == optimizer]
  return _grid_table(mine, text, title)


def resolution_summary(stats: Sequence[dict]) -> str:
  """How well the grid resolves the methods: of the paired comparisons
  against ASGD, how many intervals exclude 0, and the median and largest
  half-width (points)."""
  intervals = [s["vs_asgd"] for s in stats
               if s.get("vs_asgd") is not None
               and s["algorithm"] != algorithms.ASGD.name]
  if not intervals:
    return "No paired comparisons (fewer than two seeds).\n"
  half = np.array([(i["high"] - i["low"]) / 2 for i in intervals])
  resolved = sum(i["resolved"] for i in intervals)
  return (f"{resolved} of {len(intervals)} differences from ASGD are resolved "
          f"(their {100 * statistics.CONFIDENCE:.0f}% interval excludes 0); "
          f"the intervals' half-width is {100 * np.median(half):.2f} points "
          f"(median), {100 * half.max():.2f} at most: differences smaller "
          "than the half-width of their cell cannot be told from seed "
          "noise.\n")
