"""Adam (NAdam) whose workers pull the model predicted over their delay."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dcasgd_optax._src import _checks
from dcasgd_optax._src.look_ahead import LookAheadState


class LookAheadAdamState(NamedTuple):
  r"""State of :func:`look_ahead_adam`.

  Attributes:
    adam: ``optax.ScaleByAdamState`` (count, first moment ``mu``, second
      moment ``nu``), as ``optax.scale_by_adam`` keeps it.
    look_ahead: a :class:`LookAheadState` whose ``trace`` is the direction
      :math:`d = \hat m / (\sqrt{\hat v} + \epsilon)` (params-shaped,
      params' dtypes) and ``look_ahead`` the coefficient :math:`a`, so that
      :func:`pull` sends :math:`w - a\,d`.
  """

  adam: Any
  look_ahead: LookAheadState


def _coefficient(learning_rate: Any, b1: Any, horizon: Any,
                 nesterov: bool) -> jax.Array:
  r""":math:`\eta\, (\beta_1 - \beta_1^{H+1}) / (1 - \beta_1)`, times
  :math:`\beta_1` for NAdam."""
  b1 = jnp.asarray(b1, jnp.float32)
  coef = jnp.asarray(learning_rate, jnp.float32) * b1 * (1 - b1**horizon) / (
      1 - b1)
  return coef * b1 if nesterov else coef


def look_ahead_adam(
    learning_rate: optax.ScalarOrSchedule,
    horizon: jax.typing.ArrayLike,
    *,
    b1: Any = 0.99,
    b2: Any = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    nesterov: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""NAdam (or Adam) whose workers pull the model predicted over their delay.

  The updates are exactly ``optax.nadam(learning_rate, b1, b2, eps)``'s
  (``optax.adam``'s with ``nesterov=False``). What changes is the pull: a
  worker's gradient lands about ``horizon`` updates after it pulls, and the
  first moment keeps moving the model meanwhile. With no new gradient the
  first moment decays as :math:`\beta_1^k m`; freezing the second moment
  and the bias corrections at the current step :math:`t`, the next
  :math:`H` updates sum to :math:`-a\, d` with

  .. math::
    d = \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}, \qquad
    a = \eta_{t} \, \beta_1 \, \frac{\beta_1 - \beta_1^{H+1}}{1 - \beta_1}
    \quad\text{(NAdam; Adam without the leading } \beta_1\text{)},

  (:math:`\hat m_t = m_t / (1 - \beta_1^t)`, :math:`\hat v_t = v_t / (1 -
  \beta_2^t)`), so :func:`pull` sends :math:`\hat w = w - a\,d` and records
  it as the worker's backup: :func:`delay_compensation`'s term
  :math:`w - \hat w` stays the true distance. This is the MSNAG / SpecTrain
  prediction for an adaptive optimizer; the default :math:`\beta_1 = 0.99`
  is the high momentum with which Ajanthan et al. run NAdam asynchronously
  at the synchronous learning rate.

  Memory: optax's two moments plus the direction :math:`d` (one more
  params-sized buffer, read by the pull).

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    horizon: :math:`H \geq 0`, the updates to look ahead (the expected
      staleness: ``num_workers - 1`` for cyclic arrivals).
    b1: :math:`\beta_1`, in (0, 1).
    b2: :math:`\beta_2`, in [0, 1).
    eps: :math:`\epsilon > 0`.
    nesterov: NAdam (default) or Adam.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra args are ignored.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> tx = optax.chain(dcasgd_optax.delay_compensation(2, 0.0),
    ...                  dcasgd_optax.look_ahead_adam(1.0, horizon=2, b1=0.5,
    ...                                               b2=0.5, nesterov=False))
    >>> params = {'w': jnp.zeros(1)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(1)}, state, params, worker=0)
    >>> params = optax.apply_updates(params, updates)   # Adam's first step
    >>> params['w']
    Array([-1.], dtype=float32)
    >>> pulled, state = dcasgd_optax.pull(state, params, worker=0)
    >>> pulled['w']   # -1 - 1.0 * (0.5 + 0.25) * 1
    Array([-1.75], dtype=float32)

  References:
    Kosson, Chiley, Venigalla, Hestness, Köster, `Pipelined
    Backpropagation at Scale <https://arxiv.org/abs/2003.11666>`_, 2021
    (weight prediction along the momentum; MSNAG).
    Chen, Yang, Cheng, `Efficient and Robust Parallel DNN Training through
    Model Parallelism on Multi-GPU Platform
    <https://arxiv.org/abs/1809.02839>`_, 2018 (SpecTrain).
    Ajanthan, Ramasinghe, Zuo, Avraham, Long, `Nesterov Method for
    Asynchronous Pipeline Parallel Optimization
    <https://arxiv.org/abs/2505.01099>`_, ICML 2025 (NAdam with
    :math:`\beta_1 = 0.99` under delay).
    Dozat, `Incorporating Nesterov Momentum into Adam
    <https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ>`_, 2016.
  """
  _checks.check_scalar_range("b1", b1, low=0.0, high=1.0,
                             low_inclusive=False)
  _checks.check_scalar_range("b2", b2, low=0.0, high=1.0)
  _checks.check_scalar_range("eps", eps, low=0.0, low_inclusive=False)
  _checks.check_scalar_range("horizon", horizon, low=0.0)
  if not isinstance(nesterov, bool):
    raise TypeError(f"`nesterov` must be a bool, got {nesterov!r}.")
  if not callable(learning_rate):
    _checks.check_scalar_range("learning_rate", learning_rate, low=0.0)
  adam = optax.scale_by_adam(b1, b2, eps, nesterov=nesterov)

  def lr_at(count):
    return learning_rate(count) if callable(learning_rate) else learning_rate

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    ahead = LookAheadState(count, jax.tree.map(jnp.zeros_like, params),
                           _coefficient(lr_at(count), b1, horizon, nesterov))
    return LookAheadAdamState(adam.init(params), ahead)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    lr = lr_at(state.look_ahead.count)
    direction, adam_state = adam.update(updates, state.adam)
    out = jax.tree.map(lambda d, g: (-lr * d).astype(g.dtype), direction,
                       updates)
    t = adam_state.count

    def predicted(m, v, g):
      m_hat = m / (1 - b1**t)
      v_hat = v / (1 - b2**t)
      return (m_hat / (jnp.sqrt(v_hat) + eps)).astype(g.dtype)

    trace = jax.tree.map(predicted, adam_state.mu, adam_state.nu, updates)
    count = state.look_ahead.count + 1
    coef = _coefficient(lr_at(count), b1, horizon, nesterov)
    return out, LookAheadAdamState(adam_state,
                                   LookAheadState(count, trace, coef))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
