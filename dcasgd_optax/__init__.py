"""dcasgd_optax: delay-compensated asynchronous SGD (DC-ASGD) for optax.

The public API is exactly the names imported here.
"""

from dcasgd_optax._src.alias import PullAfterPush
from dcasgd_optax._src.alias import dcasgd
from dcasgd_optax._src.alias import pull_after_push
from dcasgd_optax._src.delay_compensation import DelayCompensationState
from dcasgd_optax._src.delay_compensation import delay_compensation
from dcasgd_optax._src.pull import pull
from dcasgd_optax._src.pull import record_pull
from dcasgd_optax._src.pull import worker_params
from dcasgd_optax._src.staleness import ScaleByInverseStalenessState
from dcasgd_optax._src.staleness import scale_by_inverse_staleness

__version__ = "0.1.0"

__all__ = (
    "DelayCompensationState",
    "PullAfterPush",
    "ScaleByInverseStalenessState",
    "dcasgd",
    "delay_compensation",
    "pull",
    "pull_after_push",
    "record_pull",
    "scale_by_inverse_staleness",
    "worker_params",
)
