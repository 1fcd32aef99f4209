r"""The evidence grid: every method tuned on its own seeds, reported on others.

Example::

  python -m experiments.methods --config=experiments/configs/methods.py \
      --workdir=runs/methods --stage=tune     # the sweep: writes tuned.json
  python -m experiments.methods --config=experiments/configs/methods.py \
      --workdir=runs/methods --stage=report   # reported seeds: table, plots

A *cell* is one optimizer preset (``config.grid.optimizers``), arrival
schedule, worker count and algorithm; sequential SGD has one cell per
optimizer. Every run trains through :func:`experiments.train.
train_and_evaluate` in ``WORKDIR/runs/<cell>-<hyperparameters>-seed<seed>``,
so an interrupted sweep resumes where it stopped.

**Tuning** (:func:`tune`): every cell of an optimizer tries the same
learning rates, ``config.tuning.learning_rates[optimizer]``, with the same
training budget (``config.num_epochs``). An algorithm with a second tuned
field (``Algorithm.tuned``: DC-ASGD-c's λ, ``dc-asgd-a-tuned``'s λ0) tries
every learning rate with every value of it (``config.tuning.<field>``), so
it gets that many times the trials; the report says so. The setting with the
lowest mean final test error over ``config.tuning.seeds`` wins (the first in
grid order on a tie). The chosen settings go to ``WORKDIR/tuned.json``.

**Reporting** (:func:`report`): each cell runs its chosen setting on
``config.grid.seeds``, which are disjoint from the tuning seeds, and
:func:`write_report` writes ``results.csv``, ``table.md`` (the
targets, final test error, mean ± std, and the share of ASGD's gap to
sequential SGD each method closes, the early-training remedies against
DC-ASGD-a, where ASGD's gap comes from), ``tuned.md`` (the settings) and the
plots. Cells of ``config.grid.skip`` are left out of both stages.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from typing import NamedTuple

from absl import app
from absl import flags
from absl import logging
import ml_collections

from experiments import algorithms
from experiments import plots
from experiments import pod
from experiments import programs
from experiments import run_files
from experiments import startup
from experiments import statistics
from experiments import tables
from experiments import train

STAGES = ("tune", "report", "all")


class Cell(NamedTuple):
  """One optimizer preset, schedule, worker count and algorithm."""

  optimizer: str
  schedule: str
  num_workers: int
  algorithm: str

  @property
  def key(self) -> str:
    """A name for files: ``sgd-cyclic-M16-asgd``, or ``sgd-sequential``."""
    if algorithms.get(self.algorithm).single_worker:
      return f"{self.optimizer}-{self.algorithm}"
    return (
        f"{self.optimizer}-{self.schedule}-M{self.num_workers}-{self.algorithm}"
    )


def cell_config(
    config: ml_collections.ConfigDict, cell: Cell, seed: int,
    setting: dict[str, float],
) -> ml_collections.ConfigDict:
  """The run config of ``cell`` with hyperparameters ``setting``."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.update(config.optimizer_presets[cell.optimizer].to_dict())
  c.algorithm, c.schedule = cell.algorithm, cell.schedule
  c.num_workers, c.seed = cell.num_workers, seed
  c.update(setting)
  return c


def cells(config: ml_collections.ConfigDict) -> list[Cell]:
  """Every cell of the grid whose algorithm applies to its optimizer, but
  those of ``config.grid.skip``: ``(optimizer, algorithm)`` leaves out all
  of that pair's cells, ``(optimizer, algorithm, M)`` those with M workers.

  The columns of an optimizer are :func:`columns`."""
  skip = {tuple(pair) for pair in config.grid.get("skip", ())}
  out = []
  for opt in config.grid.optimizers:
    preset = cell_config(
        config, Cell(opt, "cyclic", 1, algorithms.SEQUENTIAL.name), 0, {})
    for a in algorithms.ordered(config.grid.algorithms):
      if not a.applies_to(preset) or (opt, a.name) in skip:
        continue
      if a.single_worker:
        out.append(Cell(opt, "cyclic", 1, a.name))
        continue
      for schedule, m in columns(config, opt):
        if (opt, a.name, m) not in skip:
          out.append(Cell(opt, schedule, m, a.name))
  return out


def columns(config: ml_collections.ConfigDict,
            optimizer: str) -> list[tuple[str, int]]:
  """The ``(schedule, M)`` columns of ``optimizer``: its own list in
  ``config.grid.columns`` if there is one, else ``grid.num_workers`` x
  ``grid.schedules`` (schedules innermost: their runs share one compiled
  program), then the ``grid.scenarios`` not among them."""
  own = config.grid.get("columns", None)
  if own is not None and optimizer in own:
    return [(str(s), int(m)) for s, m in own[optimizer]]
  pairs = [(schedule, m) for m, schedule in itertools.product(
      sorted(config.grid.num_workers), config.grid.schedules)]
  pairs += [(str(s), int(m)) for s, m in config.grid.get("scenarios", ())
            if (s, m) not in pairs]
  return pairs


def candidates(config: ml_collections.ConfigDict, cell: Cell) -> list[dict]:
  """The settings ``cell`` tries: every learning rate of its optimizer
  (``config.tuning.learning_rates``), times every value of the fields the
  algorithm tunes besides it (``Algorithm.tuned``, values from
  ``config.tuning``)."""
  rates = config.tuning.learning_rates[cell.optimizer]
  extra = algorithms.get(cell.algorithm).tuned
  grids = [config.tuning[f] for f in extra]
  return [
      {"learning_rate": lr, **dict(zip(extra, values))}
      for lr, *values in itertools.product(rates, *grids)
  ]


def setting_name(setting: dict[str, float]) -> str:
  return "-".join(f"{k}{v:g}" for k, v in sorted(setting.items()))


def run(config, workdir: str, cell: Cell, seed: int, setting: dict, *,
        cache: programs.ProgramCache | None = None) -> dict:
  """One run (resumed if its directory holds one); returns its row: the
  summary, the cell, the setting and its :func:`curve`.

  ``cache``: the programs shared with the study's other runs (``None``:
  built for this run alone).
  """
  c = cell_config(config, cell, seed, setting)
  name = f"{cell.key}-{setting_name(setting)}-seed{seed}"
  rundir = os.path.join(workdir, "runs", name)
  summary = train.train_and_evaluate(c, rundir, cache=cache)
  return {**summary, **cell._asdict(), **setting, "curve": curve(rundir)}


def curve(rundir: str) -> dict[str, list]:
  """A finished run's per-epoch ``test_error``, ``time`` (the simulated
  clock, :func:`experiments.input_pipeline.arrival_times`; NaN for a run
  written before the clock was recorded) and ``gradients``."""
  records = run_files.read_metrics(rundir)
  return {
      "test_error": [r["test_error"] for r in records],
      "time": [r.get("time", math.nan) for r in records],
      "gradients": [r["gradients"] for r in records],
  }


def _error(summary: dict) -> float:
  """Final test error; a diverged run (NaN) counts as chance or worse."""
  e = summary["final_test_error"]
  return 1.0 if math.isnan(e) else e


def tune(config: ml_collections.ConfigDict, workdir: str, *,
         cache: programs.ProgramCache | None = None) -> dict[str, dict]:
  """Runs every candidate on the tuning seeds; writes and returns the choice.

  ``cache``: the programs its runs share (``None``: a new one).

  Returns:
    ``cell key -> {"setting": ..., "tuning_error": mean final test error,
    "tried": [(setting, mean error), ...]}``, also written to
    ``WORKDIR/tuned.json``.
  """
  cache = programs.ProgramCache() if cache is None else cache
  chosen = {}
  for cell in cells(config):
    t0 = time.perf_counter()
    tried = []
    for setting in candidates(config, cell):
      errors = [_error(run(config, workdir, cell, s, setting, cache=cache))
                for s in config.tuning.seeds]
      tried.append((setting, sum(errors) / len(errors)))
    best = min(tried, key=lambda t: t[1])  # the first on a tie
    chosen[cell.key] = {"setting": best[0], "tuning_error": best[1],
                        "tried": tried}
    logging.warning("%s: %s (%.4f) in %.0f s", cell.key, best[0], best[1],
                    time.perf_counter() - t0)
  _write_tuned(workdir, chosen)
  return chosen


def _write_tuned(workdir: str, tuned: dict) -> None:
  """``tuned`` as ``workdir``'s ``tuned.json`` (on a pod, process 0 writes:
  docs/pod.md)."""
  if pod.is_writer():
    with open(os.path.join(workdir, "tuned.json"), "w") as f:
      json.dump(tuned, f, indent=1)


def report(
    config: ml_collections.ConfigDict, workdir: str, tuned: dict[str, dict],
    *, cache: programs.ProgramCache | None = None,
) -> list[dict]:
  """Runs every cell's chosen setting on the reported seeds, then reports.

  Also reruns the cells of ``config.report.diagnostics`` (one seed) with the
  simulator's diagnostics, for the diagnostics plot.

  Args:
    config: the grid.
    workdir: where the runs and the report go.
    tuned: :func:`tune`'s result (cell key -> chosen setting).
    cache: the programs its runs share (``None``: a new one).

  Returns:
    One row per run (the run's summary, its cell and its setting).
  """
  overlap = set(config.grid.seeds) & set(config.tuning.seeds)
  if overlap:
    raise ValueError(
        f"config.grid.seeds and config.tuning.seeds share {sorted(overlap)}: "
        "reported seeds must not be tuned on."
    )
  todo = cells(config)
  missing = [c.key for c in todo if c.key not in tuned]
  if missing:
    raise ValueError(
        f"No tuned setting for {missing[:3]}...; run --stage=tune."
    )
  cache = programs.ProgramCache() if cache is None else cache
  rows = []
  for cell in todo:
    setting = tuned[cell.key]["setting"]
    rows += [run(config, workdir, cell, s, setting, cache=cache)
             for s in config.grid.seeds]
  traces = diagnose(config, workdir, tuned, cache=cache)
  if pod.is_writer():
    print(write_report(config, rows, workdir, traces,
                       rate_gap(config, tuned)))
  return rows


def rate_gap(
    config: ml_collections.ConfigDict, tuned: dict[str, dict]
) -> list[dict]:
  """How much of ASGD's gap is its smaller learning rate, on the tuning seeds.

  Returns:
    Per optimizer, schedule and M: sequential SGD's tuning error at its own
    best rate (``sequential``) and at ASGD's chosen rate
    (``sequential_at_asgd_rate``), ASGD's (``asgd``) and that rate.
  """
  out = []
  for cell in cells(config):
    if cell.algorithm != algorithms.ASGD.name:
      continue
    seq = tuned[
        Cell(cell.optimizer, "cyclic", 1, algorithms.SEQUENTIAL.name).key
    ]
    asgd = tuned[cell.key]
    lr = asgd["setting"]["learning_rate"]
    at_lr = [e for s, e in seq["tried"] if s["learning_rate"] == lr]
    out.append(dict(
        optimizer=cell.optimizer, schedule=cell.schedule,
        num_workers=cell.num_workers, learning_rate=lr,
        sequential=seq["tuning_error"], asgd=asgd["tuning_error"],
        sequential_at_asgd_rate=at_lr[0] if at_lr else math.nan))
  return out


def diagnose(
    config: ml_collections.ConfigDict, workdir: str, tuned: dict[str, dict],
    *, cache: programs.ProgramCache | None = None,
) -> dict[tuple[str, str], dict]:
  """Reruns the cells of ``config.report.diagnostics`` with diagnostics.

  ``cache``: the programs its runs share (``None``: a new one).

  Returns:
    ``(optimizer, algorithm) -> {field: list}``: the sampled arrivals'
    staleness, step and diagnostics (:data:`run_files.DIAGNOSTICS`).
  """
  cache = programs.ProgramCache() if cache is None else cache
  d = config.report.diagnostics
  traces = {}
  for cell in cells(config):
    if (cell.optimizer not in d.optimizers or cell.schedule != d.schedule
        or cell.num_workers != d.num_workers
        or cell.algorithm not in d.algorithms):
      continue
    c = cell_config(config, cell, d.seed, tuned[cell.key]["setting"])
    c.diagnostics_every = d.every
    rundir = os.path.join(workdir, "diagnostics", cell.key)
    train.train_and_evaluate(c, rundir, cache=cache)
    if not pod.is_writer():  # only process 0 wrote them, and reports
      continue
    lines = run_files.read_diagnostics(rundir)
    traces[(cell.optimizer, cell.algorithm)] = {
        k: [v for line in lines for v in line[k]] for k in run_files.DIAGNOSTICS
    }
  return traces


def write_report(config: ml_collections.ConfigDict, rows: list[dict],
                 workdir: str, traces: dict | None = None,
                 rate_gap_items: list[dict] = ()) -> str:
  """Writes results.csv, stats.json, table.md (the targets, one table per
  optimizer, the remedies against DC-ASGD-a, where ASGD's gap comes from),
  tuned.md (the settings) and the plots gap_closed.png, errors.png (and
  diagnostics.png from ``traces``); returns table.md's text."""
  tables.write_methods_csv(rows, os.path.join(workdir, "results.csv"))
  stats = statistics.cell_stats(rows, min_gap=config.report.min_gap)
  seeds = ", ".join(map(str, config.grid.seeds))
  r = config.report
  baseline = algorithms.get(r.remedy_baseline).label
  parts = (["**Targets: the share of ASGD's gap to sequential SGD one "
            "method must close**\n\n" + tables.targets_table(stats, r.targets)]
           if r.targets else [])
  parts += [
      tables.methods_table(
          stats, opt, f"{opt}: final test error (%), mean ± std over seeds "
          f"{seeds} (share of ASGD's gap closed)")
      for opt in config.grid.optimizers
  ]
  if r.remedies:
    parts.append(f"**The early-training remedies against {baseline}** (hurts: "
                 "worse by more than the larger standard deviation)\n\n"
                 + tables.remedy_summary(stats, r.remedy_baseline, r.remedies))
  parts += [f"**{algorithms.get(v).label} against {baseline}**\n\n"
            + tables.paired_table(stats, r.remedy_baseline, v)
            for v in r.remedies]
  parts.append("**Resolution: paired differences from ASGD**\n\n"
               + tables.resolution_summary(stats))
  for opt in config.grid.optimizers:
    parts.append(tables.paired_ci_table(
        stats, opt, algorithms.ASGD.name,
        f"{opt}: final error minus ASGD's on the same seeds (points), "
        f"{100 * statistics.CONFIDENCE:.0f}% t-interval; n.s.: not resolved"))
    parts.append(tables.paired_ci_table(
        stats, opt, statistics.SSGD,
        f"{opt}: final error minus SSGD's on the same seeds (points), "
        f"{100 * statistics.CONFIDENCE:.0f}% t-interval (share of ASGD's gap "
        "to SSGD closed)"))
    parts.append(tables.time_table(
        stats, opt,
        f"{opt}: time to accuracy: simulated time (gradients, seeds that "
        "get there) to reach sequential SGD's final error / SSGD's / "
        "speed-up over sequential SGD (median over seeds; one unit = one "
        "gradient's mean compute time; evaluated once per epoch)"))
  if rate_gap_items:
    tuning_seeds = ", ".join(map(str, config.tuning.seeds))
    parts.append("**Where ASGD's gap comes from** (mean final test error (%) "
                 f"over the tuning seeds {tuning_seeds})\n\n"
                 + tables.rate_gap_table(rate_gap_items))
  text = "\n".join(parts)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(text)
  with open(os.path.join(workdir, "tuned.md"), "w") as f:
    f.write("\n".join(tables.tuned_table(rows, opt)
                      for opt in config.grid.optimizers))
  with open(os.path.join(workdir, "stats.json"), "w") as f:
    json.dump(stats, f, indent=1)
  title = f"{config.num_epochs} epochs, tuned learning rates, seeds {seeds}"
  order = config.grid.optimizers
  plots.plot_gap_closed(stats, os.path.join(workdir, "gap_closed.png"),
                        title=title, optimizers=order)
  plots.plot_methods_errors(stats, os.path.join(workdir, "errors.png"),
                            title=title, optimizers=order)
  if traces:
    d = config.report.diagnostics
    plots.plot_diagnostics(traces, os.path.join(workdir, "diagnostics.png"),
                           title=f"{d.schedule} arrivals, M = {d.num_workers}, "
                           f"seed {d.seed}, every {d.every}th arrival")
  return text


def main(argv):
  # The runs of a cell differ only in injected hyperparameters and seeds, so
  # they compile to the same programs: a persistent cache compiles them once.
  config, workdir = startup.setup(argv, compilation_cache=True)
  stage = flags.FLAGS.stage
  os.makedirs(workdir, exist_ok=True)
  cache = programs.ProgramCache()
  if stage in ("tune", "all"):
    tuned = tune(config, workdir, cache=cache)
  else:
    own = os.path.join(workdir, "tuned.json")
    given = flags.FLAGS.tuned
    with open(given or own) as f:
      tuned = json.load(f)
    if given and not (os.path.exists(own) and os.path.samefile(given, own)):
      # The settings this report uses, beside its tables (choose.py reads
      # both): replaces what an earlier --tuned left there.
      _write_tuned(workdir, tuned)
  if stage in ("report", "all"):
    report(config, workdir, tuned, cache=cache)


if __name__ == "__main__":
  # Flags are defined only when run as a program (see experiments.startup).
  startup.define_flags(workdir_help="Directory for all runs and the report.")
  flags.DEFINE_enum("stage", "all", STAGES, "tune, report, or both.")
  flags.DEFINE_string(
      "tuned", None, "tuned.json to report (default WORKDIR's)."
  )
  app.run(main)
