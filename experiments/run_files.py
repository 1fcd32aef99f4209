"""A run's files besides its checkpoints: its saved config, per-epoch metrics.

``workdir/config.json`` holds the fields of the config that change a run's
result, so that resuming with a different config fails loudly;
``workdir/metrics.jsonl`` holds one JSON line per finished epoch, and
``workdir/summary.json`` the result of a finished run. The
checkpoints (``workdir/checkpoints``, see :mod:`dcasgd_optax.extend.checkpoint`)
are written by :mod:`experiments.train`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

# Config fields that do not change a run's result, so may differ on resume:
# bookkeeping, and the sweep-level fields a run does not read (the grids,
# the tuning grid, the report's settings, the optimizer presets).
_NOT_RESULT = (
    "progress_bar",
    "data_dir",
    "download",
    "checkpoint_every_epochs",
    "diagnostics_every",
    "grid",
    "tuning",
    "report",
    "optimizer_presets",
)


def _result_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  d = json.loads(config.to_json())
  return {k: v for k, v in d.items() if k not in _NOT_RESULT}


def check_same_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Saves the config, or checks it against the one a resumed run was given.

  Raises:
    ValueError: if ``workdir`` holds a run whose result-changing fields
      differ from ``config``'s.
  """
  path = os.path.join(workdir, "config.json")
  fields = _result_fields(config)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = sorted(
        k for k in set(old) | set(fields) if old.get(k) != fields.get(k)
    )
    if diff:
      raise ValueError(
          f"{workdir} holds a run with a different config (fields: "
          f"{', '.join(diff)}); use another --workdir or delete it."
      )
  with open(path, "w") as f:
    json.dump(fields, f, indent=2, sort_keys=True)


def write_metrics(workdir: str, history: list[dict]) -> None:
  """(Re)writes ``metrics.jsonl`` with one JSON line per finished epoch."""
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for record in history:
      f.write(json.dumps(record) + "\n")


def append_metrics(workdir: str, record: dict) -> None:
  """Appends one epoch's record to ``metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")


def read_metrics(workdir: str) -> list[dict]:
  """The per-epoch records of ``workdir/metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_summary(workdir: str, summary: dict) -> None:
  """Writes ``summary.json``: the run is finished."""
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)


def read_summary(workdir: str) -> dict | None:
  """The finished run's ``summary.json``, or ``None`` if it is not finished."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


DIAGNOSTICS = ("staleness", "step", "stale_cosine", "applied_cosine",
               "stale_error", "applied_error")
"""The per-arrival fields ``diagnostics.jsonl`` keeps, for sampled arrivals."""


def append_diagnostics(workdir: str, epoch: int, metrics: dict) -> None:
  """Appends epoch ``epoch``'s sampled arrivals (those not NaN) as one line."""
  sampled = ~np.isnan(metrics["stale_cosine"])
  line = {"epoch": epoch,
          **{k: np.asarray(metrics[k])[sampled].tolist() for k in DIAGNOSTICS}}
  with open(os.path.join(workdir, "diagnostics.jsonl"), "a") as f:
    f.write(json.dumps(line) + "\n")


def keep_diagnostics(workdir: str, epochs: int) -> None:
  """Drops the diagnostics of epochs after ``epochs`` (a resumed run's)."""
  path = os.path.join(workdir, "diagnostics.jsonl")
  if not os.path.exists(path):
    return
  lines = [r for r in read_diagnostics(workdir) if r["epoch"] <= epochs]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in lines)


def read_diagnostics(workdir: str) -> list[dict]:
  """The lines of ``diagnostics.jsonl``, one per epoch."""
  with open(os.path.join(workdir, "diagnostics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
