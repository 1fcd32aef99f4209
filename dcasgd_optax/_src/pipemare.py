"""PipeMare's learning-rate rescheduling: stale gradients start at eta / tau."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dcasgd_optax._src import _checks
from dcasgd_optax._src import staleness
from dcasgd_optax._src.staleness import scale_tree


class ScaleByPipeMareState(NamedTuple):
  """State of :func:`scale_by_pipemare`.

  Attributes:
    count: int32 scalar, the number of updates so far (:math:`k`).
  """

  count: jax.Array  # type: ignore[assignment]  # the field, not tuple.count


def scale_by_pipemare(num_steps: int) -> optax.GradientTransformationExtraArgs:
  r"""Scales a gradient of staleness :math:`\tau` by PipeMare's rescheduling.

  PipeMare runs a gradient that is :math:`\tau` updates stale at the step

  .. math::
    \eta_k \,/\, \tau^{\,1 - \min(k / K,\, 1)},

  with :math:`k` the number of updates so far and :math:`K` =
  ``num_steps``: :math:`\eta/\tau` at the start (the step a delay of
  :math:`\tau` keeps stable), rising geometrically to the full rate
  :math:`\eta` after :math:`K` updates. A fresh gradient (:math:`\tau \le
  1`) is never scaled. Chained before ``optax.sgd(eta)`` (or any
  optimizer, whose own schedule gives :math:`\eta_k`) this is that step.
  The simulator and the Ray server pass ``staleness`` to every update.

  Edges: a concrete negative ``staleness`` raises ``ValueError``; a traced
  one gives all-NaN updates (as :func:`scale_by_staleness`).

  Args:
    num_steps: :math:`K \geq 1`, the updates over which the rate climbs
      from :math:`\eta/\tau` to :math:`\eta`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    keyword ``staleness`` (a non-negative integer scalar, may be traced).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> tx = optax.chain(dcasgd_optax.scale_by_pipemare(num_steps=2),
    ...                  optax.sgd(1.0))
    >>> state = tx.init({'w': jnp.zeros(1)})
    >>> g = {'w': jnp.ones(1)}
    >>> for _ in range(3):
    ...   u, state = tx.update(g, state, staleness=4)
    ...   print(u['w'])   # -1 / 4 ** (1 - k / 2) for k = 0, 1, 2
    [-0.25]
    [-0.5]
    [-1.]

  References:
    Yang, Zhang, Li, Ré, Aberger, De Sa, `PipeMare: Asynchronous Pipeline
    Parallel DNN Training <https://arxiv.org/abs/1910.05124>`_, MLSys 2021
    (Section 3.1, learning-rate rescheduling).
  """
  num_steps = _checks.check_positive_int("num_steps", num_steps)

  def init_fn(params):
    del params
    return ScaleByPipeMareState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, staleness=None, **extra_args):
    del params, extra_args
    tau = staleness_value(staleness)
    progress = jnp.minimum(state.count / num_steps, 1.0)
    scale = jnp.maximum(tau, 1).astype(jnp.float32) ** -(1.0 - progress)
    scale = jnp.where(tau >= 0, scale, jnp.nan)
    out = scale_tree(updates, scale)
    return out, ScaleByPipeMareState(state.count + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def staleness_value(value):
  """The checked ``staleness`` keyword (see :func:`scale_by_staleness`)."""
  return staleness._checked_staleness(value)  # pylint: disable=protected-access
