"""The simulators' state: construction and checks."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dcasgd_optax.harness import _checks
from dcasgd_optax.harness import _devices


class SimState(NamedTuple):
  """Everything a replay needs to continue: arrays only.

  Attributes:
    params: the server's current model (a params pytree).
    opt_state: the state of ``sim.tx``. For :class:`Simulator` its
      DelayCompensationState backups (``[num_workers, ...]`` per leaf) are
      the models the workers hold:
      ``dcasgd_optax.worker_params(state.opt_state, m)`` is worker ``m``'s.
    model_state: the server's model state (e.g. BatchNorm statistics), the
      one to evaluate with; ``()`` for stateless models. How each simulator
      forms it is its documented model-state policy.
    worker_model_states: the model state each worker holds, every leaf with a
      leading ``num_workers`` axis (:class:`Simulator`); ``()`` for
      stateless models and for :class:`SyncSimulator`, whose workers all
      compute with the server's.
    step: int32 ``[]``, server updates so far.
    last_pull: int32 ``[num_workers]``, the step at which each worker last
      pulled (0 at init); an arrival's staleness is ``step - last_pull[m]``.
      Its length is the number of workers the state is made for.
  """

  params: Any
  opt_state: Any
  model_state: Any
  worker_model_states: Any
  step: jax.Array
  last_pull: jax.Array


def check_state(state: Any, expected: SimState) -> None:
  """Raises unless ``state`` has the structure, shapes and dtypes of ``expected``.

  ``expected`` is the abstract state the simulator's ``init`` makes for the
  same params: so a state from another simulator, another ``tx`` or another
  number of workers is caught here, before anything runs.
  """
  if not isinstance(state, SimState):
    raise ValueError(
        f"`state` must be a SimState from `init`, got {type(state).__name__}."
    )
  have, want = np.shape(state.last_pull), expected.last_pull.shape
  if have != want:
    raise ValueError(
        f"`state` was made for {have[0] if have else '?'} workers, but this "
        f"simulator has num_workers={want[0]} for these params."
    )
  for field in SimState._fields:
    if _checks.signature(getattr(state, field)) != _checks.signature(
        getattr(expected, field)):
      raise ValueError(
          f"`state.{field}` does not match what this simulator's `init` makes "
          "for these params (a state from another simulator, or another "
          "tx?); make it with `init`."
      )


def initial_state(tx: Any, num_workers: int, mesh: Any, params: Any,
                  model_state: Any, *, per_worker_model_state: bool) -> SimState:
  """Every worker holds ``params``; copies, so the arguments are never donated."""
  args = _devices.replicate((params, model_state), mesh)
  build = functools.partial(
      _build, tx, num_workers, per_worker_model_state=per_worker_model_state
  )
  return jax.jit(build, out_shardings=_devices.replicated(mesh))(*args)


def abstract_initial_state(tx: Any, num_workers: int, params: Any,
                           model_state: Any, *,
                           per_worker_model_state: bool) -> SimState:
  """The shapes and dtypes :func:`initial_state` gives, computed abstractly."""
  build = functools.partial(
      _build, tx, num_workers, per_worker_model_state=per_worker_model_state
  )
  return jax.eval_shape(build, _checks.abstract(params),
                        _checks.abstract(model_state))


def _build(tx, num_workers, params, model_state, *, per_worker_model_state):
  params = jax.tree.map(jnp.copy, params)
  model_state = jax.tree.map(jnp.copy, model_state)
  worker_ms = ()
  if per_worker_model_state:
    worker_ms = jax.tree.map(
        lambda x: jnp.broadcast_to(x[None], (num_workers, *jnp.shape(x))),
        model_state,
    )
  return SimState(
      params, tx.init(params), model_state, worker_ms,
      jnp.zeros((), jnp.int32), jnp.zeros((num_workers,), jnp.int32),
  )
