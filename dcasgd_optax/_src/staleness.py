"""Staleness-dependent step sizes: a gradient scaled by a function of its
delay."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dcasgd_optax._src import _checks

STALENESS_RULES = ("inverse", "sqrt", "delay_adaptive")


class ScaleByStalenessState(NamedTuple):
  """No state is kept; the staleness arrives with each update."""


# The state of the alias `scale_by_inverse_staleness`, under its old name.
ScaleByInverseStalenessState = ScaleByStalenessState


def scale_by_staleness(
    rule: str, *, num_workers: int | None = None
) -> optax.GradientTransformationExtraArgs:
  r"""Scales the updates by a function of the gradient's staleness.

  With :math:`\tau` the number of server updates since the worker pulled
  (:math:`\tau = 0` for a fresh gradient) and :math:`n` = ``num_workers``:

  ============================  ==========================================
  ``rule``                      scale
  ============================  ==========================================
  ``"inverse"``                 :math:`1 / \max(\tau, 1)` (Zhang et al.)
  ``"sqrt"``                    :math:`1 / \sqrt{1 + \tau}` (Xie et al.)
  ``"delay_adaptive"``          :math:`n / \max(n, \tau)` (Mishchenko et al.)
  ============================  ==========================================

  Chained before ``optax.sgd(eta)`` this is the step size
  :math:`\eta \cdot \mathrm{scale}(\tau)`: staleness-aware ASGD's
  :math:`\alpha_0/\tau`, FedAsync's polynomial staleness function
  :math:`(1+\tau)^{-a}` with its example :math:`a = 1/2` (the damping
  asynchronous local-SGD work applies to stale pseudo-gradients), or the
  delay-adaptive step :math:`\eta \, n / \max(n, \tau)` (the full step
  while the delay is within the number of workers). The simulator and the
  Ray server pass ``staleness`` to every update.

  Edges: a concrete negative ``staleness`` raises ``ValueError``; a traced
  one cannot be rejected at trace time, so the updates are all-NaN (as
  :func:`delay_compensation`'s are for a traced out-of-range worker), never
  silently scaled.

  Args:
    rule: one of ``"inverse"``, ``"sqrt"``, ``"delay_adaptive"``.
    num_workers: the number of workers :math:`n`, required by
      ``"delay_adaptive"`` (and only used by it).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    keyword ``staleness`` (a non-negative integer scalar, may be traced).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> tx = optax.chain(
    ...     dcasgd_optax.scale_by_staleness("sqrt"), optax.sgd(1.0))
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> updates, _ = tx.update({'w': jnp.ones(2)}, state, staleness=3)
    >>> updates['w']  # -1 / sqrt(1 + 3)
    Array([-0.5, -0.5], dtype=float32)

  References:
    Zhang, Gupta, Lian, Liu, `Staleness-aware Async-SGD for Distributed Deep
    Learning <https://arxiv.org/abs/1511.05950>`_, IJCAI 2016.
    Xie, Koyejo, Gupta, `Asynchronous Federated Optimization
    <https://arxiv.org/abs/1903.03934>`_, 2019 (FedAsync; the polynomial
    staleness function).
    Mishchenko, Bach, Even, Woodworth, `Asynchronous SGD Beats Minibatch SGD
    Under Arbitrary Delays <https://arxiv.org/abs/2206.07638>`_, NeurIPS 2022.
  """
  scale_fn = _scale_fn(rule, num_workers)

  def init_fn(params):
    del params
    return ScaleByStalenessState()

  def update_fn(updates, state, params=None, *, staleness=None, **extra_args):
    del params, extra_args
    tau = _checked_staleness(staleness)
    # A traced negative staleness cannot be rejected: make it loud.
    scale = jnp.where(tau >= 0, scale_fn(tau.astype(jnp.float32)), jnp.nan)
    return scale_tree(updates, scale), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _scale_fn(rule: Any, num_workers: Any) -> Any:
  """The scale as a function of the staleness, after checking the arguments."""
  if rule not in STALENESS_RULES:
    raise ValueError(
        f"`rule` must be one of {', '.join(map(repr, STALENESS_RULES))}, got "
        f"{rule!r}."
    )
  if rule == "delay_adaptive":
    if num_workers is None:
      raise ValueError(
          '`num_workers` is required for rule="delay_adaptive" (the step is '
          "eta * num_workers / max(num_workers, staleness))."
      )
    n = _checks.check_positive_int("num_workers", num_workers)
    return lambda tau: n / jnp.maximum(n, tau)
  if num_workers is not None:
    _checks.check_positive_int("num_workers", num_workers)
  if rule == "inverse":
    return lambda tau: 1.0 / jnp.maximum(tau, 1)
  return lambda tau: 1.0 / jnp.sqrt(1.0 + tau)


def _checked_staleness(staleness: Any) -> jax.Array:
  if staleness is None:
    raise TypeError(
        "Missing keyword argument `staleness`: the number of server updates "
        "since the worker pulled (an int >= 0)."
    )
  value = _checks.concrete_value(staleness)
  if value is not None and (value.shape != () or value < 0):
    raise ValueError(f"`staleness` must be a scalar >= 0, got {staleness!r}.")
  return jnp.asarray(staleness)


def scale_by_inverse_staleness() -> optax.GradientTransformationExtraArgs:
  r"""Divides the updates by the staleness (``scale_by_staleness("inverse")``).

  .. math::
    u \leftarrow u / \max(\tau, 1)

  Kept under its first name; identical to :func:`scale_by_staleness` with
  ``rule="inverse"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    keyword ``staleness`` (a non-negative integer scalar, may be traced).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> tx = optax.chain(
    ...     dcasgd_optax.scale_by_inverse_staleness(), optax.sgd(0.1))
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> updates, _ = tx.update({'w': jnp.ones(2)}, state, staleness=4)
    >>> updates['w']
    Array([-0.025, -0.025], dtype=float32)

  References:
    Zhang, Gupta, Lian, Liu, `Staleness-aware Async-SGD for Distributed Deep
    Learning <https://arxiv.org/abs/1511.05950>`_, IJCAI 2016.
  """
  return scale_by_staleness("inverse")


def scale_tree(updates: Any, scale: jax.Array) -> Any:
  """Each update times ``scale``, in at least float32, in its own dtype."""

  def scaled(u):
    wide = jnp.issubdtype(u.dtype, jnp.floating) and u.dtype.itemsize >= 4
    dtype = u.dtype if wide else jnp.float32
    return (u.astype(dtype) * scale.astype(dtype)).astype(u.dtype)

  return jax.tree.map(scaled, updates)
