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


def _trace(arrivals, num_workers, seed=0):
  """Records of a run with these arrivals, shuffled as a driver may log them."""
  order = np.random.default_rng(seed).permutation(len(arrivals))
  steps = np.arange(1, len(arrivals) + 1)
  tau = np.asarray(_staleness_loop(list(arrivals), num_workers))
  return {"step": steps[order], "worker": np.asarray(arrivals)[order],
          "staleness": tau[order], "seq": np.zeros(len(arrivals), np.int64)}


class _AttributeRecords:
  """Records with attribute access only (like a NamedTuple of arrays)."""

  def __init__(self, fields):
    self.__dict__.update(fields)


def test_from_trace_sorts_by_server_step():
  arrivals = schedules.gamma_speeds(5, 80, seed=3, shape=2.0)
  trace = _trace(arrivals, 5)
  out = schedules.from_trace(trace, num_workers=5)
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, arrivals)
  np.testing.assert_array_equal(schedules.from_trace(trace), arrivals)
  np.testing.assert_array_equal(
      schedules.from_trace(_AttributeRecords(trace), 5), arrivals)


def test_from_trace_of_a_resumed_run_starts_at_its_first_step():
  trace = {"step": np.array([12, 11, 13]), "worker": np.array([0, 2, 1]),
           "staleness": np.array([9, 9, 9])}  # not checked: not from step 1
  np.testing.assert_array_equal(schedules.from_trace(trace, 3), [2, 0, 1])


@pytest.mark.parametrize("change,match", [
    (dict(worker=np.array([0, 1, 2, 3])), r"worker id 3, outside \[0, 3\)"),
    (dict(worker=np.array([0, -1, 2, 1])), "worker id -1"),
    (dict(step=np.array([1, 2, 2, 3])), "share step 2"),
    (dict(step=np.array([1, 2, 4, 5])), "no record has step 3"),
    (dict(step=np.array([1.0, 2.0, 3.0, 4.0])), "integer"),
    (dict(step=np.array([1, 2, 3])), "same, non-zero length"),
    (dict(staleness=np.array([0, 1, 2, 0])), "staleness.*step 4"),
    (dict(skipped=np.array([False, True, False, False])), "skipped"),
])
def test_from_trace_rejects_what_cannot_be_replayed(change, match):
  trace = {"step": np.array([1, 2, 3, 4]), "worker": np.array([0, 1, 2, 1]),
           "staleness": np.array([0, 1, 2, 1]), **change}
  with pytest.raises(ValueError, match=match):
    schedules.from_trace(trace, num_workers=3)


def test_from_trace_needs_worker_and_step():
  with pytest.raises(ValueError, match="'worker'"):
    schedules.from_trace({"step": np.arange(1, 4)})


@pytest.mark.parametrize("stragglers", [dict(straggler_prob=0.0),
                                        dict(straggler_prob=0.3,
                                             straggler_slowdown=1.0)])
def test_without_slowdown_stragglers_change_nothing(stragglers):
  plain = schedules.gamma_speeds(4, 200, seed=5, shape=3.0)
  np.testing.assert_array_equal(
      schedules.gamma_speeds(4, 200, seed=5, shape=3.0, **stragglers), plain)


def test_stragglers_make_a_thin_tail_of_long_delays():
  """Near-deterministic workers (shape 10^4): only a straggling gradient
  arrives late, with about slowdown x (M - 1) staleness, as often as p."""
  m, p, slowdown = 4, 0.03, 10.0
  order = schedules.gamma_speeds(m, 6000, seed=1, shape=1e4,
                                 straggler_prob=p, straggler_slowdown=slowdown)
  again = schedules.gamma_speeds(m, 6000, seed=1, shape=1e4,
                                 straggler_prob=p, straggler_slowdown=slowdown)
  np.testing.assert_array_equal(order, again)
  tau = schedules.staleness(order, m)[m:]
  late = tau > 2 * (m - 1)
  # A straggling time spans ~slowdown of the others' times: (M-1) * slowdown
  # arrivals; the share of such arrivals is about p (binomial, 6000 draws).
  assert 0.5 * p < np.mean(late) < 1.5 * p
  assert (
      0.5 * slowdown * (m - 1) < np.median(tau[late]) < 1.5 * slowdown * (m - 1)
  )
  assert np.median(tau[~late]) == m - 1  # the body is untouched


@pytest.mark.parametrize("kwargs", [dict(straggler_prob=-0.1),
                                    dict(straggler_prob=1.5),
                                    dict(straggler_slowdown=0.5)])
def test_bad_straggler_arguments_raise(kwargs):
  with pytest.raises(ValueError, match="straggler"):
    schedules.gamma_speeds(4, 10, seed=0, **kwargs)
