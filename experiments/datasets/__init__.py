"""TFDS dataset builders shipped with the experiments.

Importing this package registers every builder in it with TFDS, so that
``tfds.data_source('<name>', data_dir=...)`` finds them by name.
"""

from experiments.datasets.mnist5k.mnist5k import Mnist5k

__all__ = ("Mnist5k",)
