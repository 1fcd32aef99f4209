"""Delay compensation with a diagonal secant curvature kept by the server."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dcasgd_optax._src import _backups
from dcasgd_optax._src import _checks
from dcasgd_optax._src import _rows
from dcasgd_optax._src import alias
from dcasgd_optax._src import delay_compensation as dc


class SecantCompensationState(NamedTuple):
  r"""State of :func:`secant_compensation`.

  Attributes:
    delay_compensation: the per-worker backups, a
      :class:`DelayCompensationState` with no mean square (``()``) and
      ``count`` the number of updates applied; :func:`record_pull`,
      :func:`pull` and :func:`worker_params` find it here.
    previous_backups: each leaf ``[num_workers, ...]`` in the backups'
      dtype: the model each worker held at its previous push.
    previous_grads: each leaf ``[num_workers, ...]`` in the backups' dtype:
      the gradient each worker pushed then.
    seen: bool ``[num_workers]``: whether the worker has pushed before.
    numerator: params-shaped, float32 (float64 for float64 params): the
      running mean of :math:`\Delta g \odot \Delta w`.
    denominator: params-shaped, same dtype: the running mean of
      :math:`\Delta w \odot \Delta w`.
  """

  delay_compensation: _backups.DelayCompensationState
  previous_backups: Any
  previous_grads: Any
  seen: Any
  numerator: Any
  denominator: Any


def secant_compensation(
    num_workers: int,
    lambda_: jax.typing.ArrayLike = 0.5,
    *,
    decay: jax.typing.ArrayLike = 0.99,
    correction_clip: jax.typing.ArrayLike | None = 1.0,
    backup_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Delay compensation whose curvature is a diagonal secant estimate.

  DC-ASGD corrects worker :math:`m`'s gradient :math:`g`, computed at the
  model :math:`b_m` it pulled, by :math:`\lambda\, \hat h \odot (w - b_m)`
  with a diagonal curvature :math:`\hat h` (:math:`g \odot g` in
  :func:`delay_compensation`, the pushed Fisher diagonal in
  :func:`fisher_compensation`). Here the server estimates :math:`\hat h`
  from what it already sees, by secants: worker :math:`m`'s two
  consecutive pushes were computed at two models it pulled, about one round
  of the server apart, so

  .. math::
    \Delta w = b_m - b_m^{prev}, \qquad \Delta g = g - g_m^{prev},
    \qquad \Delta g \approx H\, \Delta w,

  over the same distance as the displacement the correction must bridge.
  Per coordinate, least squares over the recent pushes of every worker
  (running means with decay :math:`\beta`, updated with this push's secant
  before use):

  .. math::
    n \leftarrow \beta n + (1 - \beta)\, \Delta g \odot \Delta w, \qquad
    s \leftarrow \beta s + (1 - \beta)\, \Delta w \odot \Delta w,

  .. math::
    \hat h = \max(n, 0) / s \;\; (0 \text{ where } s = 0), \qquad
    g_{dc} = g + \mathrm{clip}\big(\lambda\, \hat h \odot (w - b_m),\;
    -c\,|g|,\; c\,|g|\big),

  with :math:`c` the ``correction_clip`` (no clip when ``None``). Then
  :math:`b_m^{prev} \leftarrow b_m` and :math:`g_m^{prev} \leftarrow g`.
  This is the two-point (Barzilai-Borwein) idea, a curvature from the
  change of the gradient between two points, taken per coordinate and over
  the per-worker secants of one round; it is the "secant estimate from the
  server's recent steps" of issue 18.

  Edge behaviour: no correction until a worker's second push (its first
  push has no previous one and leaves :math:`n, s` unchanged; the update
  is :math:`g` itself until some worker's secant exists), and coordinates
  that never moved (:math:`s = 0`) get :math:`\hat h = 0`. A negative
  mean secant (a direction of negative curvature) gives :math:`\hat h = 0`.

  Cost: the server keeps three model copies per worker (the backups, the
  previous backups and the previous gradients, in ``backup_dtype``) and two
  params-sized running means (float32, or float64 for float64 params); the
  worker computes and pushes nothing new.

  Args:
    num_workers: number of asynchronous workers (>= 1).
    lambda_: the compensation strength :math:`\lambda`, >= 0.
    decay: :math:`\beta`, the running means' decay, in [0, 1).
    correction_clip: bound the term by ``correction_clip * |g|`` (> 0), or
      ``None`` for no bound.
    backup_dtype: dtype of the three per-worker copies (default: each
      param's own dtype; see :func:`delay_compensation`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``(updates, state, params, *, worker, held_params=None,
    **extra_args)``. A traced ``worker`` outside ``[0, num_workers)``
    changes no state and gives NaN updates.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dcasgd_optax
    >>> tx = dcasgd_optax.secant_compensation(1, lambda_=0.5)
    >>> state = tx.init({'w': jnp.array(0.0)})
    >>> g, state = tx.update({'w': jnp.array(1.0)}, state,
    ...                      {'w': jnp.array(0.0)}, worker=0)
    >>> g['w']   # the first push: no secant yet
    Array(1., dtype=float32)
    >>> state = dcasgd_optax.record_pull(state, {'w': jnp.array(1.0)}, 0)
    >>> g, state = tx.update({'w': jnp.array(3.0)}, state,
    ...                      {'w': jnp.array(1.5)}, worker=0)
    >>> g['w']   # h = (3 - 1) / (1 - 0) = 2: 3 + 0.5 * 2 * (1.5 - 1)
    Array(3.5, dtype=float32)

  References:
    Barzilai and Borwein, `Two-Point Step Size Gradient Methods
    <https://doi.org/10.1093/imanum/8.1.141>`_, IMA Journal of Numerical
    Analysis 8(1):141-148, 1988 (the curvature of two points' gradients).
    Zheng et al., `Asynchronous Stochastic Gradient Descent with Delay
    Compensation <https://arxiv.org/abs/1609.08326>`_, ICML 2017 (the
    Taylor correction this estimate feeds).
  """
  num_workers = _checks.check_positive_int("num_workers", num_workers)
  _checks.check_scalar_range("lambda_", lambda_, low=0.0)
  _checks.check_scalar_range("decay", decay, low=0.0, high=1.0)
  if correction_clip is not None:
    _checks.check_scalar_range(
        "correction_clip", correction_clip, low=0.0, low_inclusive=False
    )
  _backups.check_backup_dtype(backup_dtype)
  no_stats = _backups.MeanSquareSpec(None)

  def init_fn(params):
    state = _backups.init_state(params, num_workers, backup_dtype, no_stats)
    zeros = lambda p: jnp.zeros(
        jnp.shape(p), _backups.stats_dtype(jnp.result_type(p))
    )
    return SecantCompensationState(
        delay_compensation=state,
        # A copy, not the backups' own buffers: a state whose leaves share a
        # buffer cannot be donated to a jitted step.
        previous_backups=jax.tree.map(jnp.copy, state.backups),
        previous_grads=jax.tree.map(jnp.zeros_like, state.backups),
        seen=jnp.zeros((num_workers,), bool),
        numerator=jax.tree.map(zeros, params),
        denominator=jax.tree.map(zeros, params),
    )

  def update_fn(
      updates,
      state,
      params=None,
      *,
      worker=None,
      held_params=None,
      **extra_args,
  ):
    del extra_args
    backups = state.delay_compensation.backups
    _backups.check_update(
        updates, state.delay_compensation, params, worker, num_workers
    )
    held = _backups.held_of(backups, worker, num_workers, held_params)
    valid = _backups.worker_is_valid(worker, num_workers)
    row = jnp.clip(jnp.asarray(worker, jnp.int32), 0, num_workers - 1)
    fold = jnp.logical_and(valid, state.seen[row])
    _, _, dc_state = _backups.next_mean_square(
        state.delay_compensation, updates, worker, num_workers, no_stats
    )

    read = lambda rows: _rows.read_row(rows, row)

    def secant(g, b, prev_b, prev_g, num, den):
      dw = b.astype(num.dtype) - read(prev_b).astype(num.dtype)
      dg = g.astype(num.dtype) - read(prev_g).astype(num.dtype)
      mix = lambda old, new: jnp.where(
          fold, decay * old + (1 - decay) * new, old
      )
      return mix(num, dg * dw), mix(den, dw * dw)

    means = jax.tree.map(
        secant,
        updates,
        held,
        state.previous_backups,
        state.previous_grads,
        state.numerator,
        state.denominator,
    )
    num, den = jax.tree.transpose(
        jax.tree.structure(updates), jax.tree.structure((0, 0)), means
    )

    def compensate(g, w, b, n, s):
      return dc._compensate(  # pylint: disable=protected-access
          g, w, b, lambda_, correction_clip, curvature=secant_curvature(n, s)
      )

    out = jax.tree.map(compensate, updates, params, held, num, den)
    write = lambda rows, new: _rows.write_row(rows, row, new, valid)
    # Each per-worker array is read (a worker's row) and written in place.
    # XLA writes in place only if every read of the array comes before the
    # write in the data flow, so each written value is tied to what read the
    # arrays (``x + min(|y|, 0)`` is ``x`` for any ``y`` but NaN, where the
    # state is lost already). Untied, XLA
    # copied the backups, the previous backups and the previous gradients
    # twice per update: 100x the update's cost at 32 workers of 100k
    # parameters on XLA:CPU (tests/test_secant.py checks the temporaries;
    # the cost is in benchmarks/update_cost.md).
    tie = lambda x, y: x + jnp.minimum(jnp.abs(y), 0).astype(x.dtype)
    ties = lambda x, n, s: tie(tie(x, n), s)
    previous_backups = jax.tree.map(
        write, state.previous_backups, jax.tree.map(ties, held, num, den)
    )
    previous_grads = jax.tree.map(
        write, state.previous_grads, jax.tree.map(ties, updates, num, den)
    )
    out = jax.tree.map(
        ties,
        out,
        jax.tree.map(read, previous_backups),
        jax.tree.map(read, previous_grads),
    )
    state = SecantCompensationState(
        delay_compensation=dc_state,
        previous_backups=previous_backups,
        previous_grads=previous_grads,
        seen=write(state.seen, jnp.asarray(True)),
        numerator=num,
        denominator=den,
    )
    return _backups.nan_unless(valid, out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def secant_curvature(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  r""":math:`\max(n, 0) / s` where :math:`s > 0`, else 0."""
  positive = denominator > 0
  safe = jnp.where(positive, denominator, jnp.ones_like(denominator))
  return jnp.where(positive, jnp.maximum(numerator, 0) / safe, 0)


def secant_dcasgd(
    learning_rate: optax.ScalarOrSchedule,
    num_workers: int,
    *,
    lambda_: jax.typing.ArrayLike = 0.5,
    decay: jax.typing.ArrayLike = 0.99,
    correction_clip: jax.typing.ArrayLike | None = 1.0,
    momentum: float | None = None,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    backup_dtype: jax.typing.DTypeLike | None = None,
) -> alias.PullAfterPush:
  r"""DC-ASGD with the server's secant curvature, as one optimizer.

  Chains :func:`secant_compensation`, ``optax.add_decayed_weights`` (when
  ``weight_decay > 0``) and ``optax.sgd``, with the worker's pull after its
  push, as :func:`dcasgd` does with :func:`delay_compensation`:

  .. math::
    w \leftarrow w - \eta \, \big(g + \mathrm{clip}(\lambda\, \hat h \odot
    (w - b_m), -c|g|, c|g|) + \mathrm{wd} \cdot w\big),
    \qquad b_m \leftarrow w,

  with :math:`\hat h` the running diagonal secant of
  :func:`secant_compensation`. Not fused: each chain member reads the
  parameters once.

  Args:
    learning_rate: a float or an optax schedule.
    num_workers: number of asynchronous workers (>= 1).
    lambda_, decay, correction_clip, backup_dtype: as in
      :func:`secant_compensation`.
    momentum: heavy-ball momentum in [0, 1), or ``None`` for plain SGD.
    nesterov: use Nesterov momentum.
    weight_decay: L2 coefficient added to the compensated gradient, >= 0.

  Returns:
    A :class:`PullAfterPush`; ``update`` needs ``params`` and ``worker``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dcasgd_optax
    >>> tx = dcasgd_optax.secant_dcasgd(0.1, num_workers=2)
    >>> params = {'w': jnp.ones(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(2)}, state, params,
    ...                            worker=0)
    >>> updates['w']   # no secant yet: plain SGD
    Array([-0.1, -0.1], dtype=float32)
  """
  alias._check_sgd_arguments(  # pylint: disable=protected-access
      learning_rate, momentum, nesterov, weight_decay
  )
  compensation = secant_compensation(
      num_workers,
      lambda_,
      decay=decay,
      correction_clip=correction_clip,
      backup_dtype=backup_dtype,
  )
  return alias.compensated_sgd(
      compensation, learning_rate, momentum, nesterov, weight_decay
  )


def delayed_nesterov_secant_dcasgd(
    learning_rate: optax.ScalarOrSchedule,
    num_workers: int,
    *,
    period: int | None = None,
    momentum: jax.typing.ArrayLike = 0.9,
    momentum_activation: jax.typing.ArrayLike = 0.0,
    lambda_: jax.typing.ArrayLike = 0.5,
    decay: jax.typing.ArrayLike = 0.99,
    correction_clip: jax.typing.ArrayLike | None = 1.0,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    backup_dtype: jax.typing.DTypeLike | None = None,
) -> alias.PullAfterPush:
  r"""The secant compensation with delayed Nesterov momentum, as one optimizer.

  Chains :func:`secant_compensation`, ``optax.add_decayed_weights`` (when
  ``weight_decay > 0``) and :func:`delayed_nesterov`, with the worker's pull
  after its push, as :func:`delayed_nesterov_dcasgd` does with
  :func:`delay_compensation`. The pushed gradient is corrected and decayed,

  .. math::
    \tilde g = g + \mathrm{clip}(\lambda\, \hat h \odot (w - b_m),
    -\kappa|g|, \kappa|g|) + \mathrm{wd} \cdot w,

  with :math:`\hat h` the running diagonal secant of
  :func:`secant_compensation` and :math:`\kappa` its ``correction_clip``;
  :func:`delayed_nesterov` then steps :math:`-\eta\,\tilde g / N` (plus its
  momentum term: :math:`c\beta m` on each push, the rest of
  :math:`\beta m` at the end of each period of :math:`N` pushes, where
  the momentum moves from the period's mean), and worker :math:`m` pulls
  the updated model, which becomes its backup :math:`b_m`. Not fused:
  each chain member reads the parameters once.

  The methods grid recommends this chain for SGD with momentum at M = 16
  workers, not at every M: the "choose a method" page has the evidence,
  the tuned ``lambda_`` and the rate.

  Args:
    learning_rate: :math:`\eta`, the step per period's mean gradient (as in
      :func:`delayed_nesterov`), a float or an optax schedule.
    num_workers: number of asynchronous workers (>= 1).
    period: :math:`N \geq 1`, pushes per momentum step; ``None`` is
      ``num_workers``.
    momentum: :math:`\beta`, in [0, 1).
    momentum_activation: :math:`c`, in [0, 1/period] (see
      :func:`delayed_nesterov`).
    lambda_, decay, correction_clip, backup_dtype: as in
      :func:`secant_compensation` (``correction_clip`` is :math:`\kappa`).
    weight_decay: :math:`\mathrm{wd}`, the L2 coefficient added to the
      compensated gradient, >= 0.

  Returns:
    A :class:`PullAfterPush`; ``update`` needs ``params`` and ``worker``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dcasgd_optax
    >>> tx = dcasgd_optax.delayed_nesterov_secant_dcasgd(0.1, num_workers=4)
    >>> params = {'w': jnp.ones(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(2)}, state, params,
    ...                            worker=2)
    >>> updates['w']  # no secant yet, first push of the period: -0.1 * g / 4
    Array([-0.025, -0.025], dtype=float32)

  References:
    Liu et al., `Asynchronous Local-SGD Training for Language Modeling
    <https://arxiv.org/abs/2401.09135>`_, 2024 (delayed Nesterov).
    Zheng et al., `Asynchronous Stochastic Gradient Descent with Delay
    Compensation <https://arxiv.org/abs/1609.08326>`_, ICML 2017.
  """
  num_workers = _checks.check_positive_int("num_workers", num_workers)
  alias._check_common_arguments(  # pylint: disable=protected-access
      learning_rate, weight_decay
  )
  compensation = secant_compensation(
      num_workers,
      lambda_,
      decay=decay,
      correction_clip=correction_clip,
      backup_dtype=backup_dtype,
  )
  return alias.compensated_delayed_nesterov(
      compensation,
      learning_rate,
      num_workers if period is None else period,
      momentum,
      momentum_activation,
      weight_decay,
  )
