"""Pull after push: an update that also records the worker's pull, and the
state that says so to a driver of asynchronous training."""

from __future__ import annotations

from typing import Any, NamedTuple

import optax

from dcasgd_optax._src.pull import find_states
from dcasgd_optax._src.pull import pull


class PullAfterPushState(NamedTuple):
  """The state of :func:`pull_after_push`: its inner transformation's.

  Its type is the fact a driver of asynchronous training needs: an update
  with this state also records the worker's pull (:func:`pull`) of the
  params it returns. A state travels through every optax wrapper (a type is
  part of the pytree's structure, kept by ``jit`` too), where the
  transformation's own type is hidden by the first wrapper; see
  :func:`dcasgd_optax.extend.pulls_in_update`.

  Attributes:
    inner_state: the state of ``pull_after_push``'s ``inner``.
  """

  inner_state: Any


def pulls_in_update(opt_state: Any) -> bool:
  """Whether the update that takes ``opt_state`` records the worker's pull.

  True when ``opt_state`` is a :class:`PullAfterPushState`, or holds one
  where the transformation's updates are that pull-after-push's own: inside
  ``optax.inject_hyperparams`` (which passes them through) or as the last
  member of an ``optax.chain`` (a tuple). Anywhere else (before another
  chain member, inside ``optax.masked``, ``MultiSteps`` or
  ``apply_if_finite``, which change or skip the updates) the recorded pull
  may not be of the params the driver ends with, so the driver must pull:
  at worst redundant, never wrong. Only the state's structure is read, so
  an abstract state (``jax.eval_shape(tx.init, params)``) or one being
  traced answers the same.
  """
  wrappers = (optax.InjectHyperparamsState,
              optax.InjectStatefulHyperparamsState)
  node = opt_state
  while True:
    if isinstance(node, PullAfterPushState):
      return True
    if isinstance(node, wrappers):
      node = node.inner_state
    elif type(node) is tuple and node:  # An optax.chain: its last member's.
      node = node[-1]
    else:
      return False


class PullAfterPush(optax.GradientTransformationExtraArgs):
  """A transformation whose every ``update`` also performs the worker's pull.

  :func:`pull_after_push` (and so :func:`dcasgd`) returns one. It is an
  ``optax.GradientTransformationExtraArgs`` in every respect: after
  ``tx.update(..., worker=m)`` the pull of the new model is already recorded
  (:func:`pull`), so a driver must not pull again. What the worker then
  holds is ``worker_params(opt_state, m)``. A driver learns that from the
  state, a :class:`PullAfterPushState`
  (:func:`dcasgd_optax.extend.pulls_in_update`), which wrappers such as
  ``optax.inject_hyperparams`` keep, where they hide this type.

  The full optimizers (:func:`dcasgd`, ...) also say which transformation
  makes their compensated gradient, the first of their chain: its attribute
  ``compensation`` (``None`` where unknown, as for :func:`pull_after_push`
  of a user's chain). A driver re-runs it to see the direction the update
  applied (the simulator's diagnostics do).

  Attributes:
    compensation: the chain's first transformation
      (:func:`delay_compensation` or :func:`gap_aware`), or ``None``.

  Examples:
    >>> import dcasgd_optax
    >>> tx = dcasgd_optax.dcasgd(0.1, num_workers=2)
    >>> isinstance(tx, dcasgd_optax.PullAfterPush)
    True
    >>> tx.compensation is not None
    True
  """

  compensation: Any = None  # Per instance when given (instances have a dict).

  def __new__(cls, init: Any, update: Any, compensation: Any = None):
    self = super().__new__(cls, init, update)
    if compensation is not None:
      self.compensation = compensation
    return self


def compensation_of(tx: Any) -> Any:
  """The transformation whose output is ``tx``'s compensated gradient.

  ``tx.compensation`` for a full optimizer of this library (a
  :class:`PullAfterPush` that knows it), else ``None``.
  """
  return tx.compensation if isinstance(tx, PullAfterPush) else None


def pull_after_push(inner: optax.GradientTransformation, *,
                    compensation: Any = None) -> PullAfterPush:
  """Wraps ``inner`` so each update also performs the pull of the new params.

  After ``inner`` computes ``updates`` for worker ``m``, worker ``m`` pulls
  ``params + updates`` (:func:`pull`: the state records what ``m`` now
  holds), as in the paper's Algorithm 1 where the worker pulls right after
  pushing. The wrapper's state is a :class:`PullAfterPushState` around
  ``inner``'s, which tells drivers not to pull again (the result is also a
  :class:`PullAfterPush`); what the worker holds afterwards is
  ``worker_params(state, m)``.

  A traced ``worker`` outside ``[0, num_workers)`` records no pull; the NaN
  update that :func:`delay_compensation` returns for it reaches the rest of
  ``inner``'s state (put ``optax.apply_if_finite`` after the compensation in
  ``inner`` to skip such steps).

  Args:
    inner: a transformation containing :func:`delay_compensation`.
    compensation: the transformation that starts ``inner``'s chain (its
      output is the compensated gradient), recorded as the result's
      ``compensation`` for drivers (e.g. the simulator's diagnostics); None
      if not given.

  Returns:
    A :class:`PullAfterPush` (an ``optax.GradientTransformationExtraArgs``)
    needing ``params`` and ``worker`` in ``update``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> tx = dcasgd_optax.pull_after_push(optax.chain(
    ...     dcasgd_optax.delay_compensation(2, 0.04), optax.adam(1e-3)))
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> updates, state = tx.update(
    ...     {'w': jnp.ones(2)}, state, {'w': jnp.zeros(2)}, worker=0)
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
    return PullAfterPushState(state)

  def update_fn(updates, state, params=None, *, worker=None, **extra_args):
    updates, state = inner.update(
        updates, state.inner_state, params, worker=worker, **extra_args
    )
    _, state = pull(state, optax.apply_updates(params, updates), worker)
    return updates, PullAfterPushState(state)

  return PullAfterPush(init_fn, update_fn, compensation)
