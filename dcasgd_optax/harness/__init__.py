"""Simulated staleness: replay asynchronous (and synchronous) SGD in a process.

The public API is exactly the names imported here.
"""

from dcasgd_optax._src.simulator import SimState
from dcasgd_optax._src.simulator import Simulator
from dcasgd_optax._src.sync import SyncSimulator
from dcasgd_optax.harness import schedules

__all__ = (
    "SimState",
    "Simulator",
    "SyncSimulator",
    "schedules",
)
