"""Trains one run (one algorithm, worker count, schedule and seed).

``train_and_evaluate(config, workdir)`` is importable from a notebook; the
command line is :mod:`experiments.main`. What it compiles is built by
:mod:`experiments.programs`, and shared between the runs of a study through
the ``cache`` it is passed; the data stream is
:mod:`experiments.input_pipeline`'s. A run is fully determined by its
config: the model's initialization, the data order, the augmentation and the
arrival schedule all derive from ``config.seed``, and the simulators are
bitwise deterministic, so rerunning gives the same numbers on the same
machine.

Per epoch the run replays that epoch's gradients through the simulator
(with no per-arrival Python), evaluates the test error, appends a line to
``workdir/metrics.jsonl`` and, every ``config.checkpoint_every_epochs``
epochs (never if 0), saves a checkpoint
(:class:`dcasgd_optax.extend.checkpoint.Checkpointer` under
``workdir/checkpoints``: the whole simulator state, i.e. params, optimizer
state with the per-worker backups, model states, step and last pulls, plus
the metrics history so far). Everything else a run needs (data order,
arrival schedule, augmentation keys) is recomputed from the config, so
rerunning with the same ``workdir`` resumes from the latest checkpoint and
ends with exactly the result of an uninterrupted run. The final summary is
``workdir/summary.json``; a ``workdir`` that holds one is finished, and
rerunning returns it without training. With ``config.diagnostics_every = k``
the simulator also compares every ``k``-th arrival's gradient (and the
algorithm's adjusted gradient) with the fresh one at the server's model
(:class:`dcasgd_optax.harness.Simulator`'s diagnostics) and the run writes
them to ``workdir/diagnostics.jsonl``.

In a multi-process program (a pod slice, several GPU nodes: docs/pod.md)
every process runs the same config on one simulator spanning all devices;
process 0 alone evaluates (every process gets its figures, so all keep the
same history) and writes the files above, and every process takes part in
the checkpoints, so ``workdir`` must be one that every host sees.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from dcasgd_optax.extend.checkpoint import Checkpointer
from experiments import algorithms
from experiments import data
from experiments import input_pipeline
from experiments import models
from experiments import optimizers
from experiments import pod
from experiments import programs
from experiments import run_files


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast, with the valid choices, on a config that cannot run."""
  algorithm = algorithms.get(config.algorithm)
  optimizers.check_optimizer(config.optimizer)
  if not algorithm.applies_to(config):
    raise ValueError(
        f"config.algorithm={config.algorithm!r} needs "
        f"{algorithm.requirement()}; got config.optimizer="
        f"{config.optimizer!r} with momentum {config.momentum}."
    )
  data.check_name(config.dataset)
  if config.model not in models.MODELS:
    raise ValueError(
        f"Unknown model {config.model!r}; valid choices: "
        f"{', '.join(models.MODELS)}."
    )
  if config.schedule not in input_pipeline.SCHEDULES:
    raise ValueError(
        f"Unknown schedule {config.schedule!r}; valid choices: "
        f"{', '.join(input_pipeline.SCHEDULES)}."
    )
  for name in ("num_workers", "batch_size", "num_epochs", "eval_batch_size",
               "checkpoint_every_epochs", "diagnostics_every"):
    value = config[name]
    low = 0 if name in ("checkpoint_every_epochs", "diagnostics_every") else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"config.{name} must be an int >= {low}, got {value!r}.")
  if not config.learning_rate > 0:
    raise ValueError(
        f"config.learning_rate must be > 0, got {config.learning_rate!r}."
    )


class _Run:
  """One run: its config's program, initial model, arrivals and keys."""

  def __init__(self, config: ml_collections.ConfigDict,
               program: programs.Program):
    self.config = config
    self.algorithm, self.num_workers = program.algorithm, program.num_workers
    self.ds, self.steps_per_epoch = program.ds, program.steps_per_epoch
    self.sim, self.evaluate = program.sim, program.evaluate
    self.stateful = program.stateful
    _, self.params, self.model_state = models.functional(
        programs.create_model(config, self.ds))
    self.rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    self.arrivals = input_pipeline.arrival_schedule(
        config, self.num_workers, config.num_epochs * self.steps_per_epoch,
        self.algorithm.arrival_schedule(config.schedule),
    )
    self.times = input_pipeline.arrival_times(
        config, self.num_workers, config.num_epochs * self.steps_per_epoch,
        synchronous=self.algorithm.synchronous)

  def init(self):
    ms = self.model_state if self.stateful else None
    state = self.sim.init(self.params, ms)
    return state._replace(
        opt_state=algorithms.set_injected(state.opt_state, self.config))

  def epoch_range(self, epoch: int) -> tuple[int, int]:
    return input_pipeline.epoch_range(
        self.algorithm.gradients_per_update(self.num_workers),
        self.steps_per_epoch, epoch,
    )

  def inputs(self, epoch: int) -> tuple[dict, np.ndarray]:
    """Epoch ``epoch``'s batches (``{'idx'}``, plus ``'key'`` with
    augmentation; gradient ``g``'s key is ``fold_in(rng, g)``) and arrivals."""
    start, stop = self.epoch_range(epoch)
    batches = input_pipeline.batches(
        self.ds, self.config.seed, self.config.batch_size, self.rng, start,
        stop)
    return batches, self.arrivals[start:stop]

  def epoch(self, state, epoch: int) -> tuple[Any, dict[str, np.ndarray]]:
    """Replays epoch ``epoch``; returns the new state and its per-arrival
    metrics (``loss``, ``staleness``, ``step`` ..., see ``Simulator.replay``).
    """
    start, stop = self.epoch_range(epoch)
    if stop == start:  # SSGD with more workers than gradients per epoch.
      return state, {
          "loss": np.zeros((0,)),
          "staleness": np.zeros((0,), np.int32),
      }
    state, metrics = self.sim.replay(state, *self.inputs(epoch))
    return state, {k: np.asarray(v) for k, v in metrics.items()}

  def record(self, state, epoch: int, metrics: dict, seconds: float) -> dict:
    model_state = state.model_state if self.stateful else {}
    error, test_loss = pod.evaluate_on_writer(self.evaluate, state.params,
                                              model_state)
    loss, staleness = metrics["loss"], metrics["staleness"]
    stop = self.epoch_range(epoch)[1]
    return {
        "epoch": epoch + 1,
        "updates": int(state.step),
        "gradients": stop,
        # The simulated clock when the epoch's last gradient landed.
        "time": float(self.times[stop - 1]) if stop else 0.0,
        "train_loss": float(np.mean(loss)) if loss.size else float("nan"),
        "test_error": float(error),
        "test_loss": float(test_loss),
        "staleness_sum": int(np.sum(staleness)),
        "staleness_max": int(np.max(staleness, initial=0)),
        "arrivals": int(staleness.size),
        "seconds": seconds,
    }


def summarize(config: Any, history: list[dict]) -> dict[str, Any]:
  """The run's row of ``results.csv``."""
  algorithm = algorithms.get(config.algorithm)
  arrivals = sum(h["arrivals"] for h in history)
  return {
      "algorithm": config.algorithm,
      "workers": algorithm.effective_workers(config.num_workers),
      "schedule": algorithm.schedule_label(config.schedule),
      "seed": config.seed,
      "final_test_error": history[-1]["test_error"],
      "best_test_error": min(h["test_error"] for h in history),
      "wall_time": sum(h["seconds"] for h in history),
      "mean_staleness": sum(h["staleness_sum"] for h in history)
      / max(arrivals, 1),
      "epochs": len(history),
  }


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *,
    cache: programs.ProgramCache | None = None,
) -> dict:
  """Trains and evaluates one run, resuming from ``workdir`` if it holds one.

  Args:
    config: the run's hyperparameters (see ``experiments/configs/default.py``).
    workdir: where metrics, checkpoints and the summary go.
    cache: the programs and datasets shared with other runs of a study
      (:class:`experiments.programs.ProgramCache`); ``None``: build them
      for this run alone.

  Returns:
    The summary (also written to ``workdir/summary.json``): algorithm,
    workers, schedule, seed, final and best test error, wall time (seconds
    spent replaying gradients, compilation included, evaluation excluded,
    summed over resumed sessions), mean staleness, epochs.
  """
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  if pod.is_writer():
    run_files.check_same_config(config, workdir)
  summary = run_files.read_summary(workdir)
  if summary is not None:  # Finished earlier: nothing to do.
    return summary
  cache = programs.ProgramCache() if cache is None else cache
  run = _Run(config, cache.program(config))
  if config.checkpoint_every_epochs:
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
      history = _train(run, workdir, ckpt)
  else:
    history = _train(run, workdir, None)
  summary = summarize(config, history)
  if pod.is_writer():
    run_files.write_summary(workdir, summary)
  return summary


def _train(run: _Run, workdir: str, ckpt: Checkpointer | None) -> list[dict]:
  """Trains ``run`` from its latest checkpoint (if any) to the last epoch."""
  config = run.config
  state, history = _restore(ckpt, run.init())
  writer = pod.is_writer()  # the other processes of a pod write nothing
  if writer:
    run_files.write_metrics(workdir, history)
    run_files.keep_diagnostics(workdir, len(history))
  desc = f"{config.algorithm} M={run.num_workers} seed={config.seed}"
  bar = tqdm.tqdm(total=config.num_epochs, initial=len(history), desc=desc,
                  unit="epoch", disable=not (config.progress_bar and writer),
                  leave=False)
  for epoch in range(len(history), config.num_epochs):
    t0 = time.perf_counter()
    state, metrics = run.epoch(state, epoch)
    jax.block_until_ready(state)
    record = run.record(state, epoch, metrics, time.perf_counter() - t0)
    history.append(record)
    if config.diagnostics_every and writer:
      run_files.append_diagnostics(workdir, epoch + 1, metrics)
    done = epoch + 1 == config.num_epochs
    if ckpt and (done or (epoch + 1) % config.checkpoint_every_epochs == 0):
      ckpt.save(epoch + 1, state, metadata={"epochs": history})
    if writer:
      run_files.append_metrics(workdir, record)
    bar.set_postfix(test_error=f"{record['test_error']:.4f}", refresh=False)
    bar.update(1)
    logging.info("%s epoch %d: %s", desc, epoch + 1, record)
  bar.close()
  return history


def _restore(
    ckpt: Checkpointer | None, fresh_state: Any
) -> tuple[Any, list[dict]]:
  """The latest checkpoint's ``(state, history)``, or ``(fresh_state, [])``."""
  restored = ckpt.restore_latest(fresh_state) if ckpt else None
  if restored is None:
    return fresh_state, []
  history = restored.metadata["epochs"]
  if len(history) != restored.step:
    raise ValueError(
        f"Checkpoint {restored.step} in {ckpt.directory} holds "
        f"{len(history)} epochs of metrics."
    )
  return restored.tree, history
