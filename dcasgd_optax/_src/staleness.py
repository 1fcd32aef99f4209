"""Staleness-aware scaling (Zhang et al. 2016), a baseline for DC-ASGD."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dcasgd_optax._src import _checks


class ScaleByInverseStalenessState(NamedTuple):
  """No state is kept; the staleness arrives with each update."""


def scale_by_inverse_staleness() -> optax.GradientTransformationExtraArgs:
  r"""Divides the updates by the staleness of the gradient (staleness-aware ASGD).

  .. math::
    u \leftarrow u / \max(\tau, 1)

  where :math:`\tau` is the number of server updates since the worker pulled
  (so a fresh gradient, :math:`\tau = 0`, is left as it is). Chained with
  ``optax.sgd(alpha0)`` this is the learning rate :math:`\alpha_0 / \tau` of
  Zhang et al. The simulator passes ``staleness`` to every update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    keyword ``staleness`` (a non-negative integer scalar, may be traced).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> tx = optax.chain(dcasgd_optax.scale_by_inverse_staleness(), optax.sgd(0.1))
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> updates, _ = tx.update({'w': jnp.ones(2)}, state, staleness=4)
    >>> updates['w']
    Array([-0.025, -0.025], dtype=float32)

  References:
    Zhang, Gupta, Lian, Liu, `Staleness-aware Async-SGD for Distributed Deep
    Learning <https://arxiv.org/abs/1511.05950>`_, IJCAI 2016.
  """

  def init_fn(params):
    del params
    return ScaleByInverseStalenessState()

  def update_fn(updates, state, params=None, *, staleness=None, **extra_args):
    del params, extra_args
    if staleness is None:
      raise TypeError(
          "Missing keyword argument `staleness`: the number of server updates "
          "since the worker pulled (an int >= 0)."
      )
    value = _checks.concrete_value(staleness)
    if value is not None and (value.shape != () or value < 0):
      raise ValueError(
          f"`staleness` must be a scalar >= 0, got {staleness!r}."
      )
    scale = 1.0 / jnp.maximum(jnp.asarray(staleness), 1)
    return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
