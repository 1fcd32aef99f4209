"""Simulated staleness: replay asynchronous (and synchronous) SGD in a process.

The public API is exactly the names imported here.
"""

from dcasgd_optax.harness import schedules
from dcasgd_optax.harness._clock import TimeToAccuracy
from dcasgd_optax.harness._clock import time_to_accuracy
from dcasgd_optax.harness._multihost import to_host
from dcasgd_optax.harness._simulator import Simulator
from dcasgd_optax.harness._state import SimState
from dcasgd_optax.harness._sync_simulator import SyncSimulator

__all__ = (
    "SimState",
    "Simulator",
    "SyncSimulator",
    "TimeToAccuracy",
    "schedules",
    "time_to_accuracy",
    "to_host",
)
