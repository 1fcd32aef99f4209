"""Arrival orders: which worker's gradient reaches the server next.

Every schedule is NumPy only, deterministic for its arguments (a ``seed`` where
there is randomness), and returns a 1-D ``int32`` array of worker ids that
:meth:`Simulator.replay <dcasgd_optax.harness.Simulator.replay>` takes as
``arrivals``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dcasgd_optax import extend


def _check_nonnegative_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"`{name}` must be a Python int >= 0, got {value!r}.")
  if value < 0:
    raise ValueError(f"`{name}` must be an int >= 0, got {value}.")
  return int(value)


def cyclic(num_workers: int, num_arrivals: int) -> np.ndarray:
  r"""Round-robin arrivals: workers 0, 1, ..., M-1, 0, 1, ...

  .. math::
    a_k = k \bmod M

  After the first round every arrival has staleness exactly :math:`M - 1`;
  in the first round worker ``m`` has staleness ``m`` (everyone pulled the
  initial model at step 0).

  Args:
    num_workers: number of workers M (>= 1).
    num_arrivals: length of the schedule (>= 0).

  Returns:
    An ``int32`` array of shape ``[num_arrivals]``.

  Examples:
    >>> from dcasgd_optax.harness import schedules
    >>> schedules.cyclic(3, 7)
    array([0, 1, 2, 0, 1, 2, 0], dtype=int32)
  """
  num_workers = extend.check_positive_int("num_workers", num_workers)
  num_arrivals = _check_nonnegative_int("num_arrivals", num_arrivals)
  return (np.arange(num_arrivals) % num_workers).astype(np.int32)


def shuffled_rounds(num_workers: int, num_rounds: int, seed: int) -> np.ndarray:
  r"""Rounds in which every worker arrives once, each round in a random order.

  Round ``r`` is a uniformly random permutation of ``0..M-1``, drawn with
  ``np.random.default_rng(seed)``. A worker's staleness is the number of
  arrivals between its two consecutive pushes: it lies in
  :math:`[0, 2M - 2]` and averages :math:`M - 1` after the first round.

  Args:
    num_workers: number of workers M (>= 1).
    num_rounds: number of rounds (>= 0); the schedule has ``M * num_rounds``
      arrivals.
    seed: seed of the permutations.

  Returns:
    An ``int32`` array of shape ``[num_workers * num_rounds]``.

  Examples:
    >>> from dcasgd_optax.harness import schedules
    >>> order = schedules.shuffled_rounds(4, 3, seed=0)
    >>> order.shape, sorted(order[4:8].tolist())
    ((12,), [0, 1, 2, 3])
  """
  num_workers = extend.check_positive_int("num_workers", num_workers)
  num_rounds = _check_nonnegative_int("num_rounds", num_rounds)
  rng = np.random.default_rng(extend.check_seed(seed))
  rounds = [rng.permutation(num_workers) for _ in range(num_rounds)]
  if not rounds:
    return np.zeros((0,), np.int32)
  return np.concatenate(rounds).astype(np.int32)


def _check_speeds(speeds: Any, num_workers: int) -> np.ndarray:
  if speeds is None:
    return np.ones((num_workers,))
  speeds = np.asarray(speeds, dtype=np.float64)
  if speeds.shape != (num_workers,):
    raise ValueError(
        f"`speeds` must have shape ({num_workers},) (one factor per worker), "
        f"got {speeds.shape}."
    )
  if not np.all(np.isfinite(speeds) & (speeds > 0)):
    raise ValueError(f"`speeds` must be finite and > 0, got {speeds}.")
  return speeds


def _check_stragglers(prob: Any, slowdown: Any) -> tuple[float, float]:
  extend.check_scalar_range("straggler_prob", prob, low=0.0, high=1.0,
                             high_inclusive=True)
  extend.check_scalar_range("straggler_slowdown", slowdown, low=1.0)
  return float(prob), float(slowdown)


def _compute_times(rng, straggler_rng, n, shape, speed, prob, slowdown):
  """``n`` compute times of one worker: Gamma draws, some slowed down."""
  times = rng.gamma(shape, 1.0 / (shape * speed), size=n)
  if prob > 0:  # a separate stream: without stragglers nothing changes
    times = np.where(straggler_rng.random(n) < prob, slowdown * times, times)
  return times


def gamma_speeds(
    num_workers: int,
    num_arrivals: int,
    seed: int,
    *,
    shape: float = 100.0,
    speeds: Any = None,
    straggler_prob: float = 0.0,
    straggler_slowdown: float = 10.0,
) -> np.ndarray:
  r"""Event-driven arrivals with Gamma-distributed compute times.

  Worker ``m`` computes gradients back to back (it pulls right after it
  pushes); each takes a time

  .. math::
    T = S \, G, \qquad G \sim \mathrm{Gamma}(k, \theta_m), \quad
    \theta_m = 1 / (k \, s_m), \qquad
    S = \begin{cases} f & \text{with probability } p \\
    1 & \text{otherwise,} \end{cases}

  so without stragglers (:math:`p = 0`, the default) of mean :math:`1 / s_m`
  and coefficient of variation :math:`1/\sqrt{k}`. Arrivals are all workers'
  finishing events in time order (ties by worker id). Each worker draws from
  its own streams spawned from ``seed``.

  The staleness of worker ``m`` is the number of other arrivals during one of
  its compute times, on average :math:`\sum_{j \ne m} s_j / s_m`: with equal
  speeds it averages :math:`M - 1`, close to cyclic at first for a large
  ``shape`` (the default 100) while the workers' phases drift apart slowly; a
  smaller ``shape`` spreads it, and slow workers are staler.

  Stragglers are the thin tail of long delays that real clusters show (a
  preempted or contended worker, a garbage-collection pause): each compute
  time is, independently with probability ``straggler_prob``,
  ``straggler_slowdown`` times longer. Such a gradient arrives with about
  ``straggler_slowdown`` times the usual staleness, while the Gamma body of
  the distribution stays as it was (the stragglers' draws come from a
  separate stream, so ``straggler_prob=0`` or ``straggler_slowdown=1`` gives
  exactly the order without stragglers).

  Args:
    num_workers: number of workers M (>= 1).
    num_arrivals: length of the schedule (>= 0).
    seed: seed of the compute times.
    shape: the Gamma shape k (> 0).
    speeds: optional per-worker speed factors, shape ``[M]``, > 0; a worker
      with speed 2 finishes twice as fast on average. Default all ones.
    straggler_prob: probability p in [0, 1] that a compute time straggles.
    straggler_slowdown: factor f >= 1 by which a straggling time is longer.

  Returns:
    An ``int32`` array of shape ``[num_arrivals]``.

  Examples:
    >>> import numpy as np
    >>> from dcasgd_optax.harness import schedules
    >>> order = schedules.gamma_speeds(2, 300, seed=0, speeds=[1.0, 2.0])
    >>> np.bincount(order).tolist()  # the fast one arrives about twice as often
    [101, 199]
    >>> for p in (0.0, 0.01):  # 1% of gradients take 20x longer
    ...   order = schedules.gamma_speeds(8, 4000, seed=0, straggler_prob=p,
    ...                                  straggler_slowdown=20.0)
    ...   tau = schedules.staleness(order, 8)[8:]
    ...   print(int(np.median(tau)), int(tau.max()))  # median, longest delay
    7 12
    6 154
  """
  return gamma_events(num_workers, num_arrivals, seed, shape=shape,
                      speeds=speeds, straggler_prob=straggler_prob,
                      straggler_slowdown=straggler_slowdown)[0]


def check_gamma(num_workers: int, shape: Any, speeds: Any, straggler_prob: Any,
                straggler_slowdown: Any) -> tuple[int, np.ndarray, float,
                                                  float]:
  """:func:`gamma_speeds`' arguments, checked: ``(M, speeds, p, f)``."""
  num_workers = extend.check_positive_int("num_workers", num_workers)
  extend.check_scalar_range("shape", shape, low=0.0, low_inclusive=False)
  speeds = _check_speeds(speeds, num_workers)
  prob, slowdown = _check_stragglers(straggler_prob, straggler_slowdown)
  return num_workers, speeds, prob, slowdown


def worker_streams(seed: Any, num_workers: int) -> tuple[list, list]:
  """Each worker's compute-time and straggler generators for ``seed``."""
  root = np.random.SeedSequence(extend.check_seed(seed))
  rngs = [np.random.default_rng(s) for s in root.spawn(num_workers)]
  straggler_rngs = [np.random.default_rng(s) for s in root.spawn(num_workers)]
  return rngs, straggler_rngs


def worker_compute_times(rngs, straggler_rngs, m, n, shape, speed, prob,
                         slowdown) -> np.ndarray:
  """The next ``n`` compute times of worker ``m`` from its streams."""
  return _compute_times(rngs[m], straggler_rngs[m], n, shape, speed, prob,
                        slowdown)


def gamma_events(num_workers: int, num_arrivals: int, seed: int, *,
                 shape: float = 100.0, speeds: Any = None,
                 straggler_prob: float = 0.0,
                 straggler_slowdown: float = 10.0
                 ) -> tuple[np.ndarray, np.ndarray]:
  """:func:`gamma_speeds`' arrivals (int32) and the time of each (float64)."""
  num_workers, speeds, prob, slowdown = check_gamma(
      num_workers, shape, speeds, straggler_prob, straggler_slowdown)
  num_arrivals = _check_nonnegative_int("num_arrivals", num_arrivals)
  rngs, straggler_rngs = worker_streams(seed, num_workers)
  share = speeds / speeds.sum()
  counts = np.ceil(num_arrivals * share * 1.1).astype(int) + 8

  def more(m, n):
    return np.cumsum(_compute_times(
        rngs[m], straggler_rngs[m], n, shape, speeds[m], prob, slowdown))

  times = [more(m, n) for m, n in enumerate(counts)]
  while True:
    # Every event up to the earliest last-drawn time is known for all workers.
    horizon = min(t[-1] for t in times)
    if sum(np.searchsorted(t, horizon, "right") for t in times) >= num_arrivals:
      break
    times = [np.concatenate([t, t[-1] + more(m, n)])
             for m, (t, n) in enumerate(zip(times, counts))]
  when = np.concatenate(times)
  who = np.concatenate([np.full(len(t), m) for m, t in enumerate(times)])
  order = np.lexsort((who, when))[:num_arrivals]
  return who[order].astype(np.int32), when[order].astype(np.float64)


def staleness(arrivals: Any, num_workers: int) -> np.ndarray:
  r"""The staleness of each arrival: server updates since that worker's pull.

  With every worker pulling the initial model at step 0 and pulling again
  right after each push, arrival ``k`` of worker ``m`` has

  .. math::
    \tau_k = k - (p + 1)

  where ``p`` is the index of ``m``'s previous arrival (:math:`\tau_k = k`
  if there is none). This is what
  :meth:`Simulator.replay <dcasgd_optax.harness.Simulator.replay>` reports.

  Args:
    arrivals: 1-D integer array of worker ids in ``[0, num_workers)``.
    num_workers: number of workers (>= 1).

  Returns:
    An ``int32`` array shaped like ``arrivals``.

  Examples:
    >>> from dcasgd_optax.harness import schedules
    >>> schedules.staleness([0, 1, 2, 0, 1, 2, 2], 3)
    array([0, 1, 2, 2, 2, 2, 0], dtype=int32)
  """
  num_workers = extend.check_positive_int("num_workers", num_workers)
  arrivals = np.asarray(arrivals)
  if arrivals.ndim != 1 or not np.issubdtype(arrivals.dtype, np.integer):
    raise ValueError(
        f"`arrivals` must be a 1-D integer array, got shape {arrivals.shape} "
        f"and dtype {arrivals.dtype}."
    )
  if arrivals.size and not (
      0 <= arrivals.min() and arrivals.max() < num_workers
  ):
    raise ValueError(f"`arrivals` must lie in [0, {num_workers}).")
  # Previous arrival of the same worker, via a stable sort by worker id.
  order = np.argsort(arrivals, kind="stable")
  same = arrivals[order[1:]] == arrivals[order[:-1]]
  prev = np.full(arrivals.shape, -1, np.int64)
  prev[order[1:][same]] = order[:-1][same]
  return (np.arange(arrivals.size) - prev - 1).astype(np.int32)


def _trace_field(records: Any, name: str, *, required: bool = True) -> Any:
  """``records[name]`` for a mapping, ``records.name`` otherwise."""
  if isinstance(records, Mapping):
    value = records.get(name)
  else:
    value = getattr(records, name, None)
  if value is None and required:
    raise ValueError(
        f"`records` has no {name!r} field: pass a run's per-update records "
        "(a mapping or an object with `worker` and `step`, like a Ray "
        "`TrainResult.records`)."
    )
  return None if value is None else np.asarray(value)


def _check_trace_steps(step: np.ndarray) -> np.ndarray:
  """The order that sorts ``step``, which must be consecutive and unique."""
  order = np.argsort(step, kind="stable")
  sorted_step = step[order]
  gaps = np.flatnonzero(np.diff(sorted_step) != 1)
  if gaps.size:
    a, b = sorted_step[gaps[0]], sorted_step[gaps[0] + 1]
    what = "two records share" if a == b else "no record has"
    raise ValueError(
        f"`records['step']` must be consecutive server steps, one record "
        f"each: {what} step {a if a == b else a + 1} (a trace from more than "
        "one server, or with records missing?)."
    )
  return order


def from_trace(records: Any, num_workers: int | None = None) -> np.ndarray:
  r"""The arrival order of a real run, from its per-update records.

  A run's records (e.g. ``dcasgd_optax.ray.train(...).records``) say, for
  every update the server applied, whose gradient it was (``worker``) and
  the server step after it (``step``). Sorted by step they are the order in
  which the gradients reached the server:

  .. math::
    a_k = \mathrm{worker}_{\sigma(k)}, \qquad
    \mathrm{step}_{\sigma(0)} < \mathrm{step}_{\sigma(1)} < \dots

  so :meth:`Simulator.replay <dcasgd_optax.harness.Simulator.replay>` with
  these arrivals and the run's batches in the same order
  (``np.argsort(records["step"])`` sorts any other field, e.g. ``seq`` to
  rebuild batch ``k`` as ``data_fn(a_k, seq_k)``) replays exactly what
  happened. The steps must be consecutive (one server, no
  record missing); a trace that starts at step 1 and carries ``staleness``
  must have the staleness the simulator replays (every worker pulls the
  initial model, then right after each push), else it cannot be replayed
  exactly. Records of skipped updates (``skipped``: a non-finite gradient
  the server did not apply) cannot be replayed and are refused.

  Args:
    records: a mapping (or an object with attributes) of 1-D arrays with
      one entry per update: ``worker`` and ``step`` at least; ``staleness``
      and ``skipped`` are checked when present.
    num_workers: the number of workers of the run (>= 1); ``None`` takes the
      largest worker id + 1. Every id must lie in ``[0, num_workers)``.

  Returns:
    An ``int32`` array of worker ids in arrival order, one per record.

  Raises:
    ValueError: for records that do not form one server's trace, or that do
      not match ``num_workers``.

  Examples:
    >>> import numpy as np
    >>> from dcasgd_optax.harness import schedules
    >>> records = {"step": np.array([2, 1, 3, 4]),
    ...            "worker": np.array([0, 1, 1, 0]),
    ...            "staleness": np.array([1, 0, 1, 1])}
    >>> schedules.from_trace(records, num_workers=2)
    array([1, 0, 1, 0], dtype=int32)
  """
  worker, step = _trace_arrays(records)
  skipped = _trace_field(records, "skipped", required=False)
  if skipped is not None and np.any(skipped):
    raise ValueError(
        f"`records` holds {int(np.sum(skipped))} skipped updates (non-finite "
        "gradients the server did not apply); the simulator applies every "
        "arrival, so this trace cannot be replayed exactly."
    )
  if num_workers is None:
    num_workers = int(worker.max()) + 1
  num_workers = extend.check_positive_int("num_workers", num_workers)
  if worker.min() < 0 or worker.max() >= num_workers:
    bad = worker.min() if worker.min() < 0 else worker.max()
    raise ValueError(
        f"`records['worker']` holds worker id {bad}, outside [0, "
        f"{num_workers}) (num_workers={num_workers}): the trace is not of a "
        "run with that many workers."
    )
  order = _check_trace_steps(step)
  arrivals = worker[order].astype(np.int32)
  recorded = _trace_field(records, "staleness", required=False)
  if recorded is not None and step[order[0]] == 1:
    _check_trace_staleness(np.asarray(recorded)[order], arrivals, num_workers)
  return arrivals


def _trace_arrays(records: Any) -> tuple[np.ndarray, np.ndarray]:
  """``records``' worker and step: 1-D integer arrays of one non-zero length."""
  worker = _trace_field(records, "worker")
  step = _trace_field(records, "step")
  for name, x in (("worker", worker), ("step", step)):
    if x.ndim != 1 or not np.issubdtype(x.dtype, np.integer):
      raise ValueError(
          f"`records['{name}']` must be a 1-D integer array, got shape "
          f"{x.shape} and dtype {x.dtype}."
      )
  if worker.shape != step.shape or worker.size == 0:
    raise ValueError(
        "`records['worker']` and `records['step']` must have the same, "
        f"non-zero length, got {worker.size} and {step.size}."
    )
  return worker, step


def _check_trace_staleness(recorded: np.ndarray, arrivals: np.ndarray,
                           num_workers: int) -> None:
  """Raises unless a trace from step 1 has the staleness a replay gives."""
  expected = staleness(arrivals, num_workers)
  mismatch = np.flatnonzero(recorded != expected)
  if mismatch.size:
    k = int(mismatch[0])
    raise ValueError(
        f"`records['staleness']` at step {k + 1} is {recorded[k]}, but the "
        f"simulator would replay {expected[k]} (each worker pulls the "
        "initial model, then right after each of its pushes): the run "
        "cannot be replayed exactly."
    )
