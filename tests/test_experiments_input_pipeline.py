"""experiments.input_pipeline: the gradient stream, epochs and arrivals."""

import jax
import numpy as np
import pytest

from dcasgd_optax.harness import schedules
from experiments import data
from experiments import input_pipeline


def test_every_algorithm_uses_the_same_gradients_per_epoch():
  s, epochs = 125, 15
  for m in (1, 4, 16, 32):
    spans = [input_pipeline.epoch_range(m, s, e) for e in range(epochs)]
    assert all(a == b for (_, a), (b, _) in zip(spans, spans[1:]))  # contiguous
    assert all(abs(stop - (e + 1) * s) < m for e, (_, stop) in enumerate(spans))
    assert all(start % m == 0 and stop % m == 0 for start, stop in spans)
  assert input_pipeline.epoch_range(1, s, 3) == (375, 500)


def test_gradient_stream_is_a_permutation_per_epoch_and_slices_consistently():
  whole = input_pipeline.gradient_indices(
      7, 100, 8, 0, 36
  )  # 12 gradients per epoch
  assert whole.shape == (36, 8) and whole.dtype == np.int32
  for e in range(3):
    assert len(np.unique(whole[12 * e:12 * (e + 1)])) == 96
  np.testing.assert_array_equal(
      input_pipeline.gradient_indices(7, 100, 8, 10, 27), whole[10:27]
  )
  assert not np.array_equal(
      input_pipeline.gradient_indices(8, 100, 8, 0, 12), whole[:12]
  )


@pytest.mark.parametrize("schedule", ["cyclic", "shuffled", "gamma"])
def test_schedules_give_mean_staleness_near_m_minus_one(config, schedule):
  config.schedule = schedule
  arrivals = input_pipeline.arrival_schedule(config, 8, 800)
  assert arrivals.shape == (800,) and np.bincount(arrivals).min() > 50
  staleness = schedules.staleness(arrivals, 8)
  assert abs(staleness[100:].mean() - 7) < 0.5


def _dataset(n, augment):
  images = np.zeros((n, 2, 2, 1), np.float32)
  return data.Dataset("toy", images, np.zeros(n, np.int32), images[:1],
                      np.zeros(1, np.int32), num_classes=2, augment=augment)


@pytest.mark.parametrize("augment", [False, True])
def test_batches_are_the_streams_indices_and_fold_in_keys(augment):
  rng = jax.random.key(3)
  batches = input_pipeline.batches(_dataset(100, augment), 7, 8, rng, 10, 27)
  np.testing.assert_array_equal(
      batches["idx"], input_pipeline.gradient_indices(7, 100, 8, 10, 27))
  assert ("key" in batches) == augment
  if augment:  # gradient g's key is fold_in(rng, g), one at a time
    for i, g in enumerate(range(10, 27)):
      np.testing.assert_array_equal(
          jax.random.key_data(batches["key"][i]),
          jax.random.key_data(jax.random.fold_in(rng, g)))


def test_more_examples_per_batch_than_the_dataset_holds_fails():
  with pytest.raises(ValueError, match="batch_size=64 exceeds the 50 training"):
    input_pipeline.steps_per_epoch(50, 64)
