"""Strict numerics for every test (implicit rank promotion is an error), and
the fixtures the experiments tests share."""

import importlib

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS data dir per test module: mnist5k is prepared once per module."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def config(data_dir):  # pylint: disable=redefined-outer-name
  """The tiny experiment config, reading its data from ``data_dir``.

  Imported here rather than at the top, so that the library's own tests
  never depend on the experiments code being importable.
  """
  c = importlib.import_module("experiments.configs.tiny").get_config()
  c.data_dir = data_dir
  return c
