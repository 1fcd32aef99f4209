"""Checkpointing a pytree with orbax (extras ``experiments``, ``ray``).

The one way the drivers save and restore state: the experiments save the
simulator's ``SimState``, the Ray parameter server its ``ServerState``. An
orbax wrapper for the drivers, not part of the optimizers' API (it was
``dcasgd_optax.checkpoint``, now a deprecated alias of this module). Install
with ``pip install 'dcasgd-optax[experiments]'`` (or ``[ray]``).
"""

try:
  import orbax.checkpoint as _ocp
except ModuleNotFoundError as e:
  raise ModuleNotFoundError(
      "dcasgd_optax.extend.checkpoint needs orbax-checkpoint, which is not "
      f"installed ({e}). Install it with "
      "`pip install 'dcasgd-optax[experiments]'`.",
      name=e.name,
  ) from e
del _ocp

from dcasgd_optax._src.checkpoint import Checkpointer
from dcasgd_optax._src.checkpoint import Restored

__all__ = (
    "Checkpointer",
    "Restored",
)
