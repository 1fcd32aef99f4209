"""experiments.train and experiments.programs: runs, determinism, resume, bad
configs, and the programs a study's runs share."""

import json
import os
from unittest import mock

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import programs
from experiments import run_files
from experiments import train


@pytest.fixture(scope="module")
def cache():
  """The programs this module's runs share (one tiny config compiles once)."""
  return programs.ProgramCache()


def _without_seconds(history):
  return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_tiny_run_end_to_end_on_the_offline_digits(config, tmp_path, cache):
  summary = train.train_and_evaluate(config, str(tmp_path), cache=cache)
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


def test_rerun_is_identical_and_resume_after_interruption_matches(
    config, tmp_path, cache
):
  config.num_epochs = 3
  full = train.train_and_evaluate(config, str(tmp_path / "a"), cache=cache)
  again = train.train_and_evaluate(config, str(tmp_path / "b"), cache=cache)
  history = _without_seconds(run_files.read_metrics(str(tmp_path / "a")))
  assert (
      _without_seconds(run_files.read_metrics(str(tmp_path / "b"))) == history
  )
  assert again["final_test_error"] == full["final_test_error"]

  append = run_files.append_metrics

  def interrupt_after_first_epoch(workdir, record):
    append(workdir, record)
    if record["epoch"] == 1:
      raise KeyboardInterrupt

  with mock.patch.object(
      run_files, "append_metrics", interrupt_after_first_epoch
  ):
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, str(tmp_path / "c"), cache=cache)
  assert len(run_files.read_metrics(str(tmp_path / "c"))) == 1
  resumed = train.train_and_evaluate(config, str(tmp_path / "c"), cache=cache)
  assert (
      _without_seconds(run_files.read_metrics(str(tmp_path / "c"))) == history
  )
  assert {k: v for k, v in resumed.items() if k != "wall_time"} == {
      k: v for k, v in full.items() if k != "wall_time"
  }


def test_resuming_with_a_different_config_fails(config, tmp_path, cache):
  config.num_epochs = 1
  train.train_and_evaluate(config, str(tmp_path), cache=cache)
  config.learning_rate = 0.5
  with pytest.raises(ValueError, match="different config.*learning_rate"):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.slow  # ~18 s: a ResNet-20 compiles
def test_cifar10_resnet20_path_under_mock_data(config, tmp_path):
  config.dataset, config.model = "cifar10", "resnet20"
  config.batch_size, config.num_epochs, config.num_workers = 16, 1, 2
  config.momentum, config.weight_decay = 0.9, 1e-4
  with tfds.testing.mock_data(
      num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["workers"] == 2 and summary["epochs"] == 1
  assert np.isfinite(run_files.read_metrics(str(tmp_path))[0]["train_loss"])


@pytest.mark.parametrize(
    "field,value,message",
    [
        (
            "algorithm",
            "hogwild",
            "valid choices: sequential, ssgd, asgd, sa-asgd, ",
        ),
        (
            "algorithm",
            "dana",
            "needs config.optimizer='sgd' with config.momentum > 0",
        ),
        ("optimizer", "rmsprop", "valid choices: sgd, adam"),
        (
            "checkpoint_every_epochs",
            -1,
            "checkpoint_every_epochs must be an int >= 0",
        ),
        ("num_workers", 0, "num_workers must be an int >= 1"),
        (
            "dataset",
            "imagenet",
            "valid choices: mnist5k, mnist, fashion_mnist, cifar10",
        ),
        ("schedule", "poisson", "valid choices: cyclic, shuffled, gamma"),
        ("model", "vgg", "valid choices: mlp, small_cnn, resnet20"),
    ],
)
def test_bad_config_values_fail_fast_listing_the_choices(
    config, tmp_path, field, value, message
):
  config[field] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_runs_sharing_a_cache_reuse_one_program_and_get_the_same_results(
    config, tmp_path, cache
):
  config.num_epochs = 1
  other = ml_collections.ConfigDict(config.to_dict())
  other.seed, other.learning_rate, other.schedule = 1, 0.05, "gamma"
  train.train_and_evaluate(config, str(tmp_path / "a"), cache=cache)
  shared = train.train_and_evaluate(other, str(tmp_path / "b"), cache=cache)
  # The seed, the arrivals and the injected learning rate are data, not code.
  assert cache.program(other) is cache.program(config)
  more = ml_collections.ConfigDict(config.to_dict())
  more.num_workers = 2
  assert cache.program(more) is not cache.program(config)
  alone = train.train_and_evaluate(
      other, str(tmp_path / "c")
  )  # a program of its own
  assert _without_seconds(run_files.read_metrics(str(tmp_path / "b"))) == (
      _without_seconds(run_files.read_metrics(str(tmp_path / "c")))
  )
  assert shared["final_test_error"] == alone["final_test_error"]


def test_a_program_cache_keeps_the_most_recent_programs(config):
  config.num_epochs = 1
  cache = programs.ProgramCache(size=1)
  first = cache.program(config)
  two = ml_collections.ConfigDict(config.to_dict())
  two.num_workers = 2
  assert cache.program(two) is not first
  assert cache.program(config) is not first  # evicted, rebuilt
  assert cache.dataset(config) is cache.dataset(two)  # datasets are kept
  with pytest.raises(ValueError, match="size must be an int >= 1, got 0"):
    programs.ProgramCache(size=0)
