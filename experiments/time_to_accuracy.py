r"""Time to accuracy with a longer cap: do the methods reach sequential SGD?

Example::

  python -m experiments.time_to_accuracy \
      --config=experiments/configs/time_to_accuracy.py \
      --workdir=runs/time_to_accuracy \
      --tuned=experiments/results/methods-quick/tuned.json

The methods grid's quick tier (:mod:`experiments.methods`,
``configs/methods.py:quick``) gives every method the budget sequential SGD
gets (``study.budget_epochs`` = 10 epochs), so a method that would reach
sequential SGD's final error in epoch 12 is "not reached" there. This study
reruns chosen methods (``study.cells``) at the quick tier's tuned settings
(``--tuned``) for ``num_epochs`` epochs (40) on ``study.seeds``, and
reports, per method:

* the simulated time and the gradients at which it first reaches (a)
  sequential SGD's and (b) SSGD's mean final error at their 10-epoch budget
  (the quick tier's ``stats.json``, beside ``--tuned``), median over seeds,
  with how many seeds get there
  (:func:`experiments.statistics.median_time_to_target`: "not reached" when
  half the seeds or more do not);
* its speed-up over sequential SGD: sequential SGD's simulated time for its
  whole 10-epoch run over the method's time to (a) (ideal: M), and over
  SSGD: SSGD's time for its 10-epoch run over the method's time to (b);
* its error at the budget and at the cap.

SSGD is one of the methods, at the longer cap too: the fair synchronous
baseline (does it reach sequential SGD's error, and when). Sequential SGD
reruns its 10 epochs for the plot. The clock is the grid's
(:func:`experiments.input_pipeline.arrival_times`, recorded per epoch:
:func:`experiments.methods.curve`); errors are evaluated once per epoch.

Runs are those of the grid (:func:`experiments.methods.run`) in
``WORKDIR/epochs<N>/runs/<cell>-<setting>-seed<seed>``, so an interrupted
study resumes where it stopped. Writes ``table.md``, ``results.json`` and
``time_to_accuracy.png`` to ``--workdir``.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import math
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

from experiments import algorithms
from experiments import methods
from experiments import plots
from experiments import programs
from experiments import startup
from experiments import statistics

DEFAULT_TUNED = os.path.join(
    "experiments", "results", "methods-quick", "tuned.json"
)


def run_config(
    config: ml_collections.ConfigDict, num_epochs: int
) -> ml_collections.ConfigDict:
  """The grid's config of the study's runs: ``config`` without ``study``,
  ``num_epochs`` epochs (so a run's directory does not depend on the
  study's other fields)."""
  c = ml_collections.ConfigDict(config.to_dict())
  if "study" in c:
    del c["study"]
  c.num_epochs = num_epochs
  return c


def targets(
    stats: Sequence[dict], optimizer: str, schedule: str, num_workers: int
) -> dict[str, float]:
  """The targets of a cell from the quick tier's ``stats.json``.

  Returns:
    ``sequential`` / ``ssgd``: sequential SGD's (of ``optimizer``) and the
    cell's SSGD's mean final error; ``sequential_time`` / ``ssgd_time``:
    the simulated time of their whole runs (median over seeds).

  Raises:
    ValueError: if ``stats`` has no such entry, or it has no clock.
  """

  def find(**where):
    found = [s for s in stats if all(s[k] == v for k, v in where.items())]
    if len(found) != 1 or found[0].get("final_time") is None:
      raise ValueError(
          f"stats: expected one entry with a final_time for {where}, found "
          f"{len(found)}; pass the quick tier's stats.json (--stats)."
      )
    return found[0]

  seq = find(optimizer=optimizer, algorithm=algorithms.SEQUENTIAL.name)
  ssgd = find(
      optimizer=optimizer,
      schedule=schedule,
      num_workers=num_workers,
      algorithm=statistics.SSGD,
  )
  return dict(
      sequential=float(seq["mean"]),
      sequential_time=float(seq["final_time"]),
      ssgd=float(ssgd["mean"]),
      ssgd_time=float(ssgd["final_time"]),
  )


def summarize(
    rows: Sequence[dict], target: dict[str, float], budget_epochs: int
) -> dict[str, Any]:
  """One method's time to accuracy over its seeds.

  Args:
    rows: one per seed (:func:`experiments.methods.run`'s, with ``curve``).
    target: the cell's :func:`targets`.
    budget_epochs: the quick tier's epochs (for the error at the budget).

  Returns:
    ``to_sequential`` / ``to_ssgd`` (:func:`experiments.statistics.
    median_time_to_target` of ``target["sequential"]`` / ``["ssgd"]``),
    ``speedup`` (``sequential_time`` over ``to_sequential``'s time, ``None``
    if not reached), ``speedup_ssgd`` (``ssgd_time`` over ``to_ssgd``'s),
    ``per_seed`` (each seed's :func:`experiments.statistics.time_to_target`
    of both targets), ``budget_error`` / ``final_error`` (mean over seeds
    at ``budget_epochs`` and at the end; a NaN error counts as 1),
    ``final_time`` (the clock at the end, median over seeds).
  """
  out: dict[str, Any] = {}
  for name in ("sequential", "ssgd"):
    t = statistics.median_time_to_target(rows, target[name])
    out[f"to_{name}"] = t
    out[f"speedup{'' if name == 'sequential' else '_ssgd'}"] = (
        None if t["time"] is None else target[f"{name}_time"] / t["time"]
    )
  out["per_seed"] = {
      int(r["seed"]): {
          name: statistics.time_to_target(
              r["curve"]["test_error"],
              r["curve"]["time"],
              r["curve"]["gradients"],
              target[name],
          )
          for name in ("sequential", "ssgd")
      }
      for r in rows
  }

  def error(r, epoch):
    e = r["curve"]["test_error"][epoch - 1]
    return 1.0 if math.isnan(e) else e

  out["budget_error"] = float(np.mean([error(r, budget_epochs) for r in rows]))
  out["final_error"] = float(
      np.mean([error(r, len(r["curve"]["test_error"])) for r in rows])
  )
  out["final_time"] = float(np.median([r["curve"]["time"][-1] for r in rows]))
  return out


def verdict(
    results: Sequence[dict],
    optimizer: str,
    schedule: str,
    num_workers: int,
    speedup: float,
) -> dict[str, Any]:
  """Issue 18's target in one cell: the method (SSGD aside) that reaches
  sequential SGD's final error first (median time), its speed-up, whether
  it is at least ``speedup``, and whether it gets there before SSGD.

  Returns:
    ``best`` (the algorithm, ``None`` if none reaches), ``speedup`` (over
    sequential SGD's whole run), ``ssgd_time`` (SSGD's time to the same
    error, ``None``: not reached), ``faster_than_ssgd``, ``met`` (both),
    and like for like: ``sequential_first`` (when sequential SGD's own runs
    first reach their mean final error, on the same first-epoch-at-or-below
    measure; ``None`` without its row or if not reached) and
    ``speedup_first`` (that time over the best method's).
  """
  mine = [
      r
      for r in results
      if (r["optimizer"], r["schedule"], r["num_workers"])
      == (optimizer, schedule, num_workers)
      or (
          r["optimizer"] == optimizer
          and r["algorithm"] == algorithms.SEQUENTIAL.name
      )
  ]

  def first(name):
    found = [r for r in mine if r["algorithm"] == name]
    return found[0]["to_sequential"]["time"] if found else None

  ssgd_time = first(statistics.SSGD)
  seq_first = first(algorithms.SEQUENTIAL.name)
  reached = [
      r
      for r in mine
      if r["algorithm"] not in (statistics.SSGD, algorithms.SEQUENTIAL.name)
      and r["to_sequential"]["time"] is not None
  ]
  if not reached:
    return dict(
        best=None,
        speedup=None,
        ssgd_time=ssgd_time,
        faster_than_ssgd=False,
        met=False,
        sequential_first=seq_first,
        speedup_first=None,
    )
  best = min(reached, key=lambda r: r["to_sequential"]["time"])
  t = best["to_sequential"]["time"]
  faster = ssgd_time is None or t < ssgd_time
  return dict(
      best=best["algorithm"],
      speedup=best["speedup"],
      ssgd_time=ssgd_time,
      faster_than_ssgd=faster,
      met=bool(faster and best["speedup"] >= speedup),
      sequential_first=seq_first,
      speedup_first=None if seq_first is None else seq_first / t,
  )


def study(
    config: ml_collections.ConfigDict,
    workdir: str,
    tuned: dict[str, dict],
    stats: Sequence[dict],
    *,
    cache: programs.ProgramCache | None = None,
) -> list[dict]:
  """Runs every method of ``config.study.cells`` on ``config.study.seeds``
  and sequential SGD at the budget; writes the report.

  Args:
    config: the study (configs/time_to_accuracy.py).
    workdir: where the runs and the report go.
    tuned: the quick tier's ``tuned.json`` (cell key -> setting).
    stats: the quick tier's ``stats.json`` (the targets).
    cache: the programs its runs share (``None``: a new one).

  Returns:
    One :func:`summarize` dict per method and cell, with its cell, setting
    and ``curves`` (the seeds' :func:`experiments.methods.curve`).

  Raises:
    ValueError: before any run, if ``num_epochs`` is below
      ``study.budget_epochs``, or ``tuned`` or ``stats`` lacks a cell.
  """
  s = config.study
  if config.num_epochs < s.budget_epochs:
    raise ValueError(
        f"config.num_epochs ({config.num_epochs}) must be at least "
        f"study.budget_epochs ({s.budget_epochs}): the cap is the longer run."
    )
  plan = []
  for opt, schedule, m, names in s.cells:
    target = targets(stats, opt, schedule, m)
    for name in (algorithms.SEQUENTIAL.name, *names):
      cell = (
          methods.Cell(opt, "cyclic", 1, name)
          if algorithms.get(name).single_worker
          else methods.Cell(opt, schedule, m, name)
      )
      if cell.key not in tuned:
        raise ValueError(
            f"tuned: no setting for {cell.key!r}; pass the quick tier's "
            "tuned.json (--tuned)."
        )
      plan.append(
          (cell, (opt, schedule, m), target, tuned[cell.key]["setting"])
      )
  cache = programs.ProgramCache() if cache is None else cache
  results = []
  for cell, (opt, schedule, m), target, setting in plan:
    t0 = time.perf_counter()
    epochs = (
        s.budget_epochs
        if algorithms.get(cell.algorithm).single_worker
        else config.num_epochs
    )
    c = run_config(config, epochs)
    where = os.path.join(workdir, f"epochs{epochs}")
    rows = [
        methods.run(c, where, cell, seed, setting, cache=cache)
        for seed in s.seeds
    ]
    results.append(
        dict(
            optimizer=opt,
            schedule=schedule,
            num_workers=m,
            algorithm=cell.algorithm,
            setting=setting,
            epochs=epochs,
            target=target,
            curves={int(r["seed"]): r["curve"] for r in rows},
            **summarize(rows, target, s.budget_epochs),
        )
    )
    logging.warning(
        "%s (%d epochs): %.0f s", cell.key, epochs, time.perf_counter() - t0
    )
  write_report(config, results, workdir)
  return results


def _time(t: dict) -> str:
  if t["time"] is None:
    return f"not reached ({t['reached']}/{t['runs']})"
  return f"{t['time']:.0f} ({t['gradients']:.0f} g, {t['reached']}/{t['runs']})"


def _speed(x: float | None) -> str:
  return "-" if x is None else f"{x:.1f}x"


def cell_table(
    config: ml_collections.ConfigDict,
    results: Sequence[dict],
    optimizer: str,
    schedule: str,
    num_workers: int,
) -> str:
  """One cell's table: a row per method (sequential SGD first)."""
  mine = [
      r
      for r in results
      if (r["optimizer"], r["schedule"], r["num_workers"])
      == (optimizer, schedule, num_workers)
  ]
  seq = next(r for r in mine if r["algorithm"] == algorithms.SEQUENTIAL.name)
  t = seq["target"]
  b = config.study.budget_epochs
  lines = [
      f"**{optimizer}, {schedule} M={num_workers}**: targets (quick tier, "
      f"{b} epochs): sequential SGD {100 * t['sequential']:.2f}% at time "
      f"{t['sequential_time']:.0f}, SSGD {100 * t['ssgd']:.2f}% at time "
      f"{t['ssgd_time']:.0f}",
      "",
      f"| method | setting | epochs | error at {b} epochs (%) | final error "
      "(%) | time of the run | to sequential's error: time (gradients, "
      "seeds) | speed-up over sequential | to SSGD's error: time (gradients,"
      " seeds) | speed-up over SSGD |",
      "|---" * 10 + "|",
  ]
  for r in mine:
    a = algorithms.get(r["algorithm"])
    setting = ", ".join(f"{k} {v:g}" for k, v in sorted(r["setting"].items()))
    if a.single_worker:  # the reference: reaches its error at its run's end
      reach = [
          "its whole run; first at or below it: " + _time(r["to_sequential"]),
          "-",
          "-",
          "-",
      ]
    else:
      reach = [
          _time(r["to_sequential"]),
          _speed(r["speedup"]),
          _time(r["to_ssgd"]),
          _speed(r["speedup_ssgd"]),
      ]
    lines.append(
        f"| {a.label} | {setting} | {r['epochs']} | "
        f"{100 * r['budget_error']:.2f} | {100 * r['final_error']:.2f} | "
        f"{r['final_time']:.0f} | " + " | ".join(reach) + " |"
    )
  return "\n".join(lines) + "\n"


def verdict_text(
    config: ml_collections.ConfigDict, results: Sequence[dict]
) -> str:
  """Issue 18's target against this study, in one paragraph."""
  opt, schedule, m, need = config.study.target
  v = verdict(results, opt, schedule, m, need)
  head = (
      f"**Target** ({opt}, {schedule} M={m}): the best method reaches "
      f"sequential SGD's final error at least {need:g}x faster than "
      "sequential SGD in simulated time, and before SSGD. "
  )
  ssgd = (
      "SSGD does not reach it within the cap"
      if v["ssgd_time"] is None
      else f"SSGD reaches it at time {v['ssgd_time']:.0f}"
  )
  if v["best"] is None:
    return head + (
        f"**Not met**: no method reaches it on half the seeds or "
        f"more within {config.num_epochs} epochs; {ssgd}.\n"
    )
  label = algorithms.get(v["best"]).label
  like = (
      ""
      if v["speedup_first"] is None
      else f" Like for like (sequential SGD's own runs first reach their "
      f"mean final error at time {v['sequential_first']:.0f}, median, on "
      f"the same measure): {v['speedup_first']:.1f}x "
      f"({'at least' if v['speedup_first'] >= need else 'below'} "
      f"{need:g}x)."
  )
  return head + (
      f"**{'Met' if v['met'] else 'Not met'}**: the first to get there is "
      f"{label}, {v['speedup']:.1f}x faster than sequential SGD's whole run "
      f"({'at least' if v['speedup'] >= need else 'below'} {need:g}x); "
      f"{ssgd}.{like}\n"
  )


def write_report(
    config: ml_collections.ConfigDict, results: Sequence[dict], workdir: str
) -> str:
  """Writes table.md, results.json and time_to_accuracy.png; returns
  table.md's text."""
  seeds = ", ".join(map(str, config.study.seeds))
  parts = [
      f"Time to accuracy with a {config.num_epochs}-epoch cap, the quick "
      f"tier's tuned settings (tuned at {config.study.budget_epochs} "
      f"epochs), seeds {seeds}. Time: simulated, one unit = one gradient's "
      'mean compute time; medians over seeds ("not reached" when half the '
      "seeds or more do not, with how many do); errors evaluated once per "
      "epoch; errors are means over seeds.\n",
      verdict_text(config, results),
  ]
  parts += [
      cell_table(config, results, opt, schedule, m)
      for opt, schedule, m, _ in config.study.cells
  ]
  text = "\n".join(parts)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(text)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(
        [{k: v for k, v in r.items() if k != "curves"} for r in results],
        f,
        indent=1,
    )
  plot(config, results, os.path.join(workdir, "time_to_accuracy.png"))
  return text


def plot(
    config: ml_collections.ConfigDict, results: Sequence[dict], path: str
) -> None:
  """Test error against simulated time per method (mean over seeds against
  the median clock), one panel per cell, with sequential SGD's and SSGD's
  final errors as horizontal lines and the target's speed-up as a vertical
  one."""
  import matplotlib.figure  # pylint: disable=g-import-not-at-top

  cells = config.study.cells
  fig = matplotlib.figure.Figure(
      figsize=(6 * len(cells), 4.5), layout="constrained"
  )
  axes = np.atleast_1d(fig.subplots(1, len(cells)))
  opt_t, schedule_t, m_t, need = config.study.target
  for ax, (opt, schedule, m, _) in zip(axes, cells):
    mine = [
        r
        for r in results
        if (r["optimizer"], r["schedule"], r["num_workers"])
        == (opt, schedule, m)
    ]
    for r in mine:
      a = algorithms.get(r["algorithm"])
      st = plots.style(a)
      curves = list(r["curves"].values())
      n = min(len(c["test_error"]) for c in curves)
      errors = np.array(
          [
              [1.0 if math.isnan(e) else e for e in c["test_error"][:n]]
              for c in curves
          ]
      )
      times = np.median([c["time"][:n] for c in curves], axis=0)
      ax.plot(
          times,
          100 * errors.mean(0),
          color=st.color,
          marker=st.marker,
          linestyle=st.linestyle,
          ms=3,
          label=a.label,
      )
    t = mine[0]["target"]
    seq = 100 * t["sequential"]
    ax.axhline(
        seq,
        color="k",
        lw=0.8,
        label=f"sequential SGD's final error ({seq:.2f}%)",
    )
    ax.axhline(
        100 * t["ssgd"],
        color="C0",
        lw=0.8,
        linestyle=":",
        label=f"SSGD's final error ({100 * t['ssgd']:.2f}%)",
    )
    if (opt, schedule, m) == (opt_t, schedule_t, m_t):
      ax.axvline(
          t["sequential_time"] / need,
          color="gray",
          lw=0.8,
          linestyle="--",
          label=f"{need:g}x faster than sequential",
      )
    ax.set(
        xscale="log",
        ylim=(4, 14),
        xlabel="simulated time (log)",
        ylabel="test error (%)",
        title=f"{opt}, {schedule} M = {m}: {config.num_epochs} epochs",
    )
    ax.legend(fontsize=6)
  fig.savefig(path, dpi=110)


def main(argv):
  config, workdir = startup.setup(argv, compilation_cache=True)
  tuned_path = flags.FLAGS.tuned
  stats_path = flags.FLAGS.stats or os.path.join(
      os.path.dirname(tuned_path), "stats.json"
  )
  with open(tuned_path) as f:
    tuned = json.load(f)
  with open(stats_path) as f:
    stats = json.load(f)
  t0 = time.perf_counter()
  results = study(config, workdir, tuned, stats)
  print(verdict_text(config, results))
  logging.warning("study: %.0f s", time.perf_counter() - t0)


if __name__ == "__main__":
  startup.define_flags(workdir_help="Directory for the runs and the report.")
  flags.DEFINE_string(
      "tuned", DEFAULT_TUNED, "The quick tier's tuned.json (the settings)."
  )
  flags.DEFINE_string(
      "stats",
      None,
      "The quick tier's stats.json (the " "targets; default: beside --tuned).",
  )
  app.run(main)
