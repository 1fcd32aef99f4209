"""The simulators' state: construction and checks."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dcasgd_optax.harness import _devices


class SimState(NamedTuple):
  """Everything a replay needs to continue: arrays only.

  Attributes:
    params: the server's current model (a params pytree).
    opt_state: the optimizer state of ``sim.tx(params)``; its
      DelayCompensationState backups (``[num_workers, ...]`` per leaf) are
      the models the workers hold:
      ``dcasgd_optax.worker_params(state.opt_state, m)`` is worker ``m``'s.
    model_state: the server's model state (e.g. BatchNorm statistics): the
      one pushed by the most recent arrival; ``()`` for stateless models.
    worker_model_states: the model state each worker holds, every leaf with a
      leading ``num_workers`` axis; ``()`` for stateless models.
    step: int32 ``[]``, server updates so far.
    last_pull: int32 ``[num_workers]``, the step at which each worker last
      pulled (0 at init); an arrival's staleness is ``step - last_pull[m]``.
  """

  params: Any
  opt_state: Any
  model_state: Any
  worker_model_states: Any
  step: jax.Array
  last_pull: jax.Array


def check_state(state: Any, state_type: type, num_workers: int) -> None:
  """Raises unless ``state`` is a ``state_type`` made for ``num_workers``."""
  if not isinstance(state, state_type):
    raise ValueError(
        f"`state` must be a {state_type.__name__} from `init`, got "
        f"{type(state).__name__}."
    )
  if np.shape(state.last_pull) != (num_workers,):
    raise ValueError(
        f"`state` was made for {np.shape(state.last_pull)[0]} workers, but "
        f"this simulator has num_workers={num_workers}."
    )

def initial_state(state_type: type, tx: Any, num_workers: int, mesh: Any,
                  params: Any, model_state: Any, *, per_worker_model_state: bool):
  """Every worker holds ``params``; copies, so the arguments are never donated."""

  def build(params, model_state):
    params = jax.tree.map(jnp.copy, params)
    model_state = jax.tree.map(jnp.copy, model_state)
    worker_ms = ()
    if per_worker_model_state:
      worker_ms = jax.tree.map(
          lambda x: jnp.broadcast_to(x[None], (num_workers, *jnp.shape(x))),
          model_state,
      )
    return state_type(
        params, tx.init(params), model_state, worker_ms,
        jnp.zeros((), jnp.int32), jnp.zeros((num_workers,), jnp.int32),
    )

  args = _devices.replicate((params, model_state), mesh)
  return jax.jit(build, out_shardings=_devices.replicated(mesh))(*args)
