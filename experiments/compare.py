r"""Runs the comparison grid (algorithms x worker counts x seeds), reports it.

Example::

  python -m experiments.compare --config=experiments/configs/demo.py \
      --workdir=runs/demo

Each run trains in ``WORKDIR/runs/<algorithm>-M<workers>-seed<seed>/`` (so
an interrupted comparison resumes where it stopped: finished runs are
restored, not retrained). Sequential SGD runs once per seed, with one worker.
Then it writes, in ``WORKDIR``:

* ``results.csv``: one row per run (algorithm, workers, schedule, seed, final
  and best test error, wall time, mean staleness, epochs);
* ``metrics.jsonl``: every run's per-epoch metrics, one JSON object a line;
* ``table.md``: the paper's table (test error, mean ± std over seeds), also
  printed;
* ``error_vs_epoch.png``, ``error_vs_workers.png``, ``staleness_hist.png``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import app
import ml_collections
import numpy as np
import tqdm

from dcasgd_optax.harness import schedules
from experiments import algorithms
from experiments import input_pipeline
from experiments import plots
from experiments import pod
from experiments import programs
from experiments import run_files
from experiments import startup
from experiments import tables
from experiments import train


def run_configs(
    config: ml_collections.ConfigDict,
) -> list[ml_collections.ConfigDict]:
  """One config per run of ``config.grid``, all validated before any runs."""
  grid = config.grid
  chosen = [algorithms.get(a) for a in grid.algorithms]
  configs = []
  for m in sorted(grid.num_workers):
    for a in chosen:
      if a.single_worker and m != min(grid.num_workers):
        continue  # It runs once per seed.
      for seed in grid.seeds:
        c = ml_collections.ConfigDict(config.to_dict())
        c.algorithm, c.seed = a.name, seed
        c.num_workers = a.effective_workers(m)
        train.validate(c)
        configs.append(c)
  return configs


def run_dir(workdir: str, c: Any) -> str:
  return os.path.join(
      workdir, "runs", f"{c.algorithm}-M{c.num_workers}-seed{c.seed}"
  )


def schedule_staleness(
    config: Any, num_workers: int, num_train: int
) -> np.ndarray:
  """Staleness of every arrival of a whole run of ``config``'s schedule, on
  ``num_train`` training examples."""
  total = config.num_epochs * input_pipeline.steps_per_epoch(
      num_train, config.batch_size)
  arrivals = input_pipeline.arrival_schedule(config, num_workers, total)
  return schedules.staleness(arrivals, num_workers)


def report(config: Any, workdir: str, rows: list[dict], dirs: list[str], *,
           cache: programs.ProgramCache | None = None) -> str:
  """Writes results.csv, metrics.jsonl, table.md and the plots; returns the
  table. ``cache``: where the runs' dataset is (``None``: loads it)."""
  tables.write_csv(rows, os.path.join(workdir, "results.csv"))
  histories: dict[tuple[str, int], list] = {}
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for row, d in zip(rows, dirs):
      history = run_files.read_metrics(d)
      histories.setdefault((row["algorithm"], row["workers"]), []).append(
          history
      )
      for record in history:
        keys = ("algorithm", "workers", "schedule", "seed")
        f.write(json.dumps({**{k: row[k] for k in keys}, **record}) + "\n")
  title = (f"{config.dataset}, {config.model}, {config.schedule} arrivals, "
           f"{len(config.grid.seeds)} seed(s)")
  table = tables.markdown_table(rows)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(f"## {title}\n\n{table}")
  plots.plot_error_vs_epoch(
      histories, os.path.join(workdir, "error_vs_epoch.png"), title=title)
  plots.plot_error_vs_workers(
      rows, os.path.join(workdir, "error_vs_workers.png"), title=title)
  ds = (programs.ProgramCache() if cache is None else cache).dataset(config)
  staleness = {m: schedule_staleness(config, m, len(ds.train_labels))
               for m in sorted(config.grid.num_workers)}
  plots.plot_staleness(staleness, os.path.join(workdir, "staleness_hist.png"),
                           title=f"{config.schedule} arrivals")
  return table


def compare(
    config: ml_collections.ConfigDict, workdir: str, *,
    cache: programs.ProgramCache | None = None,
) -> list[dict]:
  """Trains every run of the grid (resuming finished ones) and reports.

  ``cache``: the programs its runs share (``None``: a new one).

  Returns:
    The rows of ``results.csv``.
  """
  configs = run_configs(config)
  dirs = [run_dir(workdir, c) for c in configs]
  cache = programs.ProgramCache() if cache is None else cache
  rows = []
  for c, d in tqdm.tqdm(list(zip(configs, dirs)), desc="runs", unit="run",
                        disable=not config.progress_bar):
    rows.append(train.train_and_evaluate(c, d, cache=cache))
  if pod.is_writer():  # on a pod, process 0 reports (docs/pod.md)
    print(report(config, workdir, rows, dirs, cache=cache))
  return rows


def main(argv):
  config, workdir = startup.setup(argv, compilation_cache=True)
  compare(config, workdir)


if __name__ == "__main__":
  startup.define_flags(workdir_help="Directory for all runs and the report.")
  app.run(main)
