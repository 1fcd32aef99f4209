"""Asynchronous parameter-server training on Ray (extra ``ray``).

The public API is exactly the names imported here. Install with
``pip install 'dcasgd-optax[ray]'``.
"""

try:
  import orbax.checkpoint as _ocp
  import ray as _ray
except ModuleNotFoundError as e:
  raise ModuleNotFoundError(
      "dcasgd_optax.ray needs Ray and orbax-checkpoint, which are not "
      f"installed ({e}). Install them with `pip install 'dcasgd-optax[ray]'`.",
      name=e.name,
  ) from e
del _ocp, _ray

from dcasgd_optax.ray._cluster import connect
from dcasgd_optax.ray._layout import Layout
from dcasgd_optax.ray._layout import make_layout
from dcasgd_optax.ray._records import UpdateRecords
from dcasgd_optax.ray._server import ApplyInfo
from dcasgd_optax.ray._server import ParameterServer
from dcasgd_optax.ray._server import Pulled
from dcasgd_optax.ray._train import TrainResult
from dcasgd_optax.ray._train import train
from dcasgd_optax.ray._worker import GradientMeta
from dcasgd_optax.ray._worker import GradientWorker

__all__ = (
    "ApplyInfo",
    "GradientMeta",
    "GradientWorker",
    "Layout",
    "ParameterServer",
    "Pulled",
    "TrainResult",
    "UpdateRecords",
    "connect",
    "make_layout",
    "train",
)
