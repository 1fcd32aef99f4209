"""The delay-compensated gradient transformation (DC-ASGD-c and DC-ASGD-a)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcasgd_optax._src import _checks
from dcasgd_optax._src import _tree


class DelayCompensationState(NamedTuple):
  """The parameter server's memory for delay compensation.

  Attributes:
    backups: a pytree shaped like params whose every leaf has a leading axis
      of size ``num_workers``: ``backups[m]`` is the model worker ``m`` holds
      (the one it pulled last). Dtype ``backup_dtype`` (default: each param's
      own dtype). Every worker starts holding the initial params.
    mean_square: DC-ASGD-a's running mean of ``g * g``, a pytree shaped like
      params in float32 (float64 for float64 params); ``()`` for DC-ASGD-c.
  """

  backups: Any
  mean_square: Any


def _stats_dtype(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _is_static_zero(x: Any) -> bool:
  v = _checks.concrete_value(x)
  return v is not None and v.shape == () and float(v) == 0.0


def delay_compensation(
    num_workers: int,
    lambda_: Any = None,
    *,
    adaptive: bool = False,
    decay: Any = 0.95,
    eps: Any = 1e-7,
    backup_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Compensates the delay of an asynchronous worker's gradient (DC-ASGD).

  A worker's gradient ``g`` was computed at the model ``backup[m]`` it pulled,
  while the server now holds ``w``. The first-order Taylor correction with the
  diagonal outer-product approximation of the Hessian gives, elementwise,

  .. math::
    g_{dc} = g + \lambda \, g \odot g \odot (w - \mathrm{backup}[m]).

  With ``adaptive=True`` (DC-ASGD-a) :math:`\lambda` is replaced by
  :math:`\lambda_t = \lambda / \sqrt{ms_t + \epsilon}` with
  :math:`ms_t = d \cdot ms_{t-1} + (1-d) \, g \odot g` (one global statistic,
  starting at zero, updated with the current gradient before use; the
  authors' released code keeps one per worker instead).

  Put it first in a chain, where it sees raw gradients. It only reads the
  backups; record what a worker holds with :func:`record_pull` (the full
  optimizer :func:`dcasgd` does so after every push).

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

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``(updates, state, params, *, worker, **extra_args)``; extra args are
    ignored.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> params = {'w': jnp.array([1.0, 2.0])}
    >>> tx = optax.chain(dcasgd_optax.delay_compensation(2, 0.5), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> new = {'w': jnp.array([1.5, 2.0])}   # another worker moved the model
    >>> grads = {'w': jnp.array([2.0, 1.0])}  # worker 1 computed at the old one
    >>> updates, state = tx.update(grads, state, new, worker=1)
    >>> updates['w']  # -0.1 * (g + 0.5 * g * g * (w - backup[1]))
    Array([-0.3, -0.1], dtype=float32)

  References:
    Zheng et al., `Asynchronous Stochastic Gradient Descent with Delay
    Compensation <https://arxiv.org/abs/1609.08326>`_, ICML 2017.
  """
  num_workers = _checks.check_positive_int("num_workers", num_workers)
  if not isinstance(adaptive, bool):
    raise TypeError(f"`adaptive` must be a bool, got {adaptive!r}.")
  if lambda_ is None:
    lambda_ = 2.0 if adaptive else 0.04
  _checks.check_scalar_range("lambda_", lambda_, low=0.0)
  _checks.check_scalar_range("decay", decay, low=0.0, high=1.0)
  _checks.check_scalar_range("eps", eps, low=0.0, low_inclusive=False)
  if backup_dtype is not None and not jnp.issubdtype(backup_dtype, jnp.floating):
    raise TypeError(
        f"`backup_dtype` must be a floating dtype or None, got {backup_dtype}."
    )
  skip = _is_static_zero(lambda_)

  def init_fn(params):
    if params is None:
      raise ValueError("`params` is None: init needs the initial params.")

    def backup(p):
      p = jnp.asarray(p, backup_dtype or jnp.asarray(p).dtype)
      return jnp.broadcast_to(p[None], (num_workers, *p.shape)).copy()

    def zeros(p):
      return jnp.zeros(jnp.shape(p), _stats_dtype(jnp.result_type(p)))

    backups = jax.tree.map(backup, params)
    mean_square = jax.tree.map(zeros, params) if adaptive else ()
    return DelayCompensationState(backups=backups, mean_square=mean_square)

  def update_fn(updates, state, params=None, *, worker=None, **extra_args):
    del extra_args
    _checks.check_worker(worker, num_workers)
    _tree.check_matches_backups("params", params, state.backups)
    _tree.check_matches_backups("updates", updates, state.backups)
    stored = num_workers_of(state)
    if stored not in (None, num_workers):
      raise ValueError(
          f"The state holds backups for {stored} workers, but this "
          f"transformation was built with num_workers={num_workers}."
      )
    valid = jnp.logical_and(worker >= 0, worker < num_workers)
    held = held_by(state.backups, worker, num_workers)
    if adaptive:
      mean_square = jax.tree.map(
          lambda ms, g: jnp.where(
              valid, decay * ms + (1 - decay) * jnp.square(g.astype(ms.dtype)), ms
          ),
          state.mean_square,
          updates,
      )
      lam = jax.tree.map(lambda ms: lambda_ / jnp.sqrt(ms + eps), mean_square)
    else:
      mean_square = state.mean_square
      lam = jax.tree.map(lambda _: lambda_, updates)
    if skip:
      out = updates
    else:
      out = jax.tree.map(_compensate, updates, params, held, lam)
    out = jax.tree.map(
        lambda u: jnp.where(valid, u, jnp.asarray(np.nan, u.dtype)), out
    )
    return out, DelayCompensationState(state.backups, mean_square)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def num_workers_of(state: DelayCompensationState) -> int | None:
  """The leading axis of the backups, or None for a params tree with no leaves."""
  leaves = jax.tree.leaves(state.backups)
  return leaves[0].shape[0] if leaves else None


def held_by(backups: Any, worker: Any, num_workers: int) -> Any:
  """The params worker ``worker`` holds (clamped index; callers mask)."""
  idx = jnp.clip(jnp.asarray(worker, jnp.int32), 0, num_workers - 1)
  return jax.tree.map(
      lambda b: jax.lax.dynamic_index_in_dim(b, idx, 0, keepdims=False),
      backups,
  )


def _compensate(g, w, held, lam):
  """Elementwise g + lam * g * g * (w - held), in at least float32."""
  dtype = _stats_dtype(g.dtype)
  g32 = g.astype(dtype)
  delta = w.astype(dtype) - held.astype(dtype)
  return (g32 + lam * g32 * g32 * delta).astype(g.dtype)
