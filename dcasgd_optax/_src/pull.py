"""Reading and writing what each worker holds, anywhere in an optax state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dcasgd_optax._src import _checks
from dcasgd_optax._src import _rows
from dcasgd_optax._src import _tree
from dcasgd_optax._src._backups import DelayCompensationState
from dcasgd_optax._src._backups import held_by
from dcasgd_optax._src._backups import num_workers_of
from dcasgd_optax._src.look_ahead import LookAheadState
from dcasgd_optax._src.look_ahead import look_ahead_of


def _is_dc_state(x: Any) -> bool:
  return isinstance(x, DelayCompensationState)


def _find(opt_state: Any, state_type: type) -> list[Any]:
  """Every ``state_type`` node nested anywhere in ``opt_state``."""
  is_node = lambda x: isinstance(x, state_type)
  return [n for n in jax.tree.leaves(opt_state, is_leaf=is_node) if is_node(n)]


def find_states(opt_state: Any) -> list[DelayCompensationState]:
  """All DelayCompensationStates nested anywhere in ``opt_state``."""
  return _find(opt_state, DelayCompensationState)


def _no_state_error(opt_state: Any) -> ValueError:
  return ValueError(
      "`opt_state` holds no DelayCompensationState: build the optimizer with "
      "`dcasgd_optax.delay_compensation` (or `dcasgd_optax.dcasgd`) in it. Got "
      f"a state of type {type(opt_state).__name__}."
  )


def record_pull(
    opt_state: optax.OptState,
    params: optax.Params,
    worker: jax.typing.ArrayLike,
) -> optax.OptState:
  """Records that ``worker`` now holds ``params`` (the server's side of a pull).

  Finds every :class:`DelayCompensationState` inside ``opt_state`` (under
  ``optax.chain``, ``named_chain``, ``inject_hyperparams``, ``MultiSteps``,
  ``masked``, ...) and overwrites that worker's backup in place: under ``jit``
  with the state donated, only one model-sized slice is written, whatever
  ``num_workers`` is. Inside ``optax.masked`` only the masked-in leaves are
  recorded. Variable wrappers (Flax NNX's ``OptVariable`` in
  ``nnx.Optimizer.opt_state``, ``Param`` in ``nnx.state(model, nnx.Param)``)
  are seen through and the state keeps its own.

  A traced ``worker`` outside ``[0, num_workers)`` writes nothing (no other
  worker's backup is touched); a concrete one raises ``ValueError``.

  Args:
    opt_state: an optimizer state containing a DelayCompensationState.
    params: the model the worker pulled, shaped like the params at init
      (bare arrays or variable-wrapped, e.g. ``nnx.state(model, nnx.Param)``).
    worker: the worker's id, a Python int or an int32 scalar (may be traced).

  Returns:
    ``opt_state`` with that worker's backup replaced by ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dcasgd_optax
    >>> tx = dcasgd_optax.delay_compensation(num_workers=3)
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> state = dcasgd_optax.record_pull(state, {'w': jnp.ones(2)}, worker=2)
    >>> dcasgd_optax.worker_params(state, 2)['w']
    Array([1., 1.], dtype=float32)
  """
  if not find_states(opt_state):
    raise _no_state_error(opt_state)

  def write(state):
    if not _is_dc_state(state):
      return state
    num_workers = num_workers_of(state)
    if num_workers is None:
      return state
    _checks.check_worker(worker, num_workers)
    _tree.check_matches_backups("params", params, state.backups)
    valid = jnp.logical_and(worker >= 0, worker < num_workers)
    # An invalid id becomes num_workers, which `mode="drop"` ignores.
    idx = jnp.where(valid, jnp.asarray(worker, jnp.int32), num_workers)
    row = jnp.clip(jnp.asarray(worker, jnp.int32), 0, num_workers - 1)

    def put(b, p):
      if _tree.is_masked(b):
        return b
      if _rows.is_narrow(b.dtype):  # A scatter would convert all of b.
        return _rows.write_row(b, row, jnp.asarray(p), valid)
      return b.at[idx].set(jnp.asarray(p).astype(b.dtype), mode="drop")

    backups = _tree.map_like(put, state.backups, params)
    return state._replace(backups=backups)

  return jax.tree.map(write, opt_state, is_leaf=_is_dc_state)


def pull(
    opt_state: optax.OptState,
    params: optax.Params,
    worker: jax.typing.ArrayLike,
) -> tuple[optax.Params, optax.OptState]:
  """The server's side of a pull: what ``worker`` receives, kept as its backup.

  Every driver of asynchronous training (the simulator, :func:`pull_after_push`,
  the Ray parameter server) calls this when a worker pulls, and sends the
  worker the returned params: the worker computes its next gradient there,
  and :func:`delay_compensation` later compares the server's model with
  exactly that point. The worker receives ``params`` themselves, unless the
  optimizer holds a :func:`look_ahead_momentum`: then it receives that
  transformation's prediction of the model ``horizon`` updates ahead.
  :func:`record_pull` is the lower-level write this is built on.

  A traced ``worker`` outside ``[0, num_workers)`` records nothing (see
  :func:`record_pull`) and the returned params are NaN, as
  :func:`delay_compensation`'s update is for such an id; a concrete one
  raises ``ValueError``.

  Args:
    opt_state: an optimizer state containing a DelayCompensationState.
    params: the server's current params, shaped like the params at init
      (bare arrays or variable-wrapped, e.g. ``nnx.state(model, nnx.Param)``).
    worker: the worker's id, a Python int or an int32 scalar (may be traced).

  Returns:
    ``(pulled_params, opt_state)``: the params to send to the worker (bare
    arrays in ``params``' containers; ``nnx.update`` takes them), and
    ``opt_state`` with them recorded as that worker's backup.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dcasgd_optax
    >>> tx = dcasgd_optax.delay_compensation(num_workers=2)
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> pulled, state = dcasgd_optax.pull(state, {'w': jnp.ones(2)}, worker=1)
    >>> pulled['w']
    Array([1., 1.], dtype=float32)
    >>> dcasgd_optax.worker_params(state, 1)['w']
    Array([1., 1.], dtype=float32)
  """
  states = find_states(opt_state)
  if not states:
    raise _no_state_error(opt_state)
  num_workers = num_workers_of(states[0])
  pulled = _tree.unwrap_variables(params)
  ahead = _find(opt_state, LookAheadState)
  if len(ahead) > 1:
    raise ValueError(
        f"`opt_state` holds {len(ahead)} LookAheadStates; a pull can follow "
        "only one look-ahead. Use one look_ahead_momentum per optimizer."
    )
  if ahead:
    _tree.check_matches_backups("params", pulled, states[0].backups)
    pulled = look_ahead_of(_tree.unwrap_variables(ahead[0]), pulled)
  if num_workers is not None:
    _checks.check_worker(worker, num_workers)
    if _checks.concrete_value(worker) is None:  # Traced: may be out of range.
      pulled = _nan_unless_valid(pulled, worker, num_workers)
  return pulled, record_pull(opt_state, pulled, worker)


def _nan_unless_valid(tree: Any, worker: Any, num_workers: int) -> Any:
  """``tree``, or all NaN if ``worker`` is outside ``[0, num_workers)``."""
  valid = jnp.logical_and(worker >= 0, worker < num_workers)

  def mask(x):
    if _tree.is_masked(x):
      return x
    x = jnp.asarray(x)
    return jnp.where(valid, x, jnp.asarray(jnp.nan, x.dtype))

  return jax.tree.map(mask, tree, is_leaf=_tree.is_masked)


def worker_params(
    opt_state: optax.OptState, worker: jax.typing.ArrayLike
) -> optax.Params:
  """The params ``worker`` holds: its backup, in the backups' dtype.

  Args:
    opt_state: an optimizer state containing exactly one
      DelayCompensationState.
    worker: the worker's id, a Python int or an int32 scalar (may be
      traced; a traced id outside ``[0, num_workers)`` gives all-NaN params,
      as :func:`delay_compensation`'s update does, never another worker's
      model; a concrete one raises ``ValueError``).

  Returns:
    A params-shaped pytree of bare arrays (leaves excluded by
    ``optax.masked`` stay ``optax.MaskedNode``). Variable wrappers in the
    state (Flax NNX's ``OptVariable``) are removed, so for an NNX user
    ``nnx.update(model, worker_params(optimizer.opt_state, m))`` puts worker
    ``m``'s model into ``model``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dcasgd_optax
    >>> tx = dcasgd_optax.dcasgd(0.1, num_workers=4)
    >>> state = tx.init({'w': jnp.ones(3)})
    >>> dcasgd_optax.worker_params(state, 0)['w']  # everyone starts at init
    Array([1., 1., 1.], dtype=float32)
  """
  states = find_states(opt_state)
  if not states:
    raise _no_state_error(opt_state)
  if len(states) > 1:
    raise ValueError(
        f"`opt_state` holds {len(states)} DelayCompensationStates; "
        "worker_params needs exactly one. Call it on the sub-state you mean."
    )
  backups = _tree.unwrap_variables(states[0].backups)
  num_workers = num_workers_of(states[0])
  if num_workers is None:
    return backups
  _checks.check_worker(worker, num_workers)
  held = held_by(backups, worker, num_workers)
  if _checks.concrete_value(worker) is None:  # Traced: may be out of range.
    held = _nan_unless_valid(held, worker, num_workers)
  return held
