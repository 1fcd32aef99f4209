"""The delay-compensated gradient transformation (DC-ASGD-c and DC-ASGD-a)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dcasgd_optax._src import _checks
from dcasgd_optax._src._backups import MeanSquareSpec
from dcasgd_optax._src._backups import backups_transformation
from dcasgd_optax._src._backups import check_backup_dtype
from dcasgd_optax._src._backups import stats_dtype


def delay_compensation(
    num_workers: int,
    lambda_: jax.typing.ArrayLike | None = None,
    *,
    adaptive: bool = False,
    decay: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-7,
    backup_dtype: jax.typing.DTypeLike | None = None,
    per_worker_mean_square: bool = False,
    bias_correction: bool = False,
    lambda_warmup: jax.typing.ArrayLike = 0,
    correction_clip: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Compensates the delay of an asynchronous worker's gradient (DC-ASGD).

  A worker's gradient ``g`` was computed at the model ``backup[m]`` it pulled,
  while the server now holds ``w``. The first-order Taylor correction with the
  diagonal outer-product approximation of the Hessian gives, elementwise,

  .. math::
    g_{dc} = g + \lambda \, g \odot g \odot (w - \mathrm{backup}[m]).

  With ``adaptive=True`` (DC-ASGD-a) :math:`\lambda` is replaced by
  :math:`\lambda_t = \lambda / \sqrt{ms_t + \epsilon}` with
  :math:`ms_t = d \cdot ms_{t-1} + (1-d) \, g \odot g` (starting at zero,
  updated with the current gradient before use). By default ``ms`` is one
  global statistic, as the paper's formula reads; with
  ``per_worker_mean_square=True`` each worker ``m`` has its own ``ms[m]``,
  updated only with ``m``'s gradients, as in the authors' released code.

  Early in training ``ms`` is near zero, so :math:`\lambda_t` is large and
  the term over-compensates. Two opt-in remedies: ``bias_correction=True``
  divides ``ms`` by :math:`1 - d^t` (Adam's correction; ``t`` counts the
  gradients folded into that ``ms``) and ``lambda_warmup=k`` scales
  :math:`\lambda` by :math:`\min(1, t/k)` over the first ``k`` updates
  (``t`` counts all updates). A third, ``correction_clip=c``, bounds the
  compensation term per coordinate by the gradient itself,
  :math:`|\lambda g \odot g \odot (w - \mathrm{backup}[m])| \le c\,|g|`,
  a trust region for the first-order Taylor step: it acts wherever
  :math:`\lambda_t` is large (also later in training, on coordinates whose
  gradient is rare). All are off by default (the paper's method); see the
  measurements in benchmarks/compensation_error.md before turning one on.

  Put it first in a chain, where it sees raw gradients. It only reads the
  backups; the server's side of a pull, :func:`pull`, writes them (the full
  optimizer :func:`dcasgd` pulls after every push).

  Edges: ``lambda_=0`` returns the gradient unchanged (plain ASGD). A traced
  ``worker`` outside ``[0, num_workers)`` cannot be rejected at trace time:
  the update is then all-NaN and the state is left as it was, so the error is
  visible; a concrete one raises. To skip such a step, put
  ``optax.apply_if_finite`` *after* this transformation in the chain (it
  checks the updates it receives, so wrapping the whole optimizer in it does
  not catch NaNs this transformation produces).

  Args:
    num_workers: number of asynchronous workers (>= 1); the state holds that
      many copies of the model.
    lambda_: the compensation strength, >= 0 (a float, or an array under
      ``optax.inject_hyperparams``); ``None`` picks the paper's defaults, 0.04
      for DC-ASGD-c and 2.0 for DC-ASGD-a.
    adaptive: use DC-ASGD-a's per-coordinate :math:`\lambda_t`.
    decay: DC-ASGD-a's mean-square decay, in [0, 1).
    eps: DC-ASGD-a's epsilon, > 0.
    backup_dtype: dtype to store backups in (e.g. ``jnp.bfloat16`` halves
      their memory for float32 models); ``None`` keeps each param's dtype.
      The backups are what the workers hold, so with a lower precision the
      correction sees ``w - round(w)`` even at staleness 0, and a simulator
      computes each worker's gradient at its rounded model.
    per_worker_mean_square: DC-ASGD-a only: one ``ms`` per worker (memory:
      ``num_workers`` more float32 copies of the model) instead of one.
    bias_correction: DC-ASGD-a only: use :math:`ms_t / (1 - d^t)`.
    lambda_warmup: number of updates over which :math:`\lambda` ramps up
      linearly from :math:`\lambda/k`; 0 (default) for none.
    correction_clip: :math:`c > 0` bounding the term by :math:`c\,|g|` per
      coordinate, or ``None`` (default) for no bound.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``(updates, state, params, *, worker, held_params=None, **extra_args)``:
    ``held_params``, when given, is the model the worker holds, read instead
    of ``backup[worker]`` (for drivers that keep the backups elsewhere; see
    ``_backups.held_of``); other extra args are ignored.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> params = {'w': jnp.array([1.0, 2.0])}
    >>> tx = optax.chain(
    ...     dcasgd_optax.delay_compensation(2, 0.5), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> new = {'w': jnp.array([1.5, 2.0])}   # another worker moved the model
    >>> grads = {'w': jnp.array([2.0, 1.0])}  # worker 1 computed at the old one
    >>> updates, state = tx.update(grads, state, new, worker=1)
    >>> updates['w']  # -0.1 * (g + 0.5 * g * g * (w - backup[1]))
    Array([-0.3, -0.1], dtype=float32)

  References:
    Zheng et al., `Asynchronous Stochastic Gradient Descent with Delay
    Compensation <https://arxiv.org/abs/1609.08326>`_, ICML 2017 (the
    authors' code: github.com/microsoft/Delayed-Compensation-Asynchronous-
    Stochastic-Gradient-Descent-for-Multiverso keeps MeanSquare per worker).
    Kingma and Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, ICLR 2015
    (the bias correction).
  """
  num_workers = _checks.check_positive_int("num_workers", num_workers)
  _check_options(
      adaptive, per_worker_mean_square, bias_correction, lambda_warmup
  )
  if correction_clip is not None:
    _checks.check_scalar_range(
        "correction_clip", correction_clip, low=0.0, low_inclusive=False
    )
  lambda_ = default_lambda(lambda_, adaptive)
  _checks.check_scalar_range("lambda_", lambda_, low=0.0)
  _checks.check_scalar_range("decay", decay, low=0.0, high=1.0)
  _checks.check_scalar_range("eps", eps, low=0.0, low_inclusive=False)
  check_backup_dtype(backup_dtype)
  stats = MeanSquareSpec(decay if adaptive else None, per_worker_mean_square)
  correct = compensation_correction(
      lambda_, adaptive=adaptive, decay=decay, eps=eps,
      bias_correction=bias_correction, lambda_warmup=lambda_warmup,
      correction_clip=correction_clip,
  )
  return backups_transformation(num_workers, backup_dtype, stats, correct)


def default_lambda(lambda_: Any, adaptive: bool) -> Any:
  """``lambda_``, or the paper's default for the variant when it is None."""
  if lambda_ is None:
    return 2.0 if adaptive else 0.04
  return lambda_


def compensation_correction(
    lambda_: Any,
    *,
    adaptive: bool,
    decay: Any,
    eps: Any,
    bias_correction: bool,
    lambda_warmup: Any,
    correction_clip: Any,
) -> Any:
  """:func:`delay_compensation`'s ``correct`` (:func:`backups_transformation`).

  Its arguments, already validated and ``lambda_`` resolved. The fused full
  optimizer applies the same function to blocks of each parameter, so both
  compute the same numbers.
  """
  skip = _checks.is_static_zero(lambda_)
  warmup = not _checks.is_static_zero(lambda_warmup)

  def correct(updates, params, held, ms, count, state):
    lam = jax.tree.map(lambda _: lambda_, updates)
    if adaptive:
      if bias_correction:
        ms = jax.tree.map(lambda x: x / (1 - decay**count), ms)
      # sqrt(1 / .), not 1 / sqrt(.): XLA rewrites the latter to rsqrt,
      # which XLA:CPU (JAX 0.12) runs ~5x slower inside the fused update's
      # loop (benchmarks/update_cost.md).
      lam = jax.tree.map(lambda x: lambda_ * jnp.sqrt(1 / (x + eps)), ms)
    if warmup:
      lam = _warm_up(lam, jnp.sum(state.count), lambda_warmup)
    if skip:
      return updates
    compensate = functools.partial(_compensate, clip=correction_clip)
    return jax.tree.map(compensate, updates, params, held, lam)

  return correct


def _check_options(adaptive, per_worker, bias_correction, warmup) -> None:
  for name, value in (
      ("adaptive", adaptive),
      ("per_worker_mean_square", per_worker),
      ("bias_correction", bias_correction),
  ):
    if not isinstance(value, bool):
      raise TypeError(f"`{name}` must be a bool, got {value!r}.")
  for name, value in (
      ("per_worker_mean_square", per_worker),
      ("bias_correction", bias_correction),
  ):
    if value and not adaptive:
      raise ValueError(
          f"`{name}=True` needs `adaptive=True`: DC-ASGD-c keeps no "
          "mean square."
      )
  _checks.check_scalar_range("lambda_warmup", warmup, low=0.0)


def _warm_up(lam: Any, t: Any, steps: Any) -> Any:
  """``lam * min(1, t / steps)``; ``steps == 0`` means no warm-up."""
  ramp = warm_up_ramp(t, steps)
  return jax.tree.map(lambda x: x * ramp, lam)


def warm_up_ramp(t: Any, steps: Any) -> jax.Array:
  """``min(1, t / steps)``, or 1 if ``steps == 0`` (no warm-up)."""
  steps = jnp.asarray(steps, jnp.float32)
  return jnp.where(
      steps > 0, jnp.minimum(1.0, t / jnp.maximum(steps, 1.0)), 1.0
  )


def _compensate(g, w, held, lam, clip=None, curvature=None):
  """Elementwise g + lam * c * (w - held), in at least float32.

  The curvature ``c`` is ``g * g`` (DC-ASGD), or ``curvature`` when given
  (e.g. the pushed Fisher diagonal). With ``clip``, the term is bounded by
  ``clip * |g|``.
  """
  dtype = stats_dtype(g.dtype)
  g32 = g.astype(dtype)
  c = g32 * g32 if curvature is None else curvature.astype(dtype)
  delta = w.astype(dtype) - held.astype(dtype)
  term = lam * c * delta
  if clip is not None:
    bound = clip * jnp.abs(g32)
    term = jnp.clip(term, -bound, bound)
  return (g32 + term).astype(g.dtype)
