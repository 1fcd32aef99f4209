"""Deprecated alias of :mod:`dcasgd_optax.extend.checkpoint` (one release).

Checkpointing is the drivers' tool, not the optimizers' API: import
``Checkpointer`` and ``Restored`` from :mod:`dcasgd_optax.extend.checkpoint`.
"""

import warnings

from dcasgd_optax.extend.checkpoint import Checkpointer
from dcasgd_optax.extend.checkpoint import Restored

warnings.warn(
    "`dcasgd_optax.checkpoint` is deprecated and will be removed in the next "
    "release: import Checkpointer and Restored from "
    "`dcasgd_optax.extend.checkpoint`.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = (
    "Checkpointer",
    "Restored",
)
