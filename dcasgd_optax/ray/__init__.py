"""Asynchronous parameter-server training on Ray (extra ``ray``).

The public API is exactly the names imported here: :func:`train`, what it
returns (:class:`TrainResult`, its :class:`UpdateRecords`) and
:func:`connect`. The actors, the layout and the messages they exchange are
private (``_server``, ``_worker``, ``_layout``, ``_protocol``, ...). Install
with ``pip install 'dcasgd-optax[ray]'``.
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
from dcasgd_optax.ray._records import TrainResult
from dcasgd_optax.ray._records import UpdateRecords
from dcasgd_optax.ray._train import train

__all__ = (
    "TrainResult",
    "UpdateRecords",
    "connect",
    "train",
)
