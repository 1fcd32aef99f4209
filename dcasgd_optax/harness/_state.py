"""The simulators' state: construction and checks."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcasgd_optax import DelayCompensationState
from dcasgd_optax.extend import find_states
from dcasgd_optax.harness import _checks
from dcasgd_optax.harness import _devices


class SimState(NamedTuple):
  """Everything a replay needs to continue: arrays only.

  Attributes:
    params: the server's current model (a params pytree).
    opt_state: the state of ``sim.tx``. For :class:`Simulator` its
      DelayCompensationState backups are the models the workers hold:
      ``dcasgd_optax.worker_params(state.opt_state, m)`` is worker ``m``'s.
      They are sharded by worker over the simulator's devices, each device
      holding a contiguous block; with ``D`` devices their leading axis is
      ``num_workers`` rounded up to a multiple of ``D`` (the extra rows are
      padding).
    model_state: the server's model state (e.g. BatchNorm statistics), the
      one to evaluate with; ``()`` for stateless models. How each simulator
      forms it is its documented model-state policy.
    worker_model_states: the model state each worker holds, every leaf with a
      leading axis of the backups' length, sharded likewise
      (:class:`Simulator`); ``()`` for
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


def check_state(state: Any, expected: SimState, leading: tuple = ()) -> None:
  """Raises unless ``state`` has ``expected``'s structure, shapes and dtypes.

  ``expected`` is the abstract state the simulator's ``init`` makes for the
  same params: so a state from another simulator, another ``tx`` or another
  number of workers is caught here, before anything runs. ``leading`` is a
  shape every leaf of ``state`` has in front (``(N,)`` for N simulations).
  """
  expected = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((*leading, *x.shape), x.dtype), expected
  )
  if not isinstance(state, SimState):
    raise ValueError(
        f"`state` must be a SimState from `init`, got {type(state).__name__}."
    )
  have, want = np.shape(state.last_pull), expected.last_pull.shape
  if have[len(leading):] != want[len(leading):]:
    raise ValueError(
        f"`state` was made for {have[-1] if have else '?'} workers, but this "
        f"simulator has num_workers={want[-1]} for these params."
    )
  for field in SimState._fields:
    if _checks.signature(getattr(state, field)) != _checks.signature(
        getattr(expected, field)):
      raise ValueError(
          f"`state.{field}` does not match what this simulator's `init` makes "
          "for these params (a state from another simulator, or another "
          "tx?); make it with `init`."
      )


def backups_of(opt_state: Any) -> Any:
  """The backups of the one DelayCompensationState in ``opt_state``."""
  return find_states(opt_state)[0].backups


def with_backups(opt_state: Any, backups: Any) -> Any:
  """``opt_state`` with its DelayCompensationState's backups replaced."""
  is_dc = lambda x: isinstance(x, DelayCompensationState)
  return jax.tree.map(
      lambda s: s._replace(backups=backups) if is_dc(s) else s, opt_state,
      is_leaf=is_dc,
  )


def unpadded(opt_state: Any, num_workers: int) -> Any:
  """The shapes and dtypes of ``opt_state`` with its backups cut to their
  first ``num_workers`` rows (without the padding of :func:`worker_rows`):
  those ``tx.init`` makes and ``tx.update`` sees. ``opt_state`` itself if
  it keeps no backups."""
  if not find_states(opt_state):
    return opt_state
  return jax.eval_shape(lambda s: with_backups(s, jax.tree.map(
      lambda b: b[:num_workers], backups_of(s))), opt_state)


def worker_rows(num_workers: int, mesh: Any) -> int:
  """Rows of per-worker storage: ``num_workers`` padded to the device count.

  Each device holds a contiguous block of ``worker_rows / D`` workers'
  backups and model states; rows past ``num_workers`` are padding (copies
  of the initial model, never read as a worker's).
  """
  return _devices.round_up(num_workers, mesh.size)


def initial_state(tx: Any, num_workers: int, mesh: Any, params: Any,
                  model_state: Any, *, per_worker: bool) -> SimState:
  """Every worker holds ``params``; copies, so the arguments are never donated.

  With ``per_worker`` (:class:`Simulator`) the backups and the workers'
  model states get :func:`worker_rows` rows, sharded by worker over ``mesh``;
  everything else is replicated.
  """
  args = _devices.replicate((params, model_state), mesh)
  build = functools.partial(_build, tx, num_workers, mesh,
                            per_worker=per_worker)
  shardings = state_shardings(jax.eval_shape(build, *args), mesh)
  return jax.jit(build, out_shardings=shardings)(*args)


def initial_states(tx: Any, num_workers: int, mesh: Any, params_N: Any,
                   model_state_N: Any, hyperparams_N: dict[str, Any], *,
                   per_worker: bool) -> SimState:
  """:func:`initial_state` for ``N`` simulations: every leaf of ``params_N``
  and ``model_state_N`` (and every value of ``hyperparams_N``) has a leading
  axis ``N``; so does every leaf of the result."""
  args = _devices.replicate((params_N, model_state_N, hyperparams_N), mesh)

  def build(params, model_state, hyperparams):
    state = _build(tx, num_workers, mesh, params, model_state,
                   per_worker=per_worker)
    return state._replace(
        opt_state=set_hyperparams(state.opt_state, hyperparams))

  build_N = jax.vmap(build)
  shardings = state_shardings(jax.eval_shape(build_N, *args), mesh,
                              leading=1)
  return jax.jit(build_N, out_shardings=shardings)(*args)


def set_hyperparams(opt_state: Any, hyperparams: dict[str, Any]) -> Any:
  """``opt_state`` with the named values of its ``optax.inject_hyperparams``
  states replaced (every such state that has the name).

  Raises:
    ValueError: for a name no such state has.
  """
  is_injected = lambda x: isinstance(
      x, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))
  found = set()

  def replace(node):
    if not is_injected(node):
      return node
    names = set(hyperparams) & set(node.hyperparams)
    found.update(names)
    values = {k: jnp.asarray(hyperparams[k], node.hyperparams[k].dtype)
              for k in names}
    return node._replace(hyperparams={**node.hyperparams, **values})

  opt_state = jax.tree.map(replace, opt_state, is_leaf=is_injected)
  if set(hyperparams) - found:
    raise ValueError(
        f"`hyperparams` names {sorted(set(hyperparams) - found)}, which no "
        "optax.inject_hyperparams state in `tx` holds: build tx with "
        "optax.inject_hyperparams(...) and name its hyperparameters."
    )
  return opt_state


def abstract_initial_state(tx: Any, num_workers: int, mesh: Any, params: Any,
                           model_state: Any, *, per_worker: bool) -> SimState:
  """The shapes and dtypes :func:`initial_state` gives, computed abstractly."""
  build = functools.partial(_build, tx, num_workers, mesh,
                            per_worker=per_worker)
  return jax.eval_shape(build, _checks.abstract(params),
                        _checks.abstract(model_state))


def state_shardings(state: SimState, mesh: Any, leading: int = 0) -> SimState:
  """Where each leaf of a state lives: per-worker rows split by worker (the
  axis after ``leading`` ones)."""
  rep, split = _devices.replicated(mesh), _devices.sharded(mesh, leading)
  shardings = jax.tree.map(lambda _: rep, state)
  opt_state = shardings.opt_state
  if find_states(state.opt_state):
    opt_state = with_backups(
        opt_state,
        jax.tree.map(lambda _: split, backups_of(state.opt_state)),
    )
  worker_ms = jax.tree.map(lambda _: split, state.worker_model_states)
  return shardings._replace(opt_state=opt_state,
                            worker_model_states=worker_ms)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
  extra = jnp.broadcast_to(x[:1], (rows - x.shape[0], *x.shape[1:]))
  return jnp.concatenate([x, extra])


def _build(tx, num_workers, mesh, params, model_state, *, per_worker):
  params = jax.tree.map(jnp.copy, params)
  model_state = jax.tree.map(jnp.copy, model_state)
  opt_state = tx.init(params)
  worker_ms = ()
  if per_worker:
    rows = worker_rows(num_workers, mesh)
    opt_state = with_backups(opt_state, jax.tree.map(
        lambda b: _pad_rows(b, rows), backups_of(opt_state)))
    worker_ms = jax.tree.map(
        lambda x: jnp.broadcast_to(x[None], (rows, *jnp.shape(x))),
        model_state,
    )
  return SimState(
      params, opt_state, model_state, worker_ms,
      jnp.zeros((), jnp.int32), jnp.zeros((num_workers,), jnp.int32),
  )
