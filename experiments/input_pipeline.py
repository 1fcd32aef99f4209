"""The input pipeline: which examples each gradient sees, and when it arrives.

A run's data stream is a pure function of its config: gradient ``g``
belongs to epoch ``g // S`` (``S = num_train // batch_size``), each epoch is
a fresh permutation of the training set, and the order in which workers
push (the arrival schedule) is drawn from ``config.seed`` too. Every
algorithm consumes the same stream; an epoch applies whole server updates
(:func:`epoch_range`). The datasets themselves are loaded by
:mod:`experiments.data`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dcasgd_optax.harness import schedules
from experiments import data

SCHEDULES = ("cyclic", "shuffled", "gamma", "straggler")
"""The arrival schedules a config may name (``config.schedule``):
``straggler`` is ``gamma`` with its last worker :data:`STRAGGLER_SLOWDOWN`
times slower (the scenario where the delay-adaptive rules and Gap-Aware can
show what they are for)."""

STRAGGLER_SLOWDOWN = 10.0
"""How much slower the ``straggler`` schedule's last worker computes."""


def load(config: Any) -> data.Dataset:
  """``config.dataset``, read from ``config.data_dir`` (prepared if
  ``config.download``)."""
  return data.load(config.dataset, data_dir=config.data_dir,
                   download=config.download)


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

  ``schedule`` (default ``config.schedule``): one of :data:`SCHEDULES`.
  """
  schedule = schedule or config.schedule
  seed = _schedule_seed(config)
  if schedule == "cyclic":
    return schedules.cyclic(num_workers, num_arrivals)
  if schedule == "shuffled":
    rounds = -(-num_arrivals // num_workers)
    return schedules.shuffled_rounds(num_workers, rounds, seed)[:num_arrivals]
  return schedules.gamma_speeds(
      num_workers, num_arrivals, seed, shape=config.gamma_shape,
      speeds=_speeds(schedule, num_workers))


def _schedule_seed(config: Any) -> int:
  return int(np.random.SeedSequence([config.seed, 2]).generate_state(1)[0])


def _speeds(schedule: str, num_workers: int) -> np.ndarray | None:
  """The workers' speeds of a Gamma schedule: the last one
  :data:`STRAGGLER_SLOWDOWN` times slower for ``straggler``."""
  if schedule != "straggler":
    return None
  speeds = np.ones(num_workers)
  if num_workers > 1:  # one worker alone is the reference machine
    speeds[-1] = 1.0 / STRAGGLER_SLOWDOWN
  return speeds


def arrival_times(
    config: Any, num_workers: int, num_arrivals: int, *,
    synchronous: bool = False,
) -> np.ndarray:
  r"""The simulated wall-clock time at which each gradient lands.

  Time is in units of one gradient's mean compute time on a worker of speed
  1 (the harness's clock, :func:`dcasgd_optax.harness.schedules.
  timed_gamma`): every worker computes back to back. Asynchronous arrivals
  land when their worker finishes (``cyclic``: round ``r`` at ``r + 1``;
  ``gamma`` and ``straggler``: the sum of the worker's Gamma draws, the very
  draws :func:`arrival_schedule` orders). ``synchronous`` (SSGD): every
  gradient of round ``r`` lands when the round's slowest worker finishes,
  :math:`t_r = t_{r-1} + \max_m T_{m,r}`, from the same workers' draws. One
  worker (sequential SGD) lands gradient ``k`` at ``k + 1`` under cyclic
  arrivals. ``shuffled`` rounds take one unit each, like ``cyclic``.

  On a harness without the clock (``schedules.timed_gamma`` absent) the
  Gamma schedules' times are NaN: time to accuracy is then "unknown".

  Returns:
    float64 ``[num_arrivals]``, non-decreasing.
  """
  schedule = config.schedule
  if schedule in ("cyclic", "shuffled") or num_workers == 1:
    return (np.arange(num_arrivals) // num_workers + 1).astype(np.float64)
  if not hasattr(schedules, "timed_gamma"):
    return np.full(num_arrivals, np.nan)
  seed = _schedule_seed(config)
  speeds = _speeds(schedule, num_workers)
  if synchronous:
    rounds = -(-num_arrivals // num_workers)
    times = schedules.sync_round_times(
        num_workers, rounds, seed, shape=config.gamma_shape, speeds=speeds)
    return np.repeat(times, num_workers)[:num_arrivals]
  return schedules.timed_gamma(
      num_workers, num_arrivals, seed, shape=config.gamma_shape,
      speeds=speeds).times


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


def batches(
    ds: data.Dataset, seed: int, batch_size: int, rng: jax.Array,
    start: int, stop: int,
) -> dict[str, Any]:
  """Gradients ``start .. stop - 1``'s minibatches, as the loss takes them.

  Returns:
    ``{'idx': int32 [stop - start, batch_size]}`` (:func:`gradient_indices`),
    plus ``'key'`` when ``ds.augment``: gradient ``g``'s augmentation key,
    ``fold_in(rng, g)``.
  """
  idx = gradient_indices(seed, len(ds.train_labels), batch_size, start, stop)
  out = {"idx": idx}
  if ds.augment:
    steps = jnp.arange(start, stop, dtype=jnp.int32)
    out["key"] = jax.vmap(jax.random.fold_in, (None, 0))(rng, steps)
  return out
