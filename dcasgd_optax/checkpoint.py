"""Checkpointing a pytree with orbax (extras ``experiments``, ``ray``).

The one way this project saves and restores state: the experiments save the
simulator's ``SimState``, the Ray parameter server its ``ServerState``. The
public API is exactly the names imported here. Install with
``pip install 'dcasgd-optax[experiments]'`` (or ``[ray]``).
"""

try:
  import orbax.checkpoint as _ocp
except ModuleNotFoundError as e:
  raise ModuleNotFoundError(
      "dcasgd_optax.checkpoint needs orbax-checkpoint, which is not installed "
      f"({e}). Install it with `pip install 'dcasgd-optax[experiments]'`.",
      name=e.name,
  ) from e
del _ocp

from dcasgd_optax._src.checkpoint import Checkpointer
from dcasgd_optax._src.checkpoint import Restored

__all__ = (
    "Checkpointer",
    "Restored",
)
