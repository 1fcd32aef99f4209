"""One shard's arithmetic: the jitted update and pull, and their arguments.

:func:`make_steps` builds the two jitted functions a
:class:`~dcasgd_optax.ray._server.ParameterServer` runs on its part of the
params and optax state; :func:`resolve_num_workers`,
:func:`check_wire_dtype` and :func:`check_push_grad_sq` check the arguments
they are built from (also used by :func:`~dcasgd_optax.ray.train`, before
any actor starts).
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


def _uses(jaxpr: Any, count: int) -> bool:
  """Whether any equation or output of ``jaxpr`` reads its first ``count``
  inputs."""
  inputs = {id(v) for v in jaxpr.invars[:count]}
  read = [v for eqn in jaxpr.eqns for v in eqn.invars] + list(jaxpr.outvars)
  return any(id(v) in inputs for v in read)


def check_push_grad_sq(tx: Any, params: Any, push_grad_sq: Any) -> bool:
  """``push_grad_sq``: a bool, True exactly when ``tx.update`` reads
  ``grad_sq``.

  ``tx.update`` is traced abstractly, as a shard calls it (``params``,
  ``worker``, ``staleness`` and, with the option, ``grad_sq``), and
  ``grad_sq`` is read if any operation of the trace takes it (as
  :func:`~dcasgd_optax.fisher_compensation` does; a transformation without
  extra arguments drops it).

  Raises:
    TypeError: if ``push_grad_sq`` is not a bool.
    ValueError: if ``tx.update`` fails on params-shaped arguments, needs
      ``grad_sq`` without the option, or ignores it with the option.
  """
  if not isinstance(push_grad_sq, bool):
    raise TypeError(f"`push_grad_sq` must be a bool, got {push_grad_sq!r}.")
  tx = optax.with_extra_args_support(tx)
  spec = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), params)
  state = jax.eval_shape(tx.init, params)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)

  def update(grad_sq, grads, opt_state, params, worker, staleness):
    extra = {"grad_sq": grad_sq} if push_grad_sq else {}
    return tx.update(grads, opt_state, params, worker=worker,
                     staleness=staleness, **extra)

  try:
    closed = jax.make_jaxpr(update)(spec, spec, state, spec, scalar, scalar)
  except Exception as e:  # pylint: disable=broad-except
    if not push_grad_sq and "grad_sq" in str(e):
      raise ValueError(
          "`tx` needs the keyword `grad_sq` (e.g. fisher_compensation, "
          "fisher_dcasgd: the mean of the per-example squared gradients); "
          "pass `push_grad_sq=True` so that the workers push it."
      ) from e
    raise ValueError(
        "`tx.update(grads, opt_state, params, worker=..., staleness=..."
        f"{', grad_sq=...' if push_grad_sq else ''})` fails on params-shaped "
        f"arguments ({type(e).__name__}: {e})."
    ) from e
  if push_grad_sq and not _uses(closed.jaxpr,
                                len(jax.tree.leaves(spec))):
    raise ValueError(
        "`push_grad_sq=True`, but `tx.update` does not read `grad_sq`: the "
        "workers would compute per-example gradients and push an extra "
        "params-sized array for nothing. Use a transformation that takes "
        "it (fisher_compensation, fisher_dcasgd), or push_grad_sq=False."
    )
  return push_grad_sq


def make_steps(tx: Any, layout: _layout.Layout, shard: int,
               wire: np.dtype | None, opt_state: Any,
               push_grad_sq: bool = False) -> tuple[Callable, Callable]:
  """The jitted ``apply`` (update, then pull) and ``pull`` of one shard.

  ``opt_state`` is the shard's initial state: if it holds per-worker
  backups, a pull records the params pulled in them. With ``push_grad_sq``,
  ``apply``'s ``grad_sq`` (the shard's pieces, like ``grads``) reaches
  ``tx.update`` as the keyword ``grad_sq``; else it is ``[]``.
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

  def apply(params, opt_state, grads, grad_sq, worker, staleness, finite):
    cast = lambda xs: [x.astype(d) for x, (_, d) in zip(xs, specs)]
    grads, grad_sq = cast(grads), cast(grad_sq)
    # A non-finite grad_sq is skipped as a non-finite gradient is.
    finite = jnp.logical_and(finite, jnp.all(jnp.array(
        [jnp.isfinite(x).all() for x in grads + grad_sq])))
    grads = _layout.shard_tree(layout, shard, grads)
    extra = {}
    if push_grad_sq:
      extra["grad_sq"] = _layout.shard_tree(layout, shard, grad_sq)

    def update(operand):
      params, opt_state = operand
      updates, opt_state = tx.update(grads, opt_state, params, worker=worker,
                                     staleness=staleness, **extra)
      return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda o: o,
                                     (params, opt_state))
    # Pull even if tx's update pulled already (a PullAfterPush): redundant
    # then, not wrong, and it keeps skipped updates and wire rounding right.
    opt_state, pulled = pull(params, opt_state, worker)
    return params, opt_state, pulled, finite

  return (jax.jit(apply, donate_argnums=(0, 1)),
          jax.jit(pull, donate_argnums=(1,)))
