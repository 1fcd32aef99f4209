"""Arrival schedules: shapes, determinism and the staleness each produces."""

import numpy as np
import pytest

from dcasgd_optax.harness import schedules


def _staleness_loop(arrivals, num_workers):
  """Obviously-correct reference: count updates since each worker's pull."""
  last_pull, out = [0] * num_workers, []
  for k, m in enumerate(arrivals):
    out.append(k - last_pull[m])
    last_pull[m] = k + 1
  return out


def test_cyclic_is_round_robin_with_staleness_m_minus_1():
  order = schedules.cyclic(5, 23)
  assert order.dtype == np.int32 and order.shape == (23,)
  np.testing.assert_array_equal(order, np.arange(23) % 5)
  tau = schedules.staleness(order, 5)
  np.testing.assert_array_equal(tau[:5], np.arange(5))
  assert np.all(tau[5:] == 4)


def test_shuffled_rounds_are_permutations_and_deterministic():
  order = schedules.shuffled_rounds(6, 10, seed=3)
  assert order.dtype == np.int32 and order.shape == (60,)
  for r in range(10):
    assert sorted(order[6 * r : 6 * r + 6].tolist()) == list(range(6))
  np.testing.assert_array_equal(order, schedules.shuffled_rounds(6, 10, seed=3))
  assert not np.array_equal(order, schedules.shuffled_rounds(6, 10, seed=4))
  tau = schedules.staleness(order, 6)
  assert tau.max() <= 2 * 6 - 2
  assert schedules.shuffled_rounds(6, 0, seed=0).shape == (0,)


def test_gamma_speeds_is_deterministic_and_follows_speeds():
  speeds = [1.0, 1.0, 2.0, 4.0]
  order = schedules.gamma_speeds(4, 800, seed=7, speeds=speeds)
  assert order.dtype == np.int32 and order.shape == (800,)
  np.testing.assert_array_equal(
      order, schedules.gamma_speeds(4, 800, seed=7, speeds=speeds)
  )
  share = np.bincount(order, minlength=4) / 800
  np.testing.assert_allclose(share, np.array(speeds) / 8, atol=0.02)


def test_gamma_speeds_equal_speeds_average_staleness_m_minus_1():
  order = schedules.gamma_speeds(8, 2000, seed=0, shape=1e4)
  tau = schedules.staleness(order, 8)[8:]
  assert abs(tau.mean() - 7) < 0.1
  assert np.mean(np.abs(tau - 7) <= 2) > 0.9


def test_gamma_speeds_is_a_prefix_of_a_longer_run():
  short = schedules.gamma_speeds(3, 50, seed=1, shape=2.0)
  long = schedules.gamma_speeds(3, 5000, seed=1, shape=2.0)
  # The events are the same; only how many are drawn differs.
  np.testing.assert_array_equal(short, long[:50])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_staleness_matches_a_loop(seed):
  order = np.random.default_rng(seed).integers(0, 5, 200)
  np.testing.assert_array_equal(
      schedules.staleness(order, 5), _staleness_loop(order.tolist(), 5)
  )


@pytest.mark.parametrize(
    "call",
    [
        lambda: schedules.cyclic(0, 3),
        lambda: schedules.cyclic(2, -1),
        lambda: schedules.shuffled_rounds(2, -1, seed=0),
        lambda: schedules.gamma_speeds(3, 10, seed=0, shape=0.0),
        lambda: schedules.gamma_speeds(3, 10, seed=0, speeds=[1.0, 2.0]),
        lambda: schedules.gamma_speeds(2, 10, seed=0, speeds=[1.0, -2.0]),
        lambda: schedules.staleness([0, 3], 3),
        lambda: schedules.staleness([0.0, 1.0], 3),
    ],
)
def test_bad_arguments_raise(call):
  with pytest.raises(ValueError):
    call()


@pytest.mark.parametrize("seed", [None, 1.5, -1])
def test_seeded_schedules_need_a_reproducible_seed(seed):
  with pytest.raises((TypeError, ValueError), match="seed"):
    schedules.shuffled_rounds(3, 2, seed=seed)
  with pytest.raises((TypeError, ValueError), match="seed"):
    schedules.gamma_speeds(3, 10, seed=seed)
