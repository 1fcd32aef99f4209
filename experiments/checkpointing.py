"""Checkpoints, per-epoch metrics files and the run's saved config.

A checkpoint (orbax ``CheckpointManager`` under ``workdir/checkpoints``) is
taken at the end of an epoch and holds the whole simulator state (params,
optimizer state with the per-worker backups, model states, step and last
pulls) plus the metrics history so far. Everything else a run needs (data
order, arrival schedule, augmentation keys) is recomputed from the config,
so resuming from the checkpoint of epoch ``e`` continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

# Config fields that do not change a run's result, so may differ on resume.
_NOT_RESULT = ("progress_bar", "data_dir", "download", "checkpoint_every_epochs", "grid")


class Checkpointer:
  """Saves and restores ``(state, history)`` once per epoch.

  Args:
    workdir: the run's directory.
    every_epochs: save every this many epochs (and always after the last).
  """

  def __init__(self, workdir: str, every_epochs: int):
    self.every_epochs = every_epochs
    self._manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=2, enable_async_checkpointing=False
        ),
    )

  def restore_latest(self, state: Any) -> tuple[Any, list[dict]]:
    """The latest saved ``(state, history)``, or ``(state, [])`` if none.

    Args:
      state: a freshly initialized state, the target of the restore (its
        structure, shapes, dtypes and shardings).
    """
    step = self._manager.latest_step()
    if step is None:
      return state, []
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state),
            history=ocp.args.JsonRestore(),
        ),
    )
    history = restored.history["epochs"]
    if len(history) != step:
      raise ValueError(f"Checkpoint {step} holds {len(history)} epochs of metrics.")
    return restored.state, history

  def save(self, epoch: int, state: Any, history: list[dict], *, final: bool) -> None:
    """Saves after ``epoch`` epochs if it is due (every ``every_epochs``)."""
    if not final and epoch % self.every_epochs:
      return
    self._manager.save(
        epoch,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            history=ocp.args.JsonSave({"epochs": history}),
        ),
    )

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


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
    diff = sorted(k for k in set(old) | set(fields) if old.get(k) != fields.get(k))
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
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")


def read_metrics(workdir: str) -> list[dict]:
  """The per-epoch records of ``workdir/metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
