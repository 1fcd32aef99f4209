"""Delayed Nesterov: momentum applied once per period of asynchronous pushes."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dcasgd_optax._src import _checks


class DelayedNesterovState(NamedTuple):
  r"""State of :func:`delayed_nesterov`.

  Attributes:
    count: int32 scalar, the number of updates so far.
    momentum: the momentum :math:`m`, shaped like params (params' dtypes).
    accumulated: :math:`\Delta`, the sum of this period's gradients so far,
      shaped like params (params' dtypes).
  """

  count: jax.Array  # type: ignore[assignment]  # the field, not tuple.count
  momentum: Any
  accumulated: Any


def delayed_nesterov(
    learning_rate: optax.ScalarOrSchedule,
    period: int,
    *,
    momentum: jax.typing.ArrayLike = 0.9,
    momentum_activation: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD whose Nesterov momentum moves once per ``period`` updates.

  Asynchronous pushes arrive one at a time; applying momentum to each of
  them amplifies stale directions. Delayed Nesterov takes a plain step on
  each push and updates the momentum once per period of :math:`N` pushes,
  from their mean. On the :math:`t`-th update (from 0) with gradient
  :math:`g`, :math:`\Delta \leftarrow \Delta + g`, and

  .. math::
    \text{if } (t + 1) \bmod N = 0: \quad
    m \leftarrow \beta m + \Delta / N, \quad
    w \leftarrow w - \eta \left( (1 - cN + c) \, \beta m + g / N \right),
    \quad \Delta \leftarrow 0;

    \text{else}: \quad w \leftarrow w - \eta \left( c \, \beta m + g / N
    \right).

  :math:`c \in [0, 1/N]` (``momentum_activation``) spreads part of the
  momentum step over the period; with :math:`c = 0` (default) the momentum
  moves the model only at the end of each period. Over a period the
  gradients move the model by :math:`\eta/N` each, so :math:`\eta` is the
  step per period's mean gradient. With :math:`N = 1` it is exactly
  ``optax.sgd(learning_rate, momentum, nesterov=True)``.

  Memory: two params-shaped buffers, :math:`m` and :math:`\Delta`.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule (of the update
      count).
    period: :math:`N \geq 1`, the number of updates per momentum step
      (the paper uses the number of workers).
    momentum: :math:`\beta`, in [0, 1).
    momentum_activation: :math:`c`, in [0, 1/period].

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra args are ignored.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dcasgd_optax
    >>> tx = dcasgd_optax.delayed_nesterov(1.0, period=2, momentum=0.5)
    >>> state = tx.init({'w': jnp.zeros(1)})
    >>> g = {'w': jnp.ones(1)}
    >>> u, state = tx.update(g, state)   # plain step: -g / N
    >>> u['w']
    Array([-0.5], dtype=float32)
    >>> u, state = tx.update(g, state)   # m = 0.5 * 0 + (1 + 1) / 2 = 1
    >>> u['w']                           # -(0.5 * m + g / N)
    Array([-1.], dtype=float32)

  References:
    Liu, Chhaparia, Douillard, Kale, Rusu, Shen, Szlam, Ranzato,
    `Asynchronous Local-SGD Training for Language Modeling
    <https://arxiv.org/abs/2401.09135>`_, 2024 (Algorithm 3, Delayed
    Nesterov update; the same numbers as its authors' code).
  """
  period = _checks.check_positive_int("period", period)
  _checks.check_scalar_range("momentum", momentum, low=0.0, high=1.0)
  _checks.check_scalar_range(
      "momentum_activation", momentum_activation, low=0.0,
      high=1.0 / period, high_inclusive=True,
  )
  if not callable(learning_rate):
    _checks.check_scalar_range("learning_rate", learning_rate, low=0.0)

  def init_fn(params):
    # Two trees, not one twice: a donated step must own each buffer once.
    return DelayedNesterovState(
        jnp.zeros([], jnp.int32),
        jax.tree.map(jnp.zeros_like, params),
        jax.tree.map(jnp.zeros_like, params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    lr = (
        learning_rate(state.count) if callable(learning_rate) else learning_rate
    )
    boundary = (state.count + 1) % period == 0
    c = momentum_activation
    coeff = jnp.where(boundary, (1 - c * period + c) * momentum, c * momentum)

    def step(g, m, acc):
      acc = acc + g
      m = jnp.where(boundary, momentum * m + acc / period, m).astype(m.dtype)
      u = (-lr * (coeff * m + g / period)).astype(g.dtype)
      return u, m, jnp.where(boundary, jnp.zeros_like(acc), acc)

    out = jax.tree.map(step, updates, state.momentum, state.accumulated)
    treedef = jax.tree.structure(updates)
    u, m, acc = jax.tree.transpose(
        treedef, jax.tree.structure((0, 0, 0)), out
    )
    return u, DelayedNesterovState(state.count + 1, m, acc)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
