"""Arrival orders for :class:`dcasgd_optax.harness.Simulator`.

The public API is exactly the names imported here.
"""

from dcasgd_optax.harness._schedules import cyclic
from dcasgd_optax.harness._schedules import from_trace
from dcasgd_optax.harness._schedules import gamma_speeds
from dcasgd_optax.harness._schedules import shuffled_rounds
from dcasgd_optax.harness._schedules import staleness

__all__ = (
    "cyclic",
    "from_trace",
    "gamma_speeds",
    "shuffled_rounds",
    "staleness",
)
