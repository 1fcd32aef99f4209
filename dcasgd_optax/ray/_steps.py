"""One shard's arithmetic: the jitted update and pull, and their arguments.

:func:`make_steps` builds the two jitted functions a
:class:`~dcasgd_optax.ray._server.ParameterServer` runs on its part of the
params and optax state; :func:`resolve_num_workers` and
:func:`check_wire_dtype` check the arguments they are built from (also used
by :func:`~dcasgd_optax.ray.train`, before any actor starts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcasgd_optax import extend
from dcasgd_optax import pull as pull_hook
from dcasgd_optax import record_pull
from dcasgd_optax.extend import find_states
from dcasgd_optax.extend import num_workers_of
from dcasgd_optax.ray import _layout


def resolve_num_workers(tx: Any, params: Any, num_workers: int | None) -> int:
  """The number of workers: given, or read from ``tx``'s backups; checked.

  Raises:
    ValueError: if ``tx`` keeps backups for another number of workers, or
      if it keeps none and ``num_workers`` is None.
  """
  shapes = jax.eval_shape(optax.with_extra_args_support(tx).init, params)
  counts = {
      n for s in find_states(shapes) if (n := num_workers_of(s)) is not None
  }
  if num_workers is None:
    if len(counts) != 1:
      raise ValueError(
          "`num_workers` is None, but `tx` keeps no per-worker backups to "
          "read it from (or several counts); pass `num_workers`."
      )
    return counts.pop()
  num_workers = extend.check_positive_int("num_workers", num_workers)
  if counts - {num_workers}:
    raise ValueError(
        f"`tx` keeps backups for {counts.pop()} workers, but `num_workers` "
        f"is {num_workers}; build tx with the same count."
    )
  return num_workers


def check_wire_dtype(wire_dtype: Any) -> np.dtype | None:
  """``None``, or the floating dtype pieces are sent in (e.g. bfloat16)."""
  if wire_dtype is None:
    return None
  try:
    dtype = np.dtype(jnp.dtype(wire_dtype))
  except TypeError as e:
    raise TypeError(f"`wire_dtype` must be a floating dtype or None, got "
                    f"{wire_dtype!r}.") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`wire_dtype` must be a floating dtype or None, got "
                    f"{wire_dtype!r}.")
  return dtype


def make_steps(tx: Any, layout: _layout.Layout, shard: int,
               wire: np.dtype | None, opt_state: Any
               ) -> tuple[Callable, Callable]:
  """The jitted ``apply`` (update, then pull) and ``pull`` of one shard.

  ``opt_state`` is the shard's initial state: if it holds per-worker
  backups, a pull records the params pulled in them.
  """
  has_backups = bool(find_states(opt_state))
  specs = _layout.piece_specs(layout, shard)

  def on_wire(x):
    return x if wire is None else x.astype(wire)

  def pull(params, opt_state, worker):
    """The worker's pull (dcasgd_optax.pull: maybe a look-ahead) on the wire."""
    pulled = params
    if has_backups:
      pulled, recorded = pull_hook(opt_state, params, worker)
      if wire is None:
        opt_state = recorded
      else:  # The worker holds the rounded params: record those instead.
        pulled = jax.tree.map(lambda x: on_wire(x).astype(x.dtype), pulled)
        opt_state = record_pull(opt_state, pulled, worker)
    return opt_state, [on_wire(x) for x in _layout.owned(layout, shard, pulled)]

  def apply(params, opt_state, grads, worker, staleness, finite):
    grads = [g.astype(d) for g, (_, d) in zip(grads, specs)]
    finite = jnp.logical_and(
        finite, jnp.all(jnp.array([jnp.isfinite(g).all() for g in grads])))
    grads = _layout.shard_tree(layout, shard, grads)

    def update(operand):
      params, opt_state = operand
      updates, opt_state = tx.update(grads, opt_state, params, worker=worker,
                                     staleness=staleness)
      return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda o: o,
                                     (params, opt_state))
    # Pull even if tx's update pulled already (a PullAfterPush): redundant
    # then, not wrong, and it keeps skipped updates and wire rounding right.
    opt_state, pulled = pull(params, opt_state, worker)
    return params, opt_state, pulled, finite

  return (jax.jit(apply, donate_argnums=(0, 1)),
          jax.jit(pull, donate_argnums=(1,)))
