"""dcasgd_optax: delay-compensated asynchronous SGD (DC-ASGD) for optax.

The public API is exactly the names imported here (and, deprecated for one
release, the old names in ``_DEPRECATED``).
"""

import warnings as _warnings

from dcasgd_optax._src._backups import DelayCompensationState
from dcasgd_optax._src._kernel_build import build_cpu_kernel
from dcasgd_optax._src.alias import dana_dcasgd
from dcasgd_optax._src.alias import dcasgd
from dcasgd_optax._src.alias import delayed_nesterov_dcasgd
from dcasgd_optax._src.alias import gap_aware_asgd
from dcasgd_optax._src.delay_compensation import delay_compensation
from dcasgd_optax._src.delayed_nesterov import DelayedNesterovState
from dcasgd_optax._src.delayed_nesterov import delayed_nesterov
from dcasgd_optax._src.fisher import fisher_compensation
from dcasgd_optax._src.fisher import fisher_dcasgd
from dcasgd_optax._src.gap_aware import gap_aware
from dcasgd_optax._src.learning_rates import learning_rate_schedule
from dcasgd_optax._src.look_ahead import LookAheadState
from dcasgd_optax._src.look_ahead import look_ahead_momentum
from dcasgd_optax._src.pipemare import ScaleByPipeMareState
from dcasgd_optax._src.pipemare import scale_by_pipemare
from dcasgd_optax._src.pull import pull
from dcasgd_optax._src.pull import record_pull
from dcasgd_optax._src.pull import worker_params
from dcasgd_optax._src.pull_after_push import PullAfterPush
from dcasgd_optax._src.pull_after_push import PullAfterPushState
from dcasgd_optax._src.pull_after_push import pull_after_push
from dcasgd_optax._src.secant import SecantCompensationState
from dcasgd_optax._src.secant import delayed_nesterov_secant_dcasgd
from dcasgd_optax._src.secant import secant_compensation
from dcasgd_optax._src.secant import secant_dcasgd
from dcasgd_optax._src.staleness import ScaleByInverseStalenessState
from dcasgd_optax._src.staleness import ScaleByStalenessState
from dcasgd_optax._src.staleness import scale_by_inverse_staleness
from dcasgd_optax._src.staleness import scale_by_staleness
from dcasgd_optax._src.weight_prediction import LookAheadAdamState
from dcasgd_optax._src.weight_prediction import look_ahead_adam

__version__ = "0.1.0"

__all__ = (
    "DelayCompensationState",
    "DelayedNesterovState",
    "LookAheadAdamState",
    "LookAheadState",
    "PullAfterPush",
    "PullAfterPushState",
    "ScaleByInverseStalenessState",
    "ScaleByPipeMareState",
    "ScaleByStalenessState",
    "SecantCompensationState",
    "build_cpu_kernel",
    "dana_dcasgd",
    "dcasgd",
    "delay_compensation",
    "delayed_nesterov",
    "delayed_nesterov_dcasgd",
    "delayed_nesterov_secant_dcasgd",
    "fisher_compensation",
    "fisher_dcasgd",
    "gap_aware",
    "gap_aware_asgd",
    "learning_rate_schedule",
    "look_ahead_adam",
    "look_ahead_momentum",
    "pull",
    "pull_after_push",
    "record_pull",
    "scale_by_inverse_staleness",
    "scale_by_pipemare",
    "scale_by_staleness",
    "secant_compensation",
    "secant_dcasgd",
    "worker_params",
)

# Old name -> (new name, the function). Served by __getattr__ (PEP 562) with
# a DeprecationWarning, so they are not in __all__ or ``import *``.
_DEPRECATED = {
    "gap_aware_sgd": ("gap_aware_asgd", gap_aware_asgd),
    "dana_dc": ("dana_dcasgd", dana_dcasgd),
}


def __getattr__(name):
  if name in _DEPRECATED:
    new, fn = _DEPRECATED[name]
    _warnings.warn(
        f"`dcasgd_optax.{name}` is deprecated and will be removed in the next "
        f"release: use `dcasgd_optax.{new}` (the same optimizer; every full "
        "optimizer's name now ends in `asgd`).",
        DeprecationWarning,
        stacklevel=2,
    )
    return fn
  raise AttributeError(f"module 'dcasgd_optax' has no attribute {name!r}")
