"""The optimizer a simulated server runs, and the number of workers it implies.

The number of workers is a fact of the optimizer state's shape: the leading
axis of the backups in its ``DelayCompensationState``. :func:`workers_of` reads
it there once and is the one place it is checked against a ``num_workers``
given to a simulator; everything after reads it from the simulator's state
(``SimState.last_pull`` has one entry per worker).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from dcasgd_optax import delay_compensation
from dcasgd_optax import extend
from dcasgd_optax.extend import find_states
from dcasgd_optax.extend import num_workers_of
from dcasgd_optax.harness import _checks


def _backups_state(tx: Any, params: Any) -> Any:
  """The DelayCompensationState of ``tx``'s state for ``params``, or None."""
  states = find_states(jax.eval_shape(tx.init, _checks.abstract(params)))
  if not states:
    return None
  if len(states) > 1 or any(
      extend.is_masked(b)
      for b in jax.tree.leaves(states[0].backups, is_leaf=extend.is_masked)
  ):
    raise ValueError(
        "`tx` must hold exactly one DelayCompensationState covering every "
        f"parameter (found {len(states)}, or one inside optax.masked): the "
        "simulator reads what each worker holds from its backups."
    )
  return states[0]


def keeps_backups(tx: Any, params: Any) -> bool:
  """Whether ``tx``'s state for ``params`` holds a DelayCompensationState."""
  return _backups_state(tx, params) is not None


def workers_of(tx: Any, params: Any, num_workers: int | None) -> int:
  """The number of workers: that of ``tx``'s backups, else ``num_workers``.

  Args:
    tx: the user's optax transformation.
    params: the params (or their shapes) the state is made for.
    num_workers: the number given to the simulator, or ``None``.

  Returns:
    The leading axis of ``tx``'s backups if it keeps any, else
    ``num_workers``.

  Raises:
    ValueError: if the two disagree, or neither is known.
  """
  state = _backups_state(tx, params)
  stored = None if state is None else num_workers_of(state)
  if stored is None:
    if num_workers is None:
      raise ValueError(
          "`num_workers` is needed: `tx` keeps no per-worker backups (no "
          "DelayCompensationState) from which to read it. Pass "
          "`num_workers=M` to the simulator."
      )
    return num_workers
  if num_workers is not None and num_workers != stored:
    raise ValueError(
        f"`num_workers`={num_workers} disagrees with `tx`, whose "
        f"DelayCompensationState keeps backups for {stored} workers. Build "
        "both with the same number of workers (or leave `num_workers` out)."
    )
  return stored


def with_backups(
    tx: Any, num_workers: int | None
) -> optax.GradientTransformationExtraArgs:
  """``tx`` if it keeps per-worker backups, else ``tx`` after λ=0 ones.

  The asynchronous simulator reads the model each worker holds from the
  backups of a ``DelayCompensationState``. A ``tx`` without one (any optax
  optimizer) runs after ``delay_compensation(num_workers, 0.0)``, which keeps
  the backups and passes the gradient through unchanged, so plain ASGD and
  DC-ASGD go through the same path. Which of the two applies is decided from
  the params' structure, in ``init`` and again (statically) in ``update``.
  """
  tx = optax.with_extra_args_support(tx)

  def server_tx(params):
    if _backups_state(tx, params) is not None:
      return tx
    return optax.with_extra_args_support(
        optax.chain(
            delay_compensation(workers_of(tx, params, num_workers), 0.0), tx
        )
    )

  def init_fn(params):
    return server_tx(params).init(params)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("`params` is None: the simulated server passes them.")
    return server_tx(params).update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
