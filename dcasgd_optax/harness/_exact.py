r"""The ceiling of delay compensation: the exact Taylor correction, and how
far a compensation's curvature is from the true one.

A worker pushes :math:`g = \nabla L(w_{bak}, b)`, the gradient at the model
:math:`w_{bak}` it holds, while the server holds :math:`w`. With
:math:`\delta = w - w_{bak}` the first-order Taylor expansion of the
gradient gives the gradient the server wants:

.. math::
  \nabla L(w, b) \approx g + H(w_{bak}) \, \delta, \qquad
  H(w_{bak}) = \nabla^2 L(w_{bak}, b).

The product :math:`H \delta` is one forward-over-reverse derivative,
``jax.jvp`` of the gradient function at :math:`w_{bak}` along :math:`\delta`
(about the cost of two gradients), on the worker's own batch. DC-ASGD
replaces :math:`H` by the cheap diagonal :math:`\lambda \, g \odot g`; the
exact product is what no cheap correction can beat at first order (the
*ceiling*), and comparing the two along :math:`\delta` says how wrong the
cheap one is:

.. math::
  k = \frac{\delta^\top \hat H \delta}{\delta^\top H \delta}, \qquad
  \hat H \delta = c - g,

with :math:`c` the compensated gradient (the first transformation's output),
so :math:`c - g` is the compensation term. On a quadratic loss the expansion
is exact: :math:`g + H \delta = \nabla L(w, b)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dcasgd_optax import extend


def make(exact_compensation: Any, has_model_state: bool) -> float | None:
  r"""The validated ``exact_compensation`` (its :math:`\lambda`), or None."""
  if exact_compensation is None:
    return None
  if isinstance(exact_compensation, bool):
    raise TypeError(
        "`exact_compensation` must be a float lambda >= 0 (the strength of "
        f"the Hessian-vector correction) or None, got {exact_compensation!r}."
    )
  extend.check_scalar_range("exact_compensation", exact_compensation,
                            low=0.0)
  if has_model_state:
    raise ValueError(
        "`exact_compensation` is not supported with has_model_state=True: "
        "the Hessian-vector product is taken of a stateless loss_fn. Use a "
        "loss without model state (e.g. no BatchNorm)."
    )
  return float(exact_compensation)


def _sub(a: Any, b: Any) -> Any:
  return jax.tree.map(jnp.subtract, a, b)


def _vdot(a: Any, b: Any) -> jax.Array:
  r""":math:`\langle a, b \rangle` over all leaves, in float32 or wider."""
  dots = [jnp.vdot(x.astype(jnp.promote_types(x.dtype, jnp.float32)),
                   y.astype(jnp.promote_types(y.dtype, jnp.float32)))
          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return sum(dots, jnp.zeros((), jnp.float32))


def held_params(held: Any, params: Any) -> Any:
  """The worker's model in the params' dtypes (backups may be narrower)."""
  return jax.tree.map(lambda h, p: h.astype(p.dtype), held, params)


def hessian_product(loss_with_state: Callable[..., Any], held: Any,
                    batch: Any, direction: Any) -> Any:
  r""":math:`H(w_{bak}) \, \delta`: ``jax.jvp`` of the gradient of the
  (stateless) loss on ``batch`` at ``held`` along ``direction``."""
  grad = jax.grad(lambda p: loss_with_state(p, (), batch)[0])
  _, product = jax.jvp(grad, (held,), (direction,))
  return product


def compensate(lambda_: float, loss_with_state: Callable[..., Any],
               held: Any, params: Any, batch: Any, grads: Any) -> Any:
  r"""The exactly compensated gradient
  :math:`g + \lambda H(w_{bak}) (w - w_{bak})`, in ``grads``' dtypes."""
  held = held_params(held, params)
  product = hessian_product(loss_with_state, held, batch, _sub(params, held))
  return jax.tree.map(lambda g, h: (g + lambda_ * h).astype(g.dtype), grads,
                      product)


def curvature_ratio(loss_with_state: Callable[..., Any], held: Any,
                    params: Any, batch: Any, grads: Any,
                    compensated: Any) -> jax.Array:
  r""":math:`k = \delta^\top (c - g) / \delta^\top H \delta` (float32):
  the compensation's curvature along :math:`\delta = w - w_{bak}` over the
  true one (NaN when :math:`\delta = 0`, a fresh gradient)."""
  held = held_params(held, params)
  delta = _sub(params, held)
  product = hessian_product(loss_with_state, held, batch, delta)
  estimate = _vdot(delta, _sub(compensated, grads))
  return (estimate / _vdot(delta, product)).astype(jnp.float32)
