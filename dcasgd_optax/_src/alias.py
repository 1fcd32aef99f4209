"""Full optimizers: each method with weight decay, SGD and pull after push.

Naming: every full optimizer is an asynchronous SGD server's update (it
needs ``worker=`` and records the worker's pull), so every name ends in
``asgd``, and what it adds to ASGD reads before it, as the literature's
"DC-ASGD" does: :func:`dcasgd` (delay compensation), :func:`gap_aware_asgd`,
:func:`dana_dcasgd` (DANA's look-ahead on DC-ASGD),
:func:`delayed_nesterov_dcasgd` (and, in their own modules,
``fisher_dcasgd``, ``secant_dcasgd`` and ``delayed_nesterov_secant_dcasgd``).
optax names its optimizers by what they are (``adamw`` is Adam with
decoupled weight decay) and its building blocks by what they do; so do
the transformations here (:func:`delay_compensation`, :func:`gap_aware`,
...). ``gap_aware_sgd`` and ``dana_dc`` are deprecated aliases (one
release).
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import optax

from dcasgd_optax._src import _checks
from dcasgd_optax._src import _cpu_kernel
from dcasgd_optax._src import _fused
from dcasgd_optax._src._backups import MeanSquareSpec
from dcasgd_optax._src.delay_compensation import compensation_correction
from dcasgd_optax._src.delay_compensation import default_lambda
from dcasgd_optax._src.delay_compensation import delay_compensation
from dcasgd_optax._src.delayed_nesterov import delayed_nesterov
from dcasgd_optax._src.gap_aware import gap_aware
from dcasgd_optax._src.gap_aware import gap_correction
from dcasgd_optax._src.look_ahead import look_ahead_momentum
from dcasgd_optax._src.pull_after_push import PullAfterPush
from dcasgd_optax._src.pull_after_push import pull_after_push


def dcasgd(
    learning_rate: optax.ScalarOrSchedule,
    num_workers: int,
    *,
    lambda_: jax.typing.ArrayLike | None = None,
    adaptive: bool = True,
    decay: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-7,
    momentum: float | None = None,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    backup_dtype: jax.typing.DTypeLike | None = None,
    per_worker_mean_square: bool = False,
    bias_correction: bool = False,
    lambda_warmup: jax.typing.ArrayLike = 0,
    correction_clip: jax.typing.ArrayLike | None = None,
) -> PullAfterPush:
  r"""DC-ASGD as one optimizer, with the worker's pull recorded after its push.

  Chains :func:`delay_compensation`, ``optax.add_decayed_weights`` (when
  ``weight_decay > 0``) and ``optax.sgd``, so for worker ``m``

  .. math::
    w \leftarrow w - \eta \, (g + \lambda \, g \odot g \odot (w - b_m)
    + \mathrm{wd} \cdot w), \qquad b_m \leftarrow w

  (with momentum applied to the bracket when ``momentum`` is set). The last
  step is Algorithm 1's pull right after push: ``update`` writes
  ``params + updates`` into worker ``m``'s backup. If your workers pull at
  other times, use :func:`delay_compensation` in your own chain and call
  :func:`pull` when they do.

  The state is the chain's; the update gives the chain's numbers but is
  fused: each parameter is read and written once per update instead of once
  per chain member. On CPU, float32 parameters go through a C++ kernel
  (an XLA FFI call on all of XLA's threads): the first update compiles it
  with the system compiler (a few seconds, once per machine) into a
  private cache, ``$DCASGD_OPTAX_CACHE_DIR`` or ``~/.cache/dcasgd_optax``;
  :func:`build_cpu_kernel` does it ahead of time. Without a compiler, or
  if the build or load fails, a warning says so and XLA's slower blocked
  loop gives the same numbers (``DCASGD_OPTAX_CPU_KERNEL=0`` chooses it).
  Costs: ``benchmarks/update_cost.md``.

  A traced ``worker`` outside ``[0, num_workers)`` leaves the backups and
  DC-ASGD-a's statistics as they were, but the update is NaN and, with
  momentum, so is the momentum buffer from then on: loud, not silent. A
  concrete out-of-range id raises ``ValueError``.

  Args:
    learning_rate: a float or an optax schedule.
    num_workers: number of asynchronous workers (>= 1).
    lambda_: compensation strength; ``None`` picks the paper's defaults, 2.0
      for DC-ASGD-a and 0.04 for DC-ASGD-c.
    adaptive: DC-ASGD-a (default) or DC-ASGD-c.
    decay: DC-ASGD-a's mean-square decay, in [0, 1).
    eps: DC-ASGD-a's epsilon, > 0.
    momentum: heavy-ball momentum in [0, 1), or ``None`` for plain SGD.
    nesterov: use Nesterov momentum.
    weight_decay: L2 coefficient added to the compensated gradient, >= 0.
    backup_dtype: dtype of the per-worker backups (see
      :func:`delay_compensation`).
    per_worker_mean_square: DC-ASGD-a with one MeanSquare per worker, as the
      authors' code (see :func:`delay_compensation`).
    bias_correction: DC-ASGD-a's MeanSquare divided by :math:`1 - d^t`.
    lambda_warmup: ramp λ up over this many updates (0: none).
    correction_clip: bound the term by ``correction_clip * |g|`` per
      coordinate (``None``: no bound).

  Returns:
    A :class:`PullAfterPush` (an ``optax.GradientTransformationExtraArgs``);
    ``update`` needs ``params`` and the keyword ``worker``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> params = {'w': jnp.array([1.0, -1.0])}
    >>> tx = dcasgd_optax.dcasgd(0.1, num_workers=4, momentum=0.9)
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum(p['w'] ** 2))(params)
    >>> updates, state = tx.update(grads, state, params, worker=3)
    >>> params = optax.apply_updates(params, updates)
    >>> params['w']
    Array([ 0.8, -0.8], dtype=float32)
    >>> dcasgd_optax.worker_params(state, 3)['w']  # worker 3 pulled the result
    Array([ 0.8, -0.8], dtype=float32)
  """
  _check_sgd_arguments(learning_rate, momentum, nesterov, weight_decay)
  compensation = _compensation(
      num_workers, lambda_, adaptive, decay, eps, backup_dtype,
      per_worker_mean_square, bias_correction, lambda_warmup,
      correction_clip,
  )
  composed = compensated_sgd(
      compensation, learning_rate, momentum, nesterov, weight_decay)
  correct = compensation_correction(
      default_lambda(lambda_, adaptive), adaptive=adaptive, decay=decay,
      eps=eps, bias_correction=bias_correction, lambda_warmup=lambda_warmup,
      correction_clip=correction_clip,
  )
  stats = MeanSquareSpec(decay if adaptive else None, per_worker_mean_square)
  return _fused.fused_sgd(
      composed, num_workers, stats, correct,
      _sgd_tail(learning_rate, momentum, nesterov, weight_decay),
      _cpu_kernel.Compensation(
          default_lambda(lambda_, adaptive), adaptive, eps, bias_correction,
          lambda_warmup, correction_clip,
      ),
  )


def compensated_sgd(
    compensation: optax.GradientTransformationExtraArgs,
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None,
    nesterov: bool,
    weight_decay: optax.ScalarOrSchedule,
) -> PullAfterPush:
  """``compensation``, L2 weight decay and ``optax.sgd``, chained, with the
  worker's pull after its push: the composed form of every full optimizer
  (arguments checked by the caller)."""
  return pull_after_push(optax.chain(
      compensation,
      *_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  ), compensation=compensation)


def compensated_delayed_nesterov(
    compensation: optax.GradientTransformationExtraArgs,
    learning_rate: optax.ScalarOrSchedule,
    period: int,
    momentum: jax.typing.ArrayLike,
    momentum_activation: jax.typing.ArrayLike,
    weight_decay: optax.ScalarOrSchedule,
) -> PullAfterPush:
  """``compensation``, L2 weight decay and :func:`delayed_nesterov`, chained,
  with the worker's pull after its push (arguments checked by the caller,
  ``period`` and the momentum by :func:`delayed_nesterov`)."""
  return pull_after_push(optax.chain(
      compensation,
      *_decayed_weights(weight_decay),
      delayed_nesterov(learning_rate, period, momentum=momentum,
                       momentum_activation=momentum_activation),
  ), compensation=compensation)


def _sgd_tail(learning_rate, momentum, nesterov, weight_decay):
  wd = weight_decay if _decayed_weights(weight_decay) else None
  return _fused.SgdTail(learning_rate, momentum, nesterov, wd)


def _compensation(
    num_workers, lambda_, adaptive, decay, eps, backup_dtype,
    per_worker_mean_square, bias_correction, lambda_warmup, correction_clip,
) -> optax.GradientTransformationExtraArgs:
  """:func:`delay_compensation` from a full optimizer's arguments, in order."""
  return delay_compensation(
      num_workers, lambda_, adaptive=adaptive, decay=decay, eps=eps,
      backup_dtype=backup_dtype, per_worker_mean_square=per_worker_mean_square,
      bias_correction=bias_correction, lambda_warmup=lambda_warmup,
      correction_clip=correction_clip,
  )


def _check_sgd_arguments(learning_rate, momentum, nesterov, weight_decay):
  if not isinstance(nesterov, bool):
    raise TypeError(f"`nesterov` must be a bool, got {nesterov!r}.")
  if nesterov and momentum is None:
    raise ValueError("`nesterov=True` needs `momentum` (a float in [0, 1)).")
  if momentum is not None:
    _checks.check_scalar_range("momentum", momentum, low=0.0, high=1.0)
  _check_common_arguments(learning_rate, weight_decay)


def _check_common_arguments(learning_rate, weight_decay):
  _checks.check_scalar_range(
      "weight_decay", weight_decay, low=0.0, allow_schedule=True
  )
  if not callable(learning_rate):
    _checks.check_scalar_range("learning_rate", learning_rate, low=0.0)


def _decayed_weights(weight_decay: Any) -> list[optax.GradientTransformation]:
  """``[add_decayed_weights(weight_decay)]``, or ``[]`` for a static zero."""
  # Only a static Python zero drops the term: under inject_hyperparams the
  # value is an array (concrete in init, traced in a jitted update), and the
  # chain must have the same structure in both.
  if isinstance(weight_decay, numbers.Real) and weight_decay == 0:
    return []
  return [optax.add_decayed_weights(weight_decay)]


def gap_aware_asgd(
    learning_rate: optax.ScalarOrSchedule,
    num_workers: int,
    *,
    momentum: float | None = None,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    step_size: jax.typing.ArrayLike | None = None,
    decay: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    backup_dtype: jax.typing.DTypeLike | None = None,
) -> PullAfterPush:
  r"""Gap-Aware ASGD as one optimizer, with the pull after each push.

  Chains :func:`gap_aware`, ``optax.add_decayed_weights`` (when
  ``weight_decay > 0``) and ``optax.sgd``: the stale gradient is divided per
  coordinate by :math:`1 + |w - b_m| / C`, then weight decay and SGD (with
  momentum when set) apply, and worker ``m`` pulls the result. Like
  :func:`dcasgd`, the update is fused (the chain's numbers in one pass).

  Args:
    learning_rate: a float or an optax schedule.
    num_workers: number of asynchronous workers (>= 1).
    momentum: heavy-ball momentum in [0, 1), or ``None`` for plain SGD.
    nesterov: use Nesterov momentum.
    weight_decay: L2 coefficient added after the penalty, >= 0 (so the
      decay term is not damped; FTPipe divides it by the penalty too).
    step_size: :math:`\eta_{\max}` of :func:`gap_aware`, the size of a
      typical step per unit of gradient RMS. ``None`` takes
      ``learning_rate / (1 - momentum)`` (momentum's steady-state step);
      required when ``learning_rate`` is a schedule (pass its peak).
    decay: the gradient second moment's decay, in [0, 1).
    eps: keeps :math:`C` positive, > 0.
    backup_dtype: dtype of the per-worker backups.

  Returns:
    A :class:`PullAfterPush`; ``update`` needs ``params`` and ``worker``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dcasgd_optax
    >>> tx = dcasgd_optax.gap_aware_asgd(0.1, num_workers=4, momentum=0.9)
    >>> state = tx.init({'w': jnp.ones(2)})
    >>> updates, state = tx.update(  # fresh: no gap, plain SGD
    ...     {'w': jnp.ones(2)}, state, {'w': jnp.ones(2)}, worker=1)
    >>> updates['w']
    Array([-0.1, -0.1], dtype=float32)

  References:
    Barkai, Hakimi, Schuster, `Gap-Aware Mitigation of Gradient Staleness
    <https://arxiv.org/abs/1909.10802>`_, ICLR 2020.
  """
  _check_sgd_arguments(learning_rate, momentum, nesterov, weight_decay)
  if step_size is None:
    if callable(learning_rate):
      raise ValueError(
          "`step_size` is required when `learning_rate` is a schedule: pass "
          "the schedule's peak (divided by 1 - momentum with momentum)."
      )
    step_size = learning_rate / (1.0 - (momentum or 0.0))
  compensation = gap_aware(num_workers, step_size, decay=decay, eps=eps,
                           backup_dtype=backup_dtype)
  composed = compensated_sgd(
      compensation, learning_rate, momentum, nesterov, weight_decay)
  return _fused.fused_sgd(
      composed, num_workers, MeanSquareSpec(decay),
      gap_correction(step_size, decay=decay, eps=eps),
      _sgd_tail(learning_rate, momentum, nesterov, weight_decay),
  )


def dana_dcasgd(
    learning_rate: optax.ScalarOrSchedule,
    num_workers: int,
    *,
    momentum: jax.typing.ArrayLike = 0.9,
    horizon: jax.typing.ArrayLike | None = None,
    lambda_: jax.typing.ArrayLike | None = None,
    adaptive: bool = True,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    decay: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-7,
    backup_dtype: jax.typing.DTypeLike | None = None,
    per_worker_mean_square: bool = False,
    bias_correction: bool = False,
    lambda_warmup: jax.typing.ArrayLike = 0,
    correction_clip: jax.typing.ArrayLike | None = None,
) -> PullAfterPush:
  r"""DANA-DC: delay compensation, momentum SGD, and look-ahead pulls.

  Chains :func:`delay_compensation`, ``optax.add_decayed_weights`` (when
  ``weight_decay > 0``) and :func:`look_ahead_momentum`, with the pull after
  each push: worker ``m`` receives the model ``horizon`` momentum steps
  ahead, :math:`\hat w = w - \eta \sum_{k=1}^{H} \mu^k v`, computes its
  gradient there, and the compensation term uses :math:`w - \hat w`.
  ``lambda_=0`` gives the look-ahead alone (DANA with one momentum buffer).

  Args:
    learning_rate: a float or an optax schedule.
    num_workers: number of asynchronous workers (>= 1).
    momentum: heavy-ball momentum, in (0, 1) (the look-ahead needs it).
    horizon: updates to look ahead, >= 0; ``None`` is ``num_workers - 1``,
      the staleness of cyclic arrivals (so one worker gets plain heavy-ball
      momentum, no look-ahead). ``horizon=1`` sends
      :math:`w - \eta \mu v`: with one worker that is Nesterov's momentum,
      which DANA reduces to; with more, DANA's per-worker buffers have no
      exact counterpart in the one shared buffer used here.
    lambda_: compensation strength (``None``: the variant's default).
    adaptive: DC-ASGD-a (default) or DC-ASGD-c.
    weight_decay: L2 coefficient added to the compensated gradient, >= 0.
    decay: as in :func:`delay_compensation`, and so are ``eps``,
      ``backup_dtype``, ``per_worker_mean_square``, ``bias_correction``,
      ``lambda_warmup`` and ``correction_clip``.

  Returns:
    A :class:`PullAfterPush`; ``update`` needs ``params`` and ``worker``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> tx = dcasgd_optax.dana_dcasgd(1.0, num_workers=3, momentum=0.5)
    >>> params = {'w': jnp.zeros(1)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(1)}, state, params, worker=0)
    >>> optax.apply_updates(params, updates)['w']
    Array([-1.], dtype=float32)
    >>> dcasgd_optax.worker_params(state, 0)['w']  # -1 - (0.5 + 0.25) * v
    Array([-1.75], dtype=float32)

  References:
    Hakimi, Barkai, Gabel, Schuster, `Taming Momentum in a Distributed
    Asynchronous Environment <https://arxiv.org/abs/1907.11612>`_, 2019.
    Zheng et al., `Asynchronous Stochastic Gradient Descent with Delay
    Compensation <https://arxiv.org/abs/1609.08326>`_, ICML 2017.
  """
  if momentum is None:
    raise ValueError(
        "`momentum` is None: the look-ahead pull is read from the momentum "
        "buffer; pass a momentum in (0, 1), or use `dcasgd` without one."
    )
  num_workers = _checks.check_positive_int("num_workers", num_workers)
  _check_common_arguments(learning_rate, weight_decay)
  if horizon is None:
    horizon = num_workers - 1
  compensation = _compensation(
      num_workers, lambda_, adaptive, decay, eps, backup_dtype,
      per_worker_mean_square, bias_correction, lambda_warmup,
      correction_clip,
  )
  return pull_after_push(optax.chain(
      compensation,
      *_decayed_weights(weight_decay),
      look_ahead_momentum(learning_rate, momentum, horizon),
  ), compensation=compensation)


def delayed_nesterov_dcasgd(
    learning_rate: optax.ScalarOrSchedule,
    num_workers: int,
    *,
    period: int | None = None,
    momentum: jax.typing.ArrayLike = 0.9,
    momentum_activation: jax.typing.ArrayLike = 0.0,
    lambda_: jax.typing.ArrayLike | None = None,
    adaptive: bool = True,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    decay: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-7,
    backup_dtype: jax.typing.DTypeLike | None = None,
    per_worker_mean_square: bool = False,
    bias_correction: bool = False,
    lambda_warmup: jax.typing.ArrayLike = 0,
    correction_clip: jax.typing.ArrayLike | None = None,
) -> PullAfterPush:
  r"""DC-ASGD with delayed Nesterov momentum, with the pull after each push.

  Chains :func:`delay_compensation`, ``optax.add_decayed_weights`` (when
  ``weight_decay > 0``) and :func:`delayed_nesterov`: each compensated
  gradient takes a plain step of :math:`\eta/N`, and the Nesterov momentum
  moves once per ``period`` :math:`N` pushes. ``lambda_=0`` gives delayed
  Nesterov ASGD alone.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    num_workers: number of asynchronous workers (>= 1).
    period: :math:`N \geq 1`, pushes per momentum step; ``None`` is
      ``num_workers``.
    momentum: :math:`\beta`, in [0, 1).
    momentum_activation: :math:`c`, in [0, 1/period] (see
      :func:`delayed_nesterov`).
    lambda_: compensation strength (``None``: the variant's default).
    adaptive: DC-ASGD-a (default) or DC-ASGD-c.
    weight_decay: L2 coefficient added to the compensated gradient, >= 0.
    decay: as in :func:`delay_compensation`, and so are ``eps``,
      ``backup_dtype``, ``per_worker_mean_square``, ``bias_correction``,
      ``lambda_warmup`` and ``correction_clip``.

  Returns:
    A :class:`PullAfterPush`; ``update`` needs ``params`` and ``worker``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dcasgd_optax
    >>> tx = dcasgd_optax.delayed_nesterov_dcasgd(0.1, num_workers=4)
    >>> state = tx.init({'w': jnp.ones(2)})
    >>> updates, state = tx.update(
    ...     {'w': jnp.ones(2)}, state, {'w': jnp.ones(2)}, worker=2)
    >>> updates['w']  # first push of the period: -0.1 * g / 4
    Array([-0.025, -0.025], dtype=float32)

  References:
    Liu et al., `Asynchronous Local-SGD Training for Language Modeling
    <https://arxiv.org/abs/2401.09135>`_, 2024.
    Zheng et al., `Asynchronous Stochastic Gradient Descent with Delay
    Compensation <https://arxiv.org/abs/1609.08326>`_, ICML 2017.
  """
  num_workers = _checks.check_positive_int("num_workers", num_workers)
  _check_common_arguments(learning_rate, weight_decay)
  if period is None:
    period = num_workers
  compensation = _compensation(
      num_workers, lambda_, adaptive, decay, eps, backup_dtype,
      per_worker_mean_square, bias_correction, lambda_warmup,
      correction_clip,
  )
  return compensated_delayed_nesterov(
      compensation, learning_rate, period, momentum, momentum_activation,
      weight_decay)
