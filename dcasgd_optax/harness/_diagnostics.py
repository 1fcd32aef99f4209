r"""Is compensation helping, here? Each gradient against the fresh one.

For a sampled arrival of worker ``m`` with batch ``b`` the server also
computes the fresh gradient :math:`f = \nabla L(w, b)` at its current model
``w`` (before the update) and compares with it the gradient the worker pushed,
:math:`g = \nabla L(w_m, b)`, and the direction :math:`d` that the first
transformation of the server's chain made of it (the compensated gradient):

.. math::
  \mathrm{cosine}(x) = \frac{\langle x, f \rangle}{\|x\| \, \|f\|},
  \qquad \mathrm{error}(x) = \frac{\|x - f\|}{\|f\|},

over all parameters at once: ``stale_*`` for :math:`x = g`, ``applied_*`` for
:math:`x = d`. The extra cost is one gradient per sampled arrival.

With ``curvature`` also ``curvature_ratio``, the ratio :math:`k` of the
compensation's curvature to the true one along :math:`w - w_m`
(:mod:`_exact`), for one Hessian-vector product more.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcasgd_optax import extend
from dcasgd_optax.harness import _checks
from dcasgd_optax.harness import _exact
from dcasgd_optax.harness import _state

KEYS = ("stale_cosine", "applied_cosine", "stale_error", "applied_error")
CURVATURE_KEY = "curvature_ratio"


class Diagnostics(NamedTuple):
  """Which arrivals to diagnose, and how to get their applied direction."""

  every: int  # arrivals at server steps that are multiples of it are sampled
  first_transform: Any  # optax transformation, or None: the identity
  curvature: bool = False  # also the curvature ratio (CURVATURE_KEY)


def keys(diagnostics: Diagnostics) -> tuple[str, ...]:
  """The metric keys ``diagnostics`` record."""
  return KEYS + ((CURVATURE_KEY,) if diagnostics.curvature else ())


def make(diagnostics: bool, diagnostics_every: int | None,
         first_transform: Any, has_model_state: bool,
         curvature: bool = False,
         exact: float | None = None) -> Diagnostics | None:
  """The validated constructor arguments, or None when diagnostics are off.

  ``curvature`` (``diagnose_curvature``) implies diagnostics and needs a
  curvature estimate: ``first_transform`` (checked against ``tx``'s state by
  :func:`check`) or the exact compensation (``exact``, its lambda).
  """
  for name, value in (("diagnostics", diagnostics),
                      ("diagnose_curvature", curvature)):
    if not isinstance(value, bool):
      raise TypeError(f"`{name}` must be a bool, got {value!r}.")
  if curvature and first_transform is None and exact is None:
    raise ValueError(
        "`diagnose_curvature` needs a compensation with a curvature "
        "estimate, and there is none: plain ASGD pushes the stale gradient "
        "unchanged. Pass `first_transform` (the delay_compensation that "
        "starts tx's chain, e.g. DC-ASGD's) or `exact_compensation`."
    )
  diagnostics = diagnostics or curvature
  if diagnostics_every is not None:
    extend.check_positive_int("diagnostics_every", diagnostics_every)
  if first_transform is not None and not (
      hasattr(first_transform, "init") and hasattr(first_transform, "update")):
    raise TypeError(
        "`first_transform` must be an optax transformation (the first member "
        f"of tx's chain) or None, got {first_transform!r}."
    )
  if not diagnostics and diagnostics_every is None:
    return None
  if has_model_state:
    raise ValueError(
        "`diagnostics` are not supported with has_model_state=True: the fresh "
        "gradient of a stateful model depends on which model state it is "
        "taken with. Diagnose a stateless loss_fn."
    )
  if first_transform is not None:
    first_transform = optax.with_extra_args_support(first_transform)
  return Diagnostics(diagnostics_every or 1, first_transform, curvature)


def _is_state_of(target: Any) -> Any:
  return lambda node: _checks.signature(node) == target


def first_state(opt_state: Any, first_transform: Any, params: Any) -> Any:
  """The node of ``opt_state`` structured as ``first_transform``'s state.

  The first such node in ``opt_state``'s flattening order: for an
  ``optax.chain`` (also inside :func:`dcasgd_optax.pull_after_push`), the
  state of its first member.

  Raises:
    ValueError: if there is none.
  """
  target = _checks.signature(
      jax.eval_shape(first_transform.init, _checks.abstract(params))
  )
  nodes = jax.tree.leaves(opt_state, is_leaf=_is_state_of(target))
  for node in nodes:
    if _is_state_of(target)(node):
      return node
  raise ValueError(
      "`first_transform`'s state was not found in `tx`'s state: pass the "
      "transformation that starts tx's chain (e.g. the "
      "`dcasgd_optax.delay_compensation(...)` you chained)."
  )


def check(diagnostics: Diagnostics, opt_state: Any, params: Any,
          tx_compensates: bool) -> None:
  """Raises before anything runs if the applied direction cannot be had.

  ``opt_state`` is the state ``tx.update`` sees, whose backups have one row
  per worker (not the simulator's storage padded to a multiple of the
  devices, :func:`_state.unpadded`): ``first_transform.init`` makes that.
  """
  if diagnostics.first_transform is None:
    if tx_compensates:
      raise ValueError(
          "`diagnostics` need `first_transform` when `tx` keeps its own "
          "DelayCompensationState and is not one of dcasgd_optax's full "
          "optimizers (which know theirs, unless a wrapper such as "
          "optax.inject_hyperparams hides them): pass the transformation "
          "that starts tx's "
          "chain (e.g. dc = dcasgd_optax.delay_compensation(...); tx = "
          "dcasgd_optax.pull_after_push(optax.chain(dc, optax.sgd(lr))); "
          "Simulator(loss_fn, tx, diagnostics=True, first_transform=dc))."
      )
    return
  node = first_state(opt_state, diagnostics.first_transform, params)
  # The compensation's state is, or holds (secant_compensation's), the
  # DelayCompensationState with the worker's backup.
  if diagnostics.curvature and not extend.find_states(node):
    raise ValueError(
        "`diagnose_curvature` needs `first_transform` to be a compensation "
        "with a curvature estimate (one that reads the worker's backup: a "
        "DelayCompensationState, e.g. dcasgd_optax.delay_compensation), got "
        f"one whose state is {type(node).__name__}."
    )


def not_measured(num_slots: int, diagnostics: Diagnostics | None = None
                 ) -> dict[str, jax.Array]:
  """NaN for every key (of ``diagnostics``, default the four): arrivals that
  are not sampled."""
  names = KEYS if diagnostics is None else keys(diagnostics)
  return {k: jnp.full((num_slots,), jnp.nan, jnp.float32) for k in names}


def _flat(tree: Any) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])


def _compare(x: Any, fresh: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cosine similarity and relative L2 distance of ``x`` to ``fresh``."""
  x = _flat(x)
  norm_fresh = jnp.linalg.norm(fresh)
  cosine = jnp.vdot(x, fresh) / (jnp.linalg.norm(x) * norm_fresh)
  return cosine, jnp.linalg.norm(x - fresh) / norm_fresh


def sampled(first_step: int, num_arrivals: int, every: int) -> np.ndarray:
  """Which of the arrivals after server step ``first_step`` are diagnosed:
  those whose server step before the update is a multiple of ``every``."""
  return (first_step + np.arange(num_arrivals)) % every == 0


def measure(diagnostics: Diagnostics, loss_with_state: Any, state: Any,
            grads: Any, batch: Any, extra_args: dict[str, Any],
            is_sampled: jax.Array,
            compensated: Any = None) -> dict[str, jax.Array]:
  """The figures for one arrival (before its update), or NaN if unsampled.

  ``grads`` is the pushed gradient; ``compensated`` what ``tx`` receives
  (the exactly compensated gradient, default ``grads``), from which the
  applied direction is made. ``extra_args`` are the keyword extra arguments
  the server's ``tx.update`` gets for it (``worker``, ``staleness`` and maybe
  ``held_params``).
  """
  compensated = grads if compensated is None else compensated

  def measured():
    fresh = _flat(jax.grad(
        lambda p: loss_with_state(p, (), batch)[0])(state.params))
    direction = compensated
    if diagnostics.first_transform is not None:
      sub_state = first_state(state.opt_state, diagnostics.first_transform,
                              state.params)
      direction, _ = diagnostics.first_transform.update(
          compensated, sub_state, state.params, **extra_args
      )
    stale_cosine, stale_error = _compare(grads, fresh)
    applied_cosine, applied_error = _compare(direction, fresh)
    out = dict(stale_cosine=stale_cosine, applied_cosine=applied_cosine,
               stale_error=stale_error, applied_error=applied_error)
    if diagnostics.curvature:
      held = extra_args.get("held_params")
      if held is None:  # tx reads the worker's row in place: so do we.
        held = jax.tree.map(lambda b: b[extra_args["worker"]],
                            _state.backups_of(state.opt_state))
      out[CURVATURE_KEY] = _exact.curvature_ratio(
          loss_with_state, held, state.params, batch, grads, direction)
    return out

  def skipped():
    return {k: jnp.full((), jnp.nan, jnp.float32) for k in keys(diagnostics)}

  return jax.lax.cond(is_sampled, measured, skipped)
