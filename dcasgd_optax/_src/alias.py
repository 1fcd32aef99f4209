"""The full DC-ASGD optimizer: delay compensation, weight decay, SGD."""

from __future__ import annotations

import numbers
from typing import Any

import optax

from dcasgd_optax._src import _checks
from dcasgd_optax._src.delay_compensation import delay_compensation
from dcasgd_optax._src.pull import find_states
from dcasgd_optax._src.pull import pull


class PullAfterPush(optax.GradientTransformationExtraArgs):
  """A transformation whose every ``update`` also performs the worker's pull.

  :func:`pull_after_push` (and so :func:`dcasgd`) returns one. It is an
  ``optax.GradientTransformationExtraArgs`` in every respect; its type only
  tells a driver of asynchronous training that after
  ``tx.update(..., worker=m)`` the pull of the new model is already recorded
  (:func:`pull`), so the driver must not pull again. What the worker then
  holds is ``worker_params(opt_state, m)``. Wrapping it in another
  transformation (e.g. ``optax.inject_hyperparams``) hides the type; pulling
  again is then redundant, not wrong.

  Examples:
    >>> import dcasgd_optax
    >>> isinstance(dcasgd_optax.dcasgd(0.1, num_workers=2),
    ...            dcasgd_optax.PullAfterPush)
    True
  """

  __slots__ = ()


def dcasgd(
    learning_rate: optax.ScalarOrSchedule,
    num_workers: int,
    *,
    lambda_: Any = None,
    adaptive: bool = True,
    decay: Any = 0.95,
    eps: Any = 1e-7,
    momentum: float | None = None,
    nesterov: bool = False,
    weight_decay: Any = 0.0,
    backup_dtype: Any = None,
) -> PullAfterPush:
  r"""DC-ASGD as one optimizer, with the worker's pull recorded after its push.

  Chains :func:`delay_compensation`, ``optax.add_decayed_weights`` (when
  ``weight_decay > 0``) and ``optax.sgd``, so for worker ``m``

  .. math::
    w \leftarrow w - \eta \, (g + \lambda \, g \odot g \odot (w - b_m)
    + \mathrm{wd} \cdot w), \qquad b_m \leftarrow w

  (with momentum applied to the bracket when ``momentum`` is set). The last
  step is Algorithm 1's pull right after push: ``update`` writes
  ``params + updates`` into worker ``m``'s backup. If your workers pull at
  other times, use :func:`delay_compensation` in your own chain and call
  :func:`pull` when they do.

  A traced ``worker`` outside ``[0, num_workers)`` leaves the backups and
  DC-ASGD-a's statistics as they were, but the update is NaN and, with
  momentum, so is the momentum buffer from then on: loud, not silent. A
  concrete out-of-range id raises ``ValueError``.

  Args:
    learning_rate: a float or an optax schedule.
    num_workers: number of asynchronous workers (>= 1).
    lambda_: compensation strength; ``None`` picks the paper's defaults, 2.0
      for DC-ASGD-a and 0.04 for DC-ASGD-c.
    adaptive: DC-ASGD-a (default) or DC-ASGD-c.
    decay: DC-ASGD-a's mean-square decay, in [0, 1).
    eps: DC-ASGD-a's epsilon, > 0.
    momentum: heavy-ball momentum in [0, 1), or ``None`` for plain SGD.
    nesterov: use Nesterov momentum.
    weight_decay: L2 coefficient added to the compensated gradient, >= 0.
    backup_dtype: dtype of the per-worker backups (see
      :func:`delay_compensation`).

  Returns:
    A :class:`PullAfterPush` (an ``optax.GradientTransformationExtraArgs``);
    ``update`` needs ``params`` and the keyword ``worker``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> params = {'w': jnp.array([1.0, -1.0])}
    >>> tx = dcasgd_optax.dcasgd(0.1, num_workers=4, momentum=0.9)
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum(p['w'] ** 2))(params)
    >>> updates, state = tx.update(grads, state, params, worker=3)
    >>> params = optax.apply_updates(params, updates)
    >>> params['w']
    Array([ 0.8, -0.8], dtype=float32)
    >>> dcasgd_optax.worker_params(state, 3)['w']  # worker 3 pulled the result
    Array([ 0.8, -0.8], dtype=float32)
  """
  if nesterov and momentum is None:
    raise ValueError("`nesterov=True` needs `momentum` (a float in [0, 1)).")
  if momentum is not None:
    _checks.check_scalar_range("momentum", momentum, low=0.0, high=1.0)
  _checks.check_scalar_range(
      "weight_decay", weight_decay, low=0.0, allow_schedule=True
  )
  if not callable(learning_rate):
    _checks.check_scalar_range("learning_rate", learning_rate, low=0.0)
  parts = [
      delay_compensation(
          num_workers,
          lambda_,
          adaptive=adaptive,
          decay=decay,
          eps=eps,
          backup_dtype=backup_dtype,
      )
  ]
  # Only a static Python zero drops the term: under inject_hyperparams the
  # value is an array (concrete in init, traced in a jitted update), and the
  # chain must have the same structure in both.
  if not (isinstance(weight_decay, numbers.Real) and weight_decay == 0):
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
  return pull_after_push(optax.chain(*parts))


def pull_after_push(inner: optax.GradientTransformation) -> PullAfterPush:
  """Wraps ``inner`` so each update also performs the pull of the new params.

  After ``inner`` computes ``updates`` for worker ``m``, worker ``m`` pulls
  ``params + updates`` (:func:`pull`: the state records what ``m`` now
  holds), as in the paper's Algorithm 1 where the worker pulls right after
  pushing. The wrapper's state is ``inner``'s state itself. The result is a
  :class:`PullAfterPush`, so drivers know not to pull again; what the worker
  holds afterwards is ``worker_params(state, m)``.

  A traced ``worker`` outside ``[0, num_workers)`` records no pull; the NaN
  update that :func:`delay_compensation` returns for it reaches the rest of
  ``inner``'s state (put ``optax.apply_if_finite`` after the compensation in
  ``inner`` to skip such steps).

  Args:
    inner: a transformation containing :func:`delay_compensation`.

  Returns:
    A :class:`PullAfterPush` (an ``optax.GradientTransformationExtraArgs``)
    needing ``params`` and ``worker`` in ``update``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> tx = dcasgd_optax.pull_after_push(optax.chain(
    ...     dcasgd_optax.delay_compensation(2, 0.04), optax.adam(1e-3)))
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> updates, state = tx.update({'w': jnp.ones(2)}, state, {'w': jnp.zeros(2)},
    ...                            worker=0)
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    state = inner.init(params)
    if not find_states(state):
      raise ValueError(
          "`inner` holds no delay_compensation: pull_after_push records pulls "
          "in its DelayCompensationState. Put "
          "`dcasgd_optax.delay_compensation(...)` first in the chain."
      )
    return state

  def update_fn(updates, state, params=None, *, worker=None, **extra_args):
    updates, state = inner.update(
        updates, state, params, worker=worker, **extra_args
    )
    _, state = pull(state, optax.apply_updates(params, updates), worker)
    return updates, state

  return PullAfterPush(init_fn, update_fn)
