"""Momentum SGD whose workers pull a look-ahead of the model (DANA-style)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dcasgd_optax._src import _checks
from dcasgd_optax._src import _tree


class LookAheadState(NamedTuple):
  r"""State of :func:`look_ahead_momentum`.

  Attributes:
    count: int32 scalar, the number of updates so far.
    trace: the momentum buffer :math:`v`, shaped like params (params'
      dtypes), as in ``optax.sgd``.
    look_ahead: float32 scalar :math:`a`, so that the predicted model is
      :math:`w - a \, v` (:func:`pull` sends it).
  """

  count: jax.Array  # type: ignore[assignment]  # the field, not tuple.count
  trace: Any
  look_ahead: jax.Array


def _coefficient(learning_rate: Any, momentum: Any, horizon: Any,
                 nesterov: bool = False) -> jax.Array:
  r""":math:`\eta \sum_{k=1}^{H} \mu^k = \eta \, \mu (1 - \mu^H) / (1 - \mu)`,
  times :math:`\mu` for Nesterov momentum."""
  mu = jnp.asarray(momentum, jnp.float32)
  coef = jnp.asarray(learning_rate, jnp.float32) * mu * (1 - mu**horizon) / (
      1 - mu
  )
  return coef * mu if nesterov else coef


def look_ahead_momentum(
    learning_rate: optax.ScalarOrSchedule,
    momentum: jax.typing.ArrayLike,
    horizon: jax.typing.ArrayLike,
    *,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Heavy-ball SGD whose workers pull where the model will be (DANA-style).

  The updates are exactly ``optax.sgd(learning_rate, momentum)``'s:
  :math:`v \leftarrow g + \mu v`, :math:`u = -\eta_t v`. What changes is the
  pull: a worker's gradient lands about ``horizon`` updates after it pulls,
  and momentum keeps moving the model meanwhile, so :func:`pull` sends the
  model those updates would reach if no new gradient arrived,

  .. math::
    \hat w = w - \eta_{t} \sum_{k=1}^{H} \mu^k \, v
           = w - \eta_{t} \, \frac{\mu (1 - \mu^H)}{1 - \mu} \, v,

  and records :math:`\hat w` as the worker's backup, so the worker computes
  its gradient at :math:`\hat w` and :func:`delay_compensation`'s term
  :math:`w - \hat w` is the true distance (DANA-DC). :math:`H = 1` is
  Nesterov's look-ahead; :math:`H = 0` sends :math:`w` itself. The
  prediction uses the learning rate of the next update for the whole
  horizon. ``optax.masked`` leaves outside the mask are not shifted. This
  is the weight prediction of SpecTrain and of Kosson et al.'s MSNAG,
  :math:`w - \eta\,(\mu - \mu^{H+1})/(1 - \mu)\, v`, with :math:`H` the
  expected delay.

  With ``nesterov=True`` the updates are ``optax.sgd(learning_rate,
  momentum, nesterov=True)``'s, :math:`u = -\eta_t (g + \mu v)`, whose
  :math:`k`-th step with no new gradient is :math:`-\eta \mu^{k+1} v`, so
  the prediction is :math:`\hat w = w - \eta\, \mu (\mu - \mu^{H+1}) /
  (1 - \mu)\, v` (the high-momentum Nesterov variant, e.g.
  :math:`\mu = 0.99`; for Adam's, :func:`look_ahead_adam`).

  Put it last in a chain that holds a :func:`delay_compensation` (or
  :func:`gap_aware`) for the backups, and pull through :func:`pull` (the
  simulator, :func:`pull_after_push` and the Ray server do).

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule (of the update
      count).
    momentum: :math:`\mu`, in (0, 1): the look-ahead is read from the
      momentum buffer, so there must be one.
    horizon: :math:`H \geq 0`, the number of updates to look ahead: the
      expected staleness (``num_workers - 1`` for cyclic arrivals). A
      float is taken through the closed form above (e.g. the mean
      staleness of event-driven arrivals).
    nesterov: Nesterov momentum (updates and prediction as above).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra args are ignored.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> tx = optax.chain(dcasgd_optax.delay_compensation(2, 0.0),
    ...                  dcasgd_optax.look_ahead_momentum(1.0, 0.5, horizon=2))
    >>> params = {'w': jnp.zeros(1)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(1)}, state, params, worker=0)
    >>> params = optax.apply_updates(params, updates)  # w = -1, v = 1
    >>> pulled, state = dcasgd_optax.pull(state, params, worker=0)
    >>> pulled['w']  # -1 - (0.5 + 0.25) * 1
    Array([-1.75], dtype=float32)

  References:
    Hakimi, Barkai, Gabel, Schuster, `Taming Momentum in a Distributed
    Asynchronous Environment <https://arxiv.org/abs/1907.11612>`_, 2019
    (DANA: workers compute gradients at a look-ahead of the model built from
    the momentum; DANA-DC adds delay compensation). This uses one shared
    momentum buffer and the multi-step Nesterov prediction above, not
    DANA-Zero's per-worker momentum buffers.
    Chen, Yang, Cheng, `Efficient and Robust Parallel DNN Training through
    Model Parallelism on Multi-GPU Platform
    <https://arxiv.org/abs/1809.02839>`_, 2018 (SpecTrain: the weights
    predicted along the smoothed gradient over the delay).
    Kosson, Chiley, Venigalla, Hestness, Köster, `Pipelined
    Backpropagation at Scale <https://arxiv.org/abs/2003.11666>`_, 2021
    (weight prediction; MSNAG, the multi-step Nesterov look-ahead).
  """
  if not isinstance(nesterov, bool):
    raise TypeError(f"`nesterov` must be a bool, got {nesterov!r}.")
  _checks.check_scalar_range(
      "momentum", momentum, low=0.0, high=1.0, low_inclusive=False
  )
  _checks.check_scalar_range("horizon", horizon, low=0.0)
  if not callable(learning_rate):
    _checks.check_scalar_range("learning_rate", learning_rate, low=0.0)

  def lr_at(count):
    return learning_rate(count) if callable(learning_rate) else learning_rate

  def init_fn(params):
    trace = jax.tree.map(jnp.zeros_like, params)
    count = jnp.zeros([], jnp.int32)
    return LookAheadState(
        count, trace, _coefficient(lr_at(count), momentum, horizon, nesterov)
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    lr = lr_at(state.count)
    trace = jax.tree.map(
        lambda g, v: (g + momentum * v).astype(v.dtype), updates, state.trace
    )
    if nesterov:
      out = jax.tree.map(lambda v, g: (-lr * (g + momentum * v)).astype(
          g.dtype), trace, updates)
    else:
      out = jax.tree.map(lambda v, g: (-lr * v).astype(g.dtype), trace,
                         updates)
    count = state.count + 1
    coef = _coefficient(lr_at(count), momentum, horizon, nesterov)
    return out, LookAheadState(count, trace, coef)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def look_ahead_of(state: LookAheadState, params: Any) -> Any:
  """The predicted model :math:`w - a v` in ``params``' dtypes."""

  def shift(w, v):
    if _tree.is_masked(v):
      return w
    w = jnp.asarray(w)
    # In at least float32 (explicitly: bf16 params, float32 coefficient).
    wide = jnp.issubdtype(w.dtype, jnp.floating) and w.dtype.itemsize >= 4
    dt = w.dtype if wide else jnp.float32
    shifted = w.astype(dt) - state.look_ahead.astype(dt) * v.astype(dt)
    return shifted.astype(w.dtype)

  return jax.tree.map(shift, params, state.trace, is_leaf=_tree.is_masked)
