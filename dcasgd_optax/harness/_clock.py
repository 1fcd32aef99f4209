r"""The simulated wall clock: when each arrival (or synchronous round) lands,
and when a run first reaches a target error.

Time is counted in units of one gradient's mean compute time at speed 1
(:func:`dcasgd_optax.harness.schedules.gamma_speeds`' model). Each worker
computes gradients back to back, pulling right after each push, so:

* asynchronous SGD: arrival :math:`k` lands when its worker finishes, at
  the sum of that worker's compute times so far;
* synchronous SGD: round :math:`r` ends when its slowest worker finishes,
  :math:`t_r = t_{r-1} + \max_m T_{m,r}`, where :math:`T_{m,r}` is worker
  :math:`m`'s :math:`r`-th compute time, drawn from the same streams as the
  asynchronous clock with the same seed (the same machines).

Sequential SGD is either with one worker. With equal, constant compute times
both process :math:`M` gradients per unit of time; the asynchronous server
gains where the compute times spread (Gamma draws, slow workers,
stragglers), as a round waits for its slowest worker.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from dcasgd_optax import extend
from dcasgd_optax.harness import _schedules


class Timed(NamedTuple):
  """An arrival order with its clock.

  Attributes:
    arrivals: int32 ``[A]``, the workers in the order their gradients land
      (what :meth:`Simulator.replay` takes).
    times: float64 ``[A]``, non-decreasing: the simulated wall-clock time at
      which each lands.
  """

  arrivals: np.ndarray
  times: np.ndarray


def timed_cyclic(num_workers: int, num_arrivals: int) -> Timed:
  r"""Round-robin arrivals (:func:`cyclic`) and their clock.

  Every worker takes exactly one unit of time per gradient and all start at
  time 0, so round :math:`r` (arrivals :math:`rM .. rM + M - 1`, ties by
  worker id) lands at time :math:`r + 1`:

  .. math::
    a_k = k \bmod M, \qquad t_k = \lfloor k / M \rfloor + 1.

  Args:
    num_workers: number of workers M (>= 1).
    num_arrivals: length of the schedule (>= 0).

  Returns:
    A :class:`Timed`.

  Examples:
    >>> from dcasgd_optax.harness import schedules
    >>> schedules.timed_cyclic(2, 5).times.tolist()
    [1.0, 1.0, 2.0, 2.0, 3.0]
  """
  arrivals = _schedules.cyclic(num_workers, num_arrivals)
  times = (np.arange(num_arrivals) // num_workers + 1).astype(np.float64)
  return Timed(arrivals, times)


def timed_gamma(
    num_workers: int,
    num_arrivals: int,
    seed: int,
    *,
    shape: float = 100.0,
    speeds: Any = None,
    straggler_prob: float = 0.0,
    straggler_slowdown: float = 10.0,
) -> Timed:
  r"""Event-driven arrivals (:func:`gamma_speeds`, the same arguments give the
  same order) and the time at which each lands.

  Arrival :math:`k` of worker :math:`m`, its :math:`j`-th gradient, lands at
  :math:`t_k = \sum_{i \le j} T_{m,i}`, the sum of its compute times so far
  (Gamma draws, stragglers included).

  Args:
    num_workers, num_arrivals, seed, shape, speeds, straggler_prob,
      straggler_slowdown: as in :func:`gamma_speeds`.

  Returns:
    A :class:`Timed`; ``arrivals`` equals ``gamma_speeds(...)``'s.

  Examples:
    >>> import numpy as np
    >>> from dcasgd_optax.harness import schedules
    >>> timed = schedules.timed_gamma(4, 400, seed=0)
    >>> bool(np.all(timed.arrivals == schedules.gamma_speeds(4, 400, seed=0)))
    True
    >>> round(float(timed.times[-1]), 1)  # 4 workers, 100 gradients each
    100.8
  """
  return Timed(*_schedules.gamma_events(
      num_workers, num_arrivals, seed, shape=shape, speeds=speeds,
      straggler_prob=straggler_prob, straggler_slowdown=straggler_slowdown))


def sync_round_times(
    num_workers: int,
    num_rounds: int,
    seed: int | None = None,
    *,
    shape: float = 100.0,
    speeds: Any = None,
    straggler_prob: float = 0.0,
    straggler_slowdown: float = 10.0,
) -> np.ndarray:
  r"""When each synchronous round ends: at its slowest worker's finish.

  .. math::
    t_r = t_{r-1} + \max_m T_{m,r}, \qquad t_0 = 0,

  with :math:`T_{m,r}` worker :math:`m`'s :math:`r`-th compute time. With a
  ``seed`` these are the Gamma draws (and stragglers) of :func:`timed_gamma`
  with the same arguments, worker by worker: the same machines, now waiting
  for each other. Without one (``None``) every compute time is its mean
  :math:`1/s_m`, the clock of :func:`timed_cyclic` for equal speeds.
  :class:`SyncSimulator` reports a round's ``M`` arrivals together:
  ``np.repeat(times, M)`` gives each its time.

  Args:
    num_workers: number of workers M (>= 1).
    num_rounds: number of rounds (>= 0).
    seed: seed of the compute times, or None for constant ones.
    shape, speeds, straggler_prob, straggler_slowdown: as in
      :func:`gamma_speeds` (stragglers need a ``seed``).

  Returns:
    A float64 array ``[num_rounds]``, increasing.

  Examples:
    >>> from dcasgd_optax.harness import schedules
    >>> schedules.sync_round_times(4, 3).tolist()
    [1.0, 2.0, 3.0]
    >>> slow = schedules.straggler_speeds(4, slowdown=10.0)
    >>> schedules.sync_round_times(4, 3, speeds=slow).tolist()
    [10.0, 20.0, 30.0]
  """
  num_workers, speeds, prob, slowdown = _schedules.check_gamma(
      num_workers, shape, speeds, straggler_prob, straggler_slowdown)
  num_rounds = _schedules._check_nonnegative_int("num_rounds", num_rounds)
  if seed is None:
    if prob > 0 and slowdown > 1:
      raise ValueError(
          "`seed` is needed with stragglers (`straggler_prob` > 0): which "
          "compute times straggle is drawn at random."
      )
    return np.max(1.0 / speeds) * np.arange(1, num_rounds + 1, dtype=float)
  rngs, straggler_rngs = _schedules.worker_streams(seed, num_workers)
  times_MxR = np.stack([
      _schedules.worker_compute_times(rngs, straggler_rngs, m, num_rounds,
                                      shape, speeds[m], prob, slowdown)
      for m in range(num_workers)
  ]).reshape(num_workers, num_rounds)
  return np.cumsum(np.max(times_MxR, axis=0, initial=0.0))


def straggler_speeds(num_workers: int, *, num_slow: int = 1,
                     slowdown: float = 10.0) -> np.ndarray:
  r"""Speeds with ``num_slow`` workers ``slowdown`` times slower (the last).

  The straggler scenario of a cluster with a slow machine, for the
  ``speeds`` of :func:`gamma_speeds` / :func:`timed_gamma` /
  :func:`sync_round_times`: the slow workers' gradients arrive about
  ``slowdown`` times less often and that much staler, and every
  synchronous round waits for them. (For random, transient stragglers use
  ``straggler_prob`` instead.)

  Args:
    num_workers: number of workers M (>= 1).
    num_slow: how many are slow, in [0, M].
    slowdown: how much slower, >= 1.

  Returns:
    A float64 array ``[M]``: 1, and ``1 / slowdown`` for the last
    ``num_slow``.

  Examples:
    >>> import numpy as np
    >>> from dcasgd_optax.harness import schedules
    >>> speeds = schedules.straggler_speeds(4, slowdown=10.0)
    >>> speeds.tolist()
    [1.0, 1.0, 1.0, 0.1]
    >>> order = schedules.gamma_speeds(4, 310, seed=0, speeds=speeds)
    >>> np.bincount(order).tolist()  # the slow worker lands ~10x less often
    [100, 100, 101, 9]
  """
  num_workers = extend.check_positive_int("num_workers", num_workers)
  num_slow = _schedules._check_nonnegative_int("num_slow", num_slow)
  if num_slow > num_workers:
    raise ValueError(
        f"`num_slow` must lie in [0, num_workers={num_workers}], got "
        f"{num_slow}."
    )
  extend.check_scalar_range("slowdown", slowdown, low=1.0)
  speeds = np.ones(num_workers)
  speeds[num_workers - num_slow:] = 1.0 / float(slowdown)
  return speeds


class TimeToAccuracy(NamedTuple):
  """When a run first reaches a target error (:func:`time_to_accuracy`).

  Attributes:
    reached: whether any evaluation reached it.
    time: the simulated time of the first evaluation that did (``inf`` if
      none).
    gradients: the number of gradients applied by then (-1 if none).
    evaluation: that evaluation's index (-1 if none).
  """

  reached: bool
  time: float
  gradients: int
  evaluation: int


def time_to_accuracy(errors: Any, times: Any, gradients: Any,
                     target: float) -> TimeToAccuracy:
  r"""The first evaluation whose error is at most ``target``, and its clock.

  .. math::
    i^* = \min\{i : e_i \le e^*\}, \qquad
    (t_{i^*}, n_{i^*}) \text{ or "not reached"}.

  Evaluations are taken after known numbers of gradients, e.g. one per
  epoch; ``times`` are the clock's times of the arrivals (or rounds) after
  which each evaluation ran: with ``timed.times`` from a schedule and an
  evaluation after each ``E`` arrivals, ``timed.times[E - 1::E]``. A NaN
  error (a diverged run) never reaches the target. The speed-up over
  sequential SGD is the ratio of two such times (ideal: ``M``).

  Args:
    errors: ``[E]`` errors of the evaluations, in order.
    times: ``[E]`` simulated times of the evaluations, non-decreasing.
    gradients: ``[E]`` gradients applied at each evaluation,
      non-decreasing.
    target: the error to reach (e.g. sequential SGD's final error).

  Returns:
    A :class:`TimeToAccuracy`.

  Examples:
    >>> from dcasgd_optax.harness import time_to_accuracy
    >>> time_to_accuracy([0.5, 0.2, 0.1], [1.5, 3.0, 4.5], [32, 64, 96], 0.2)
    TimeToAccuracy(reached=True, time=3.0, gradients=64, evaluation=1)
    >>> time_to_accuracy([0.5, float('nan')], [1.0, 2.0], [8, 16], 0.2).reached
    False
  """
  errors = np.asarray(errors, np.float64)
  times = np.asarray(times, np.float64)
  gradients = np.asarray(gradients)
  if errors.ndim != 1:
    raise ValueError(f"`errors` must be 1-D, got shape {errors.shape}.")
  for name, x in (("times", times), ("gradients", gradients)):
    if x.shape != errors.shape:
      raise ValueError(
          f"`{name}` must have the shape of `errors` {errors.shape} (one "
          f"entry per evaluation), got {x.shape}."
      )
    if x.size and (not np.all(np.isfinite(x)) or np.any(np.diff(x) < 0)):
      raise ValueError(f"`{name}` must be finite and non-decreasing.")
  if not np.issubdtype(gradients.dtype, np.integer):
    raise TypeError(
        f"`gradients` must hold integers, got dtype {gradients.dtype}.")
  extend.check_scalar_range("target", target, low=0.0)
  hits = np.flatnonzero(errors <= target)  # NaN compares False
  if not hits.size:
    return TimeToAccuracy(False, float("inf"), -1, -1)
  i = int(hits[0])
  return TimeToAccuracy(True, float(times[i]), int(gradients[i]), i)
