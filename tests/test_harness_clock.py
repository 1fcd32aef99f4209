"""The simulated clock: arrival times, synchronous rounds, time to accuracy,
against an event loop that draws one compute time at a time."""

import heapq

import numpy as np
import pytest

from dcasgd_optax.harness import TimeToAccuracy
from dcasgd_optax.harness import schedules
from dcasgd_optax.harness import time_to_accuracy


def event_loop(num_workers, num_arrivals, seed, shape, speeds, prob,
               slowdown):
  """Each worker draws its next compute time when it starts it (the
  documented model: T = S G, G ~ Gamma(k, 1/(k s_m)), S = f w.p. p); the
  next arrival is the earliest finish (ties by worker id)."""
  root = np.random.SeedSequence(seed)
  gammas = [np.random.default_rng(s) for s in root.spawn(num_workers)]
  coins = [np.random.default_rng(s) for s in root.spawn(num_workers)]

  def draw(m):
    t = gammas[m].gamma(shape, 1.0 / (shape * speeds[m]))
    if prob > 0 and coins[m].random() < prob:
      t *= slowdown
    return t

  heap = [(draw(m), m) for m in range(num_workers)]
  heapq.heapify(heap)
  arrivals, times = [], []
  while len(arrivals) < num_arrivals:
    t, m = heapq.heappop(heap)
    arrivals.append(m)
    times.append(t)
    heapq.heappush(heap, (t + draw(m), m))
  return np.array(arrivals), np.array(times)


CASES = [
    dict(num_workers=4, shape=100.0, speeds=None, prob=0.0, slowdown=10.0),
    dict(num_workers=5, shape=2.0, speeds=[1.0, 2.0, 1.0, 0.5, 1.0],
         prob=0.1, slowdown=20.0),
]


@pytest.mark.parametrize("case", CASES)
def test_timed_gamma_matches_an_event_loop(case):
  m = case["num_workers"]
  speeds = np.ones(m) if case["speeds"] is None else case["speeds"]
  timed = schedules.timed_gamma(
      m, 200, 3, shape=case["shape"], speeds=case["speeds"],
      straggler_prob=case["prob"], straggler_slowdown=case["slowdown"])
  arrivals, times = event_loop(m, 200, 3, case["shape"], speeds,
                               case["prob"], case["slowdown"])
  np.testing.assert_array_equal(timed.arrivals, arrivals)
  np.testing.assert_allclose(timed.times, times, rtol=1e-12)
  assert timed.arrivals.dtype == np.int32 and timed.times.dtype == np.float64
  np.testing.assert_array_equal(  # the order gamma_speeds gives
      timed.arrivals, schedules.gamma_speeds(
          m, 200, 3, shape=case["shape"], speeds=case["speeds"],
          straggler_prob=case["prob"], straggler_slowdown=case["slowdown"]))


@pytest.mark.parametrize("case", CASES)
def test_sync_rounds_wait_for_the_slowest_of_the_same_draws(case):
  """Round r lasts max over workers of their r-th compute time, the same
  draws whose running sums are the asynchronous clock's times."""
  m, rounds = case["num_workers"], 6
  kwargs = dict(shape=case["shape"], speeds=case["speeds"],
                straggler_prob=case["prob"],
                straggler_slowdown=case["slowdown"])
  timed = schedules.timed_gamma(m, 400, 7, **kwargs)
  draws = np.stack([  # worker w's first compute times, from its arrivals
      np.diff(timed.times[timed.arrivals == w][:rounds], prepend=0.0)
      for w in range(m)])
  want = np.cumsum(draws.max(axis=0))
  got = schedules.sync_round_times(m, rounds, 7, **kwargs)
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_timed_cyclic_lands_each_round_one_unit_later():
  timed = schedules.timed_cyclic(3, 8)
  np.testing.assert_array_equal(timed.arrivals, schedules.cyclic(3, 8))
  np.testing.assert_array_equal(timed.times, [1, 1, 1, 2, 2, 2, 3, 3])
  # Its clock agrees with synchronous rounds of constant compute times.
  np.testing.assert_array_equal(schedules.sync_round_times(3, 2),
                                timed.times[2::3])


def test_a_slow_worker_sets_the_pace_of_synchronous_rounds_only():
  speeds = schedules.straggler_speeds(8, num_slow=2, slowdown=4.0)
  np.testing.assert_array_equal(speeds, [1, 1, 1, 1, 1, 1, 0.25, 0.25])
  sync = schedules.sync_round_times(8, 10, 0, speeds=speeds)
  timed = schedules.timed_gamma(8, 80, 0, speeds=speeds)
  # 10 rounds (80 gradients) take ~40 units; 80 asynchronous arrivals ~12.
  assert 38 < sync[-1] < 44 and 11 < timed.times[-1] < 14


def test_stragglers_without_a_seed_raise():
  with pytest.raises(ValueError, match="seed"):
    schedules.sync_round_times(4, 3, straggler_prob=0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_workers=4, num_slow=5), "num_slow"),
    (dict(num_workers=4, slowdown=0.5), "slowdown"),
    (dict(num_workers=0), "num_workers"),
])
def test_bad_straggler_speeds_raise(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    schedules.straggler_speeds(**kwargs)


def first_reached(errors, times, gradients, target):
  for i, e in enumerate(errors):
    if e <= target:
      return True, times[i], gradients[i], i
  return False, float("inf"), -1, -1


def test_time_to_accuracy_is_the_first_evaluation_at_the_target():
  rng = np.random.default_rng(0)
  for _ in range(20):
    errors = rng.uniform(0.0, 1.0, 6)
    errors[rng.integers(0, 6)] = np.nan
    times = np.cumsum(rng.uniform(0.5, 2.0, 6))
    gradients = 32 * np.arange(1, 7)
    target = float(rng.uniform(0.0, 0.5))
    got = time_to_accuracy(errors, times, gradients, target)
    assert isinstance(got, TimeToAccuracy)
    assert tuple(got) == first_reached(errors, times, gradients, target)


def test_time_to_accuracy_counts_an_error_equal_to_the_target():
  got = time_to_accuracy([0.3, 0.2, 0.1], [1.0, 2.0, 3.0], [4, 8, 12], 0.2)
  assert got == TimeToAccuracy(True, 2.0, 8, 1)


def test_time_to_accuracy_not_reached():
  got = time_to_accuracy([0.3, np.nan, 0.25], [1.0, 2.0, 3.0], [1, 2, 3], 0.2)
  assert got == TimeToAccuracy(False, float("inf"), -1, -1)


@pytest.mark.parametrize("args, match", [
    (([0.1, 0.2], [1.0], [1, 2], 0.1), "times"),
    (([0.1, 0.2], [2.0, 1.0], [1, 2], 0.1), "times"),
    (([0.1, 0.2], [1.0, 2.0], [1.0, 2.0], 0.1), "gradients"),
    (([0.1, 0.2], [1.0, 2.0], [2, 1], 0.1), "gradients"),
    (([[0.1]], [[1.0]], [[1]], 0.1), "errors"),
    (([0.1], [1.0], [1], -0.1), "target"),
])
def test_time_to_accuracy_bad_input_raises(args, match):
  with pytest.raises((ValueError, TypeError), match=match):
    time_to_accuracy(*args)
