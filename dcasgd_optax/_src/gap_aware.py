"""Gap-Aware: a stale gradient damped per coordinate by how far the model
moved."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dcasgd_optax._src import _checks
from dcasgd_optax._src._backups import MeanSquareSpec
from dcasgd_optax._src._backups import backups_transformation
from dcasgd_optax._src._backups import check_backup_dtype


def gap_aware(
    num_workers: int,
    step_size: jax.typing.ArrayLike,
    *,
    decay: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    backup_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Divides a stale gradient, per coordinate, by its Gap (Gap-Aware ASGD).

  The Gap measures how far each coordinate of the model moved since worker
  ``m`` pulled, in units of a typical step :math:`C`:

  .. math::
    v_t = \beta v_{t-1} + (1 - \beta) \, g \odot g, \qquad
    C_t = \eta_{\max} \left( \sqrt{v_t / (1 - \beta^t)} + \epsilon \right),

    g_{ga} = g \,/\, \left( 1 + |w - \mathrm{backup}[m]| \,/\, C_t \right).

  A coordinate that moved by :math:`k` typical steps is divided by about
  :math:`1 + k`; a fresh gradient (the worker holds ``w``) is unchanged.
  :math:`C` is the root mean square of the gradients (bias-corrected, decay
  :math:`\beta`) times the step size :math:`\eta_{\max}`, the largest step
  size the optimizer uses; with momentum :math:`\mu` a typical step is
  about :math:`\eta/(1-\mu)`, which :func:`gap_aware_asgd` passes.

  It keeps the per-worker backups in the same
  :class:`DelayCompensationState` as :func:`delay_compensation` (its
  ``mean_square`` holds :math:`v`), so :func:`pull`, :func:`record_pull`,
  :func:`worker_params` and the simulator work with it unchanged; use it
  *instead of* delay compensation (one backups-holding transformation per
  optimizer, first in the chain, where it sees raw gradients). A traced
  out-of-range ``worker`` gives NaN updates and leaves the state as it was.

  Args:
    num_workers: number of asynchronous workers (>= 1).
    step_size: :math:`\eta_{\max} > 0`, the scale of one step per unit of
      gradient RMS (a float).
    decay: :math:`\beta`, the second moment's decay, in [0, 1).
    eps: :math:`\epsilon > 0`, keeps :math:`C` positive.
    backup_dtype: dtype of the backups (see :func:`delay_compensation`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``(updates, state, params, *, worker, **extra_args)``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> tx = dcasgd_optax.pull_after_push(optax.chain(
    ...     dcasgd_optax.gap_aware(2, step_size=0.1, decay=0.0),
    ...     optax.sgd(0.1)))
    >>> state = tx.init({'w': jnp.zeros(1)})
    >>> g = {'w': jnp.ones(1)}
    >>> w = {'w': jnp.array([0.1])}  # worker 0 pulled 0.0; one step later
    >>> updates, state = tx.update(g, state, w, worker=0)
    >>> updates['w']  # -0.1 * g / (1 + 0.1 / (0.1 * |g|))
    Array([-0.05], dtype=float32)

  References:
    Barkai, Hakimi, Schuster, `Gap-Aware Mitigation of Gradient Staleness
    <https://arxiv.org/abs/1909.10802>`_, ICLR 2020. Without momentum,
    :math:`C` is that of the implementation from the same group in FTPipe
    (github.com/saareliad/FTPipe, ``gap_aware``): the maximal learning rate
    times the bias-corrected RMS of the gradients, :math:`\beta = 0.999`.
    With momentum :math:`\mu` FTPipe takes the RMS of the momentum buffer
    times the learning rate, where :func:`gap_aware_asgd` passes
    :math:`\eta/(1-\mu)` times the RMS of the gradients: larger by up to
    :math:`\sqrt{(1+\mu)/(1-\mu)}` (4.4x at :math:`\mu = 0.9`, for
    zero-mean i.i.d. gradients), so the same gap is damped less.
  """
  num_workers = _checks.check_positive_int("num_workers", num_workers)
  _checks.check_scalar_range(
      "step_size", step_size, low=0.0, low_inclusive=False
  )
  _checks.check_scalar_range("decay", decay, low=0.0, high=1.0)
  _checks.check_scalar_range("eps", eps, low=0.0, low_inclusive=False)
  check_backup_dtype(backup_dtype)
  stats = MeanSquareSpec(decay)
  correct = gap_correction(step_size, decay=decay, eps=eps)
  return backups_transformation(num_workers, backup_dtype, stats, correct)


def gap_correction(step_size: Any, *, decay: Any, eps: Any) -> Any:
  """:func:`gap_aware`'s ``correct`` (arguments validated; see
  :func:`backups_transformation`), shared with the fused full optimizer."""

  def correct(updates, params, held, v, count, state):
    del state
    correction = 1 - decay ** jnp.asarray(count).astype(jnp.float32)

    def damp(g, w, b, v):
      scale = step_size * (jnp.sqrt(v / correction) + eps)
      gap = jnp.abs(w.astype(v.dtype) - b.astype(v.dtype)) / scale
      return (g.astype(v.dtype) / (1 + gap)).astype(g.dtype)

    return jax.tree.map(damp, updates, params, held, v)

  return correct
