r"""Asynchronous SGD on Ray on the offline MNIST subset, and its staleness.

Trains the model of ``config.model`` (the MLP of :mod:`experiments.models` by
default) on ``config.dataset`` (the offline ``mnist5k``, see
:mod:`experiments.data`) with :func:`dcasgd_optax.ray.train`:
``config.num_shards`` parameter-server shards, ``num_workers`` worker actors
each sampling minibatches from its own ``1/M`` of the training set and
pushing to the shards directly (in ``config.wire_dtype``, e.g. bfloat16, or
the params' own), no barrier. Each
algorithm of ``config.grid.algorithms`` gets its optimizer from the registry
(:mod:`experiments.algorithms`, the same as in the simulator) and the same
initial params and data stream.

It then compares the staleness distribution Ray produced with the simulator's
``gamma_speeds`` schedule: once with its defaults (shape 100, equal speeds)
and once fitted to the Ray run (Gamma shape ``1 / CV^2`` of each worker's
measured time between pushes, speeds from their means).

Writes ``results.json`` and ``staleness.png`` to ``--workdir``.

Command (from the repository root, local Ray on this machine)::

  python -m experiments.ray_async --config=experiments/configs/ray_async.py \
      --workdir=runs/ray_async

On a cluster (``ray start --head`` first, see docs/ray.md), add
``--address=auto``; each node prepares mnist5k itself (offline). The
config's docstring gives the hardware, runtime and expected result.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os
from typing import Any

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
import optax
import ray

from dcasgd_optax.harness import schedules
import dcasgd_optax.ray as dray
from experiments import algorithms
from experiments import data
from experiments import input_pipeline
from experiments import models
from experiments import plots
from experiments import startup
from experiments import train


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast on a config Ray cannot run, naming the field."""
  train.validate(config)
  for name in config.grid.algorithms:
    if algorithms.get(name).synchronous:
      raise ValueError(
          f"config.grid.algorithms: {name!r} is synchronous; Ray runs the "
          "asynchronous ones."
      )
  for field in ("num_updates", "num_shards"):
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{field} must be an int >= 1, got {value!r}.")
  if config.wire_dtype not in (None, "bfloat16", "float16", "float32"):
    raise ValueError(
        "config.wire_dtype must be None, 'bfloat16', 'float16' or 'float32', "
        f"got {config.wire_dtype!r}."
    )


class ShardedBatches:
  """``data_fn`` for :func:`dcasgd_optax.ray.train`: worker m's own shard.

  Pickles small: the dataset is loaded (and prepared, offline) the first time
  a worker process calls it. Worker ``m`` holds training images ``m, m + M,
  m + 2M, ...``; batch ``seq`` is drawn with ``default_rng([seed, m, seq])``,
  so a recomputed gradient sees the same batch.
  """

  def __init__(self, dataset: str, data_dir: str | None, num_workers: int,
               batch_size: int, seed: int):
    self._dataset, self._data_dir = dataset, data_dir
    self._num_workers, self._batch_size, self._seed = (
        num_workers,
        batch_size,
        seed,
    )
    self._train = None

  def __call__(self, worker: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    if self._train is None:
      ds = data.load(self._dataset, data_dir=self._data_dir)
      self._train = (ds.train_images, ds.train_labels)
    images, labels = self._train
    shard = np.arange(worker, len(labels), self._num_workers)
    rng = np.random.default_rng([self._seed, worker, seq])
    idx = rng.choice(shard, self._batch_size)
    return images[idx], labels[idx]


def make_tx(
    algorithm: str, config: ml_collections.ConfigDict, num_train: int
) -> optax.GradientTransformation:
  """The server's optimizer: the registry's, as in the simulator.

  Learning-rate boundaries and warm-up given in epochs are converted with
  ``num_train // batch_size`` updates per epoch.
  """
  c = ml_collections.ConfigDict(config.to_dict())
  c.algorithm = algorithm
  workers = algorithms.get(algorithm).effective_workers(config.num_workers)
  steps = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  return algorithms.make_tx(c, workers, steps)


def make_model(config: ml_collections.ConfigDict, ds: data.Dataset):
  """``(loss_fn, predict, params)``; closures pickle by value."""
  model = models.create(config.model, image_shape=ds.image_shape,
                        num_classes=ds.num_classes, seed=config.seed,
                        mlp_hidden=tuple(config.mlp_hidden))
  apply, params, model_state = models.functional(model)
  if jax.tree.leaves(model_state):
    raise ValueError(
        f"config.model={config.model!r} has a model state (BatchNorm), which "
        "the Ray trainer does not carry; use a model without one (mlp)."
    )

  def loss_fn(params, batch):
    images_BxHxWxC, labels_B = batch
    logits_BxK, _ = apply(params, {}, images_BxHxWxC, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxK, labels_B).mean()

  @jax.jit
  def predict(params, images_BxHxWxC):
    return apply(params, {}, images_BxHxWxC, train=False)[0].argmax(-1)

  return loss_fn, predict, params


def train_algorithm(
    algorithm: str, config: ml_collections.ConfigDict, ds: data.Dataset,
    address: str | None = None,
) -> dict[str, Any]:
  """One Ray run; returns its metrics and per-update records."""
  loss_fn, predict, params = make_model(config, ds)
  workers = algorithms.get(algorithm).effective_workers(config.num_workers)
  batches = ShardedBatches(config.dataset, config.data_dir, workers,
                           config.batch_size, config.seed)
  result = dray.train(
      loss_fn, make_tx(algorithm, config, len(ds.train_labels)), params,
      batches, workers, config.num_updates, num_shards=config.num_shards,
      wire_dtype=config.wire_dtype, address=address,
  )
  rec = result.records
  accuracy = float(np.mean(predict(result.params, ds.test_images)
                           == ds.test_labels))
  return {
      "algorithm": algorithm,
      "test_accuracy": accuracy,
      "final_train_loss": float(rec.loss[-200:].mean()),
      "updates_per_second": len(rec.step) / result.wall_time,
      "server_share": result.server_share,
      "staleness_mean": float(rec.staleness.mean()),
      "staleness_max": int(rec.staleness.max()),
      "shard_times": result.shard_times.tolist(),
      "skipped": int(rec.skipped.sum()),
      "records": {k: v.tolist() for k, v in rec.items()},
  }


def fit_gamma_speeds(
    records: dict, num_workers: int
) -> tuple[float, np.ndarray]:
  """Gamma shape and per-worker speeds matching a run's time between pushes.

  A worker's cycle (pull, compute, push, wait for the server) is the time
  between its consecutive updates. Shape ``k = 1 / CV^2`` of the cycles, each
  divided by its worker's mean; speed ``s_m`` proportional to ``1 / mean``.
  """
  worker = np.asarray(records["worker"])
  time = np.asarray(records["time"])
  means, normalized = [], []
  for m in range(num_workers):
    cycles = np.diff(time[worker == m])[1:]  # Drop the compile-time cycle.
    means.append(cycles.mean())
    normalized.append(cycles / cycles.mean())
  cv = np.concatenate(normalized).std()
  speeds = 1.0 / np.asarray(means)
  return float(1.0 / max(cv, 1e-3) ** 2), speeds / speeds.mean()


def _after_first(worker: np.ndarray, staleness: np.ndarray) -> np.ndarray:
  """Drops each worker's first update (its start-up, not its steady state)."""
  first = np.zeros(len(worker), bool)
  first[np.unique(worker, return_index=True)[1]] = True
  return staleness[~first]


def staleness_comparison(
    runs: list[dict], config: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
  """Staleness samples: each Ray run, and gamma_speeds default and fitted.

  Each worker's first update is left out everywhere: on Ray it waits for the
  worker process to start and compile, which is not the steady state.
  """
  m, n = config.num_workers, config.num_updates
  out = {}
  for r in runs:
    rec = r["records"]
    out[f"Ray, {r['algorithm']}"] = _after_first(
        np.asarray(rec["worker"]), np.asarray(rec["staleness"]))
  shape, speeds = fit_gamma_speeds(runs[0]["records"], m)
  for label, kwargs in (("gamma_speeds, shape 100", {}),
                        (f"gamma_speeds fitted, shape {shape:.1f}",
                         dict(shape=shape, speeds=speeds))):
    arrivals = schedules.gamma_speeds(m, n, seed=config.seed, **kwargs)
    out[label] = _after_first(arrivals, schedules.staleness(arrivals, m))
  return out


def run(
    config: ml_collections.ConfigDict, workdir: str, address: str | None = None
) -> list[dict]:
  """Trains every algorithm on Ray, writes results.json and staleness.png."""
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  ds = data.load(config.dataset, data_dir=config.data_dir)
  # One Ray for all runs (train would start one per call); like train,
  # connect refuses an existing cluster without authentication.
  started = dray.connect(address)
  try:
    runs = [train_algorithm(a, config, ds, address)
            for a in config.grid.algorithms]
  finally:
    if started:
      ray.shutdown()
  samples = staleness_comparison(runs, config)
  plots.plot_ray_staleness(runs, samples,
                           os.path.join(workdir, "staleness.png"))
  summary = {k: {"mean": float(v.mean()), "std": float(v.std()),
                 "max": int(v.max())} for k, v in samples.items()}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"config": config.to_dict(), "runs": runs,
               "staleness": summary}, f)
  for r in runs:
    print(f"{r['algorithm']:>10}: test accuracy {r['test_accuracy']:.4f}, "
          f"{r['updates_per_second']:.0f} updates/s, server share "
          f"{r['server_share']:.2f}, staleness mean {r['staleness_mean']:.2f}"
          f" max {r['staleness_max']}")
  for k, v in summary.items():
    print(f"{k:>36}: staleness mean {v['mean']:.2f} std {v['std']:.2f} "
          f"max {v['max']}")
  return runs


def main(argv: Sequence[str]) -> None:
  config, workdir = startup.setup(argv)
  run(config, workdir, flags.FLAGS.address)


if __name__ == "__main__":
  # Flags are defined only when run as a program (see experiments.startup).
  startup.define_flags(workdir_help="Output folder.",
                       workdir_default="runs/ray_async",
                       config_default="experiments/configs/ray_async.py")
  flags.DEFINE_string("address", None,
                      "Ray address, e.g. auto; default a local Ray.")
  app.run(main)
