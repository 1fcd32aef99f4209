"""experiments.train: runs, determinism, resume, bad configs, the gradient stream."""

import json
import os
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import compare
from experiments import run_files
from experiments import train


def _without_seconds(history):
  return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_tiny_run_end_to_end_on_the_offline_digits(config, tmp_path):
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["algorithm"] == "dc-asgd-a" and summary["workers"] == 4
  assert summary["epochs"] == 2 and summary["schedule"] == "cyclic"
  assert summary["final_test_error"] < 0.85  # chance is 0.9
  # 16 cyclic arrivals of 4 workers: staleness 0, 1, 2, then 3 for the other 13.
  assert summary["mean_staleness"] == pytest.approx((0 + 1 + 2 + 13 * 3) / 16)
  history = run_files.read_metrics(str(tmp_path))
  assert [r["epoch"] for r in history] == [1, 2]
  assert [r["gradients"] for r in history] == [8, 16]
  with open(tmp_path / "summary.json") as f:
    assert json.load(f) == summary


def test_rerun_is_identical_and_resume_after_interruption_matches(config, tmp_path):
  config.num_epochs = 3
  full = train.train_and_evaluate(config, str(tmp_path / "a"))
  again = train.train_and_evaluate(config, str(tmp_path / "b"))
  history = _without_seconds(run_files.read_metrics(str(tmp_path / "a")))
  assert _without_seconds(run_files.read_metrics(str(tmp_path / "b"))) == history
  assert again["final_test_error"] == full["final_test_error"]

  append = run_files.append_metrics

  def interrupt_after_first_epoch(workdir, record):
    append(workdir, record)
    if record["epoch"] == 1:
      raise KeyboardInterrupt

  with mock.patch.object(run_files, "append_metrics", interrupt_after_first_epoch):
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, str(tmp_path / "c"))
  assert len(run_files.read_metrics(str(tmp_path / "c"))) == 1
  resumed = train.train_and_evaluate(config, str(tmp_path / "c"))
  assert _without_seconds(run_files.read_metrics(str(tmp_path / "c"))) == history
  assert {k: v for k, v in resumed.items() if k != "wall_time"} == {
      k: v for k, v in full.items() if k != "wall_time"
  }


def test_resuming_with_a_different_config_fails(config, tmp_path):
  config.num_epochs = 1
  train.train_and_evaluate(config, str(tmp_path))
  config.learning_rate = 0.5
  with pytest.raises(ValueError, match="different config.*learning_rate"):
    train.train_and_evaluate(config, str(tmp_path))


def test_cifar10_resnet20_path_under_mock_data(config, tmp_path):
  config.dataset, config.model = "cifar10", "resnet20"
  config.batch_size, config.num_epochs, config.num_workers = 16, 1, 2
  config.momentum, config.weight_decay = 0.9, 1e-4
  train.load_dataset.cache_clear()
  try:
    with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
      summary = train.train_and_evaluate(config, str(tmp_path))
  finally:
    train.load_dataset.cache_clear()
  assert summary["workers"] == 2 and summary["epochs"] == 1
  assert np.isfinite(run_files.read_metrics(str(tmp_path))[0]["train_loss"])


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("algorithm", "hogwild", "valid choices: sequential, ssgd, asgd, sa-asgd, "),
        ("algorithm", "dana", "needs config.optimizer='sgd' with config.momentum > 0"),
        ("optimizer", "rmsprop", "valid choices: sgd, adam"),
        ("checkpoint_every_epochs", -1, "checkpoint_every_epochs must be an int >= 0"),
        ("num_workers", 0, "num_workers must be an int >= 1"),
        ("dataset", "imagenet", "valid choices: mnist5k, mnist, fashion_mnist, cifar10"),
        ("schedule", "poisson", "valid choices: cyclic, shuffled, gamma"),
        ("model", "vgg", "valid choices: mlp, small_cnn, resnet20"),
    ],
)
def test_bad_config_values_fail_fast_listing_the_choices(config, tmp_path, field, value, message):
  config[field] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_every_algorithm_uses_the_same_gradients_per_epoch():
  s, epochs = 125, 15
  for m in (1, 4, 16, 32):
    spans = [train.epoch_range(m, s, e) for e in range(epochs)]
    assert all(a == b for (_, a), (b, _) in zip(spans, spans[1:]))  # contiguous
    assert all(abs(stop - (e + 1) * s) < m for e, (_, stop) in enumerate(spans))
    assert all(start % m == 0 and stop % m == 0 for start, stop in spans)
  assert train.epoch_range(1, s, 3) == (375, 500)


def test_gradient_stream_is_a_permutation_per_epoch_and_slices_consistently():
  whole = train.gradient_indices(7, 100, 8, 0, 36)  # 12 gradients per epoch
  assert whole.shape == (36, 8) and whole.dtype == np.int32
  for e in range(3):
    assert len(np.unique(whole[12 * e:12 * (e + 1)])) == 96
  np.testing.assert_array_equal(train.gradient_indices(7, 100, 8, 10, 27), whole[10:27])
  assert not np.array_equal(train.gradient_indices(8, 100, 8, 0, 12), whole[:12])


@pytest.mark.parametrize("schedule", ["cyclic", "shuffled", "gamma"])
def test_schedules_give_mean_staleness_near_m_minus_one(config, schedule):
  config.schedule = schedule
  arrivals = train.arrival_schedule(config, 8, 800)
  assert arrivals.shape == (800,) and np.bincount(arrivals).min() > 50
  staleness = compare.schedules.staleness(arrivals, 8)
  assert abs(staleness[100:].mean() - 7) < 0.5
