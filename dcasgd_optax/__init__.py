"""dcasgd_optax: delay-compensated asynchronous SGD (DC-ASGD) for optax.

The public API is exactly the names imported here.
"""

from dcasgd_optax._src._kernel_build import build_cpu_kernel
from dcasgd_optax._src.alias import PullAfterPush
from dcasgd_optax._src.alias import dana_dc
from dcasgd_optax._src.alias import dcasgd
from dcasgd_optax._src.alias import delayed_nesterov_dcasgd
from dcasgd_optax._src.alias import gap_aware_sgd
from dcasgd_optax._src.alias import pull_after_push
from dcasgd_optax._src.delay_compensation import DelayCompensationState
from dcasgd_optax._src.delay_compensation import delay_compensation
from dcasgd_optax._src.delayed_nesterov import DelayedNesterovState
from dcasgd_optax._src.delayed_nesterov import delayed_nesterov
from dcasgd_optax._src.gap_aware import gap_aware
from dcasgd_optax._src.look_ahead import LookAheadState
from dcasgd_optax._src.look_ahead import look_ahead_momentum
from dcasgd_optax._src.pull import pull
from dcasgd_optax._src.pull import record_pull
from dcasgd_optax._src.pull import worker_params
from dcasgd_optax._src.staleness import ScaleByInverseStalenessState
from dcasgd_optax._src.staleness import ScaleByStalenessState
from dcasgd_optax._src.staleness import scale_by_inverse_staleness
from dcasgd_optax._src.staleness import scale_by_staleness

__version__ = "0.1.0"

__all__ = (
    "DelayCompensationState",
    "DelayedNesterovState",
    "LookAheadState",
    "PullAfterPush",
    "ScaleByInverseStalenessState",
    "ScaleByStalenessState",
    "build_cpu_kernel",
    "dana_dc",
    "dcasgd",
    "delay_compensation",
    "delayed_nesterov",
    "delayed_nesterov_dcasgd",
    "gap_aware",
    "gap_aware_sgd",
    "look_ahead_momentum",
    "pull",
    "pull_after_push",
    "record_pull",
    "scale_by_inverse_staleness",
    "scale_by_staleness",
    "worker_params",
)
