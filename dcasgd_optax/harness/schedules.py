"""Arrival orders for :class:`dcasgd_optax.harness.Simulator`.

The public API is exactly the names imported here.
"""

from dcasgd_optax.harness._clock import Timed
from dcasgd_optax.harness._clock import straggler_speeds
from dcasgd_optax.harness._clock import sync_round_times
from dcasgd_optax.harness._clock import timed_cyclic
from dcasgd_optax.harness._clock import timed_gamma
from dcasgd_optax.harness._schedules import cyclic
from dcasgd_optax.harness._schedules import from_trace
from dcasgd_optax.harness._schedules import gamma_speeds
from dcasgd_optax.harness._schedules import shuffled_rounds
from dcasgd_optax.harness._schedules import staleness

__all__ = (
    "Timed",
    "cyclic",
    "from_trace",
    "gamma_speeds",
    "shuffled_rounds",
    "staleness",
    "straggler_speeds",
    "sync_round_times",
    "timed_cyclic",
    "timed_gamma",
)
