"""Trains one run (one algorithm, worker count, schedule and seed).

``train_and_evaluate(config, workdir)`` is importable from a notebook; the
command line is :mod:`experiments.main`. A run is fully determined by its
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
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging

from dcasgd_optax.extend.checkpoint import Checkpointer
from dcasgd_optax.harness import schedules
from experiments import algorithms
from experiments import data
from experiments import models
from experiments import run_files

SCHEDULES = ("cyclic", "shuffled", "gamma")


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast, with the valid choices, on a config that cannot run."""
  algorithm = algorithms.get(config.algorithm)
  algorithms.check_optimizer(config.optimizer)
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
  if config.schedule not in SCHEDULES:
    raise ValueError(
        f"Unknown schedule {config.schedule!r}; valid choices: "
        f"{', '.join(SCHEDULES)}."
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


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Minibatch gradients per epoch, ``S = num_examples // batch_size``."""
  if batch_size > num_examples:
    raise ValueError(
        f"config.batch_size={batch_size} exceeds the {num_examples} training "
        "examples."
    )
  return num_examples // batch_size


def gradient_indices(
    seed: int, num_examples: int, batch_size: int, start: int, stop: int
) -> np.ndarray:
  """Example indices of gradients ``start .. stop - 1`` of the data stream.

  Gradient ``g`` belongs to epoch ``g // S``; each epoch is a fresh random
  permutation of the training set (``np.random.default_rng([seed, epoch])``,
  the last ``num_examples % batch_size`` examples dropped), cut into ``S``
  minibatches. Every algorithm consumes this same stream.

  Returns:
    int32 ``[stop - start, batch_size]``.
  """
  s = num_examples // batch_size
  rows = []
  for epoch in range(start // s, (stop - 1) // s + 1):
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    rows.append(perm[: s * batch_size].reshape(s, batch_size))
  first = (start // s) * s
  return np.concatenate(rows)[start - first : stop - first].astype(np.int32)


def arrival_schedule(
    config: Any, num_workers: int, num_arrivals: int,
    schedule: str | None = None,
) -> np.ndarray:
  """The whole run's order of arrivals (worker ids), from ``config.seed``.

  ``schedule`` (default ``config.schedule``): ``cyclic``, ``shuffled`` or
  ``gamma``.
  """
  schedule = schedule or config.schedule
  seed = int(np.random.SeedSequence([config.seed, 2]).generate_state(1)[0])
  if schedule == "cyclic":
    return schedules.cyclic(num_workers, num_arrivals)
  if schedule == "shuffled":
    rounds = -(-num_arrivals // num_workers)
    return schedules.shuffled_rounds(num_workers, rounds, seed)[:num_arrivals]
  return schedules.gamma_speeds(
      num_workers, num_arrivals, seed, shape=config.gamma_shape
  )


def epoch_range(
    gradients_per_update: int, steps_per_epoch: int, epoch: int
) -> tuple[int, int]:
  """Gradients ``[start, stop)`` of the stream that epoch ``epoch`` applies.

  With ``G`` gradients per server update (1 for asynchronous and sequential
  runs, ``M`` for SSGD) an epoch applies whole updates: those of gradients
  ``floor(e S / G) G .. floor((e+1) S / G) G - 1``, i.e. ``[e S, (e+1) S)``
  when ``G = 1``.
  """
  g, s = gradients_per_update, steps_per_epoch
  return (epoch * s // g) * g, ((epoch + 1) * s // g) * g


def make_loss(apply, ds: data.Dataset):
  """``loss(params, model_state, batch) -> (loss, model_state)`` on device data.

  ``batch`` is ``{'idx': int32 [B]}``: the minibatch's example indices, plus
  ``'key'``, its augmentation key, when ``ds.augment``.
  """
  images = jnp.asarray(ds.train_images)
  labels = jnp.asarray(ds.train_labels)

  def loss_fn(params, model_state, batch):
    x_BxHxWxC = images[batch["idx"]]
    if ds.augment:
      x_BxHxWxC = data.crop_and_flip(batch["key"], x_BxHxWxC)
    logits, model_state = apply(params, model_state, x_BxHxWxC, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels[batch["idx"]]
    )
    return jnp.mean(loss), model_state

  return loss_fn


def make_evaluate(apply, ds: data.Dataset, batch_size: int):
  """A jitted ``evaluate(params, model_state) -> (error, loss)`` on the test set."""
  n = len(ds.test_labels)
  pad = -n % batch_size
  x = np.concatenate([ds.test_images, np.zeros((pad, *ds.image_shape), np.float32)])
  y = np.concatenate([ds.test_labels, np.zeros((pad,), np.int32)])
  mask = np.arange(n + pad) < n
  nb = (n + pad) // batch_size
  x_NBxBxHxWxC = jnp.asarray(x.reshape(nb, batch_size, *ds.image_shape))
  y_NBxB = jnp.asarray(y.reshape(nb, batch_size))
  mask_NBxB = jnp.asarray(mask.reshape(nb, batch_size))

  @jax.jit
  def evaluate(params, model_state):
    def one(args):
      x_B, y_B, m_B = args
      logits, _ = apply(params, model_state, x_B, train=False)
      wrong = (jnp.argmax(logits, -1) != y_B) & m_B
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_B)
      return jnp.sum(wrong), jnp.sum(jnp.where(m_B, loss, 0.0))

    wrong, loss = jax.lax.map(one, (x_NBxBxHxWxC, y_NBxB, mask_NBxB))
    return jnp.sum(wrong) / n, jnp.sum(loss) / n

  return evaluate


@functools.lru_cache(maxsize=2)
def load_dataset(name: str, data_dir: str | None, download: bool) -> data.Dataset:
  """:func:`data.load`, cached: a comparison loads its dataset once."""
  return data.load(name, data_dir=data_dir, download=download)


class _Program:
  """What runs that differ only in seed and injected hyperparameters share:
  the data on device, the model's ``apply``, the simulator and the
  evaluation, with their compiled programs."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.algorithm = algorithms.get(config.algorithm)
    self.num_workers = self.algorithm.effective_workers(config.num_workers)
    self.ds = load_dataset(config.dataset, config.data_dir, config.download)
    self.steps_per_epoch = steps_per_epoch(
        len(self.ds.train_labels), config.batch_size
    )
    apply, _, model_state = models.functional(create_model(config, self.ds))
    self.stateful = bool(jax.tree.leaves(model_state))
    stateful_loss = make_loss(apply, self.ds)
    loss_fn = (stateful_loss if self.stateful
               else lambda p, b: stateful_loss(p, {}, b)[0])
    self.sim = algorithms.make_simulator(
        config, loss_fn, steps_per_epoch=self.steps_per_epoch,
        has_model_state=self.stateful,
    )
    self.evaluate = make_evaluate(apply, self.ds, config.eval_batch_size)


def create_model(config: Any, ds: data.Dataset):
  """The config's model for ``ds``, initialized from ``config.seed``."""
  return models.create(
      config.model, image_shape=ds.image_shape, num_classes=ds.num_classes,
      seed=config.seed, mlp_hidden=tuple(config.mlp_hidden),
  )


_PROGRAMS: dict[str, _Program] = {}  # the most recent two, by program_key


def program_key(config: ml_collections.ConfigDict) -> str:
  """The config without what a run's programs do not depend on: its seed,
  its arrivals and length, and the injected hyperparameters
  (:func:`algorithms.injected`), unless the diagnostics bake them into
  their adjustment."""
  fields = json.loads(config.to_json())
  drop = {"seed", "schedule", "gamma_shape", "num_epochs"}  # data, not code
  if not config.diagnostics_every:
    drop |= set(algorithms.injected(config))
  return json.dumps({k: v for k, v in fields.items() if k not in drop},
                    sort_keys=True)


def shared_program(config: ml_collections.ConfigDict) -> _Program:
  """The :class:`_Program` of ``config``, built once for a sweep's runs."""
  key = program_key(config)
  if key not in _PROGRAMS:
    while len(_PROGRAMS) >= 2:
      del _PROGRAMS[next(iter(_PROGRAMS))]
    _PROGRAMS[key] = _Program(config)
  return _PROGRAMS[key]


class _Run:
  """One run: its config's program, initial model, arrivals and keys."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    program = shared_program(config)
    self.algorithm, self.num_workers = program.algorithm, program.num_workers
    self.ds, self.steps_per_epoch = program.ds, program.steps_per_epoch
    self.sim, self.evaluate = program.sim, program.evaluate
    self.stateful = program.stateful
    _, self.params, self.model_state = models.functional(
        create_model(config, self.ds))
    self.rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    self.arrivals = arrival_schedule(
        config, self.num_workers, config.num_epochs * self.steps_per_epoch,
        self.algorithm.arrival_schedule(config.schedule),
    )

  def init(self):
    ms = self.model_state if self.stateful else None
    state = self.sim.init(self.params, ms)
    return state._replace(
        opt_state=algorithms.set_injected(state.opt_state, self.config))

  def epoch_range(self, epoch: int) -> tuple[int, int]:
    return epoch_range(
        self.algorithm.gradients_per_update(self.num_workers),
        self.steps_per_epoch, epoch,
    )

  def inputs(self, epoch: int) -> tuple[dict, np.ndarray]:
    """Epoch ``epoch``'s batches (``{'idx'}``, plus ``'key'`` with
    augmentation; gradient ``g``'s key is ``fold_in(rng, g)``) and arrivals."""
    start, stop = self.epoch_range(epoch)
    idx = gradient_indices(
        self.config.seed, len(self.ds.train_labels), self.config.batch_size,
        start, stop,
    )
    batches = {"idx": idx}
    if self.ds.augment:
      steps = jnp.arange(start, stop, dtype=jnp.int32)
      batches["key"] = jax.vmap(jax.random.fold_in, (None, 0))(self.rng, steps)
    return batches, self.arrivals[start:stop]

  def epoch(self, state, epoch: int) -> tuple[Any, dict[str, np.ndarray]]:
    """Replays epoch ``epoch``; returns the new state and its per-arrival
    metrics (``loss``, ``staleness``, ``step`` ..., see ``Simulator.replay``)."""
    start, stop = self.epoch_range(epoch)
    if stop == start:  # SSGD with more workers than gradients per epoch.
      return state, {"loss": np.zeros((0,)), "staleness": np.zeros((0,), np.int32)}
    state, metrics = self.sim.replay(state, *self.inputs(epoch))
    return state, {k: np.asarray(v) for k, v in metrics.items()}

  def record(self, state, epoch: int, metrics: dict, seconds: float) -> dict:
    model_state = state.model_state if self.stateful else {}
    error, test_loss = self.evaluate(state.params, model_state)
    loss, staleness = metrics["loss"], metrics["staleness"]
    return {
        "epoch": epoch + 1,
        "updates": int(state.step),
        "gradients": self.epoch_range(epoch)[1],
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
      "mean_staleness": sum(h["staleness_sum"] for h in history) / max(arrivals, 1),
      "epochs": len(history),
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates one run, resuming from ``workdir`` if it holds one.

  Args:
    config: the run's hyperparameters (see ``experiments/configs/default.py``).
    workdir: where metrics, checkpoints and the summary go.

  Returns:
    The summary (also written to ``workdir/summary.json``): algorithm,
    workers, schedule, seed, final and best test error, wall time (seconds
    spent replaying gradients, compilation included, evaluation excluded,
    summed over resumed sessions), mean staleness, epochs.
  """
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  run_files.check_same_config(config, workdir)
  summary = run_files.read_summary(workdir)
  if summary is not None:  # Finished earlier: nothing to do.
    return summary
  run = _Run(config)
  if config.checkpoint_every_epochs:
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
      history = _train(run, workdir, ckpt)
  else:
    history = _train(run, workdir, None)
  summary = summarize(config, history)
  run_files.write_summary(workdir, summary)
  return summary


def _train(run: _Run, workdir: str, ckpt: Checkpointer | None) -> list[dict]:
  """Trains ``run`` from its latest checkpoint (if any) to the last epoch."""
  config = run.config
  state, history = _restore(ckpt, run.init())
  run_files.write_metrics(workdir, history)
  run_files.keep_diagnostics(workdir, len(history))
  desc = f"{config.algorithm} M={run.num_workers} seed={config.seed}"
  bar = tqdm.tqdm(total=config.num_epochs, initial=len(history), desc=desc,
                  unit="epoch", disable=not config.progress_bar, leave=False)
  for epoch in range(len(history), config.num_epochs):
    t0 = time.perf_counter()
    state, metrics = run.epoch(state, epoch)
    jax.block_until_ready(state)
    record = run.record(state, epoch, metrics, time.perf_counter() - t0)
    history.append(record)
    if config.diagnostics_every:
      run_files.append_diagnostics(workdir, epoch + 1, metrics)
    done = epoch + 1 == config.num_epochs
    if ckpt and (done or (epoch + 1) % config.checkpoint_every_epochs == 0):
      ckpt.save(epoch + 1, state, metadata={"epochs": history})
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
