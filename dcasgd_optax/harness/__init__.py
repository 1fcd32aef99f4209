"""Simulated staleness: replay asynchronous (and synchronous) SGD in a process.

The public API is exactly the names imported here.
"""

from dcasgd_optax.harness import schedules
from dcasgd_optax.harness._simulator import Simulator
from dcasgd_optax.harness._state import SimState
from dcasgd_optax.harness._sync_simulator import SyncSimulator

__all__ = (
    "SimState",
    "Simulator",
    "SyncSimulator",
    "schedules",
)
