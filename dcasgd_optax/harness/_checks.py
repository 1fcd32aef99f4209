"""Argument checks of the simulators, run in Python before anything is
traced."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# loss_fn with the model state made explicit: (params, model_state, batch)
# -> (loss, new_model_state). Models without state carry ``()``.
LossWithState = Callable[[Any, Any, Any], tuple[jax.Array, Any]]

def with_model_state(loss_fn: Callable, has_model_state: bool) -> LossWithState:
  """``loss_fn`` in the (params, model_state, batch) -> (loss, state) form."""
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got {loss_fn!r}.")
  if has_model_state:
    return loss_fn
  return lambda params, model_state, batch: (loss_fn(params, batch), ())

def check_model_state(model_state: Any, has_model_state: bool) -> Any:
  """The model state to store: ``()`` for stateless models."""
  if has_model_state and model_state is None:
    raise ValueError(
        "This simulator was built with has_model_state=True: pass the initial "
        "model state, `sim.init(params, model_state)`."
    )
  if not has_model_state and model_state is not None:
    raise ValueError(
        "`model_state` was given but the simulator was built with "
        "has_model_state=False; build it with has_model_state=True and a "
        "loss_fn(params, model_state, batch) -> (loss, new_model_state)."
    )
  return () if model_state is None else model_state

def check_arrivals(arrivals: Any, num_workers: int,
                   num_sims: int | None = None) -> np.ndarray:
  """``arrivals`` as an int32 ``[N, A]`` NumPy array of ids in range.

  ``arrivals`` is 1-D (``N = 1``, or shared by ``num_sims`` simulations) or,
  with ``num_sims``, ``[num_sims, A]``; ``A >= 1``.
  """
  if isinstance(arrivals, jax.core.Tracer):
    raise ValueError(
        "`arrivals` must be concrete (a NumPy or JAX array known now), not "
        "traced: the replay plan is built from it in Python."
    )
  arr = np.asarray(arrivals)
  if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(
        f"`arrivals` must be an integer array of worker ids, got dtype "
        f"{arr.dtype}."
    )
  shapes = "1-D" if num_sims is None else f"1-D or [{num_sims}, A]"
  if arr.ndim != 1 and not (num_sims is not None and arr.ndim == 2
                            and arr.shape[0] == num_sims):
    raise ValueError(f"`arrivals` must be {shapes}, got shape {arr.shape}.")
  if arr.size == 0:
    raise ValueError("`arrivals` is empty: replay needs at least one arrival.")
  lo, hi = int(arr.min()), int(arr.max())
  if lo < 0 or hi >= num_workers:
    bad = lo if lo < 0 else hi
    raise ValueError(
        f"`arrivals` must lie in [0, {num_workers}) (num_workers="
        f"{num_workers}), got worker id {bad}."
    )
  arr = np.broadcast_to(arr, (num_sims or 1, arr.shape[-1]))
  return np.ascontiguousarray(arr, np.int32)

def check_batches(batches: Any, num: int | tuple[int, ...], what: str) -> None:
  """Raises unless every leaf of ``batches`` has leading axes ``num``."""
  want = (num,) if isinstance(num, int) else tuple(num)
  leaves = jax.tree_util.tree_flatten_with_path(batches)[0]
  if not leaves:
    raise ValueError("`batches` has no array leaves.")
  for path, x in leaves:
    shape = np.shape(x)
    if shape[:len(want)] != want:
      sizes = want[0] if len(want) == 1 else want
      raise ValueError(
          f"`batches` leaf {jax.tree_util.keystr(path) or '<root>'} has shape "
          f"{shape}, but every leaf needs a leading axis of {what} = {sizes}."
      )

def abstract(tree: Any) -> Any:
  """``tree`` with ``jax.ShapeDtypeStruct`` leaves (tracers included)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree
  )

def signature(tree: Any) -> tuple[Any, ...]:
  """A hashable summary of a pytree: its structure, leaf shapes and dtypes."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves)

def check_loss_fn_cached(
    cache: dict[Any, Any], loss_with_state: LossWithState, params: Any,
    model_state: Any, batches: Any,
) -> jax.ShapeDtypeStruct:
  """:func:`check_loss_fn`, traced per (params, model state, batch) shapes."""
  batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], jnp.result_type(x)),
      batches,
  )
  key = signature((params, model_state, batch))
  if key not in cache:
    cache[key] = check_loss_fn(loss_with_state, params, model_state, batch)
  return cache[key]

def check_loss_fn(
    loss_with_state: LossWithState, params: Any, model_state: Any, batch: Any
) -> jax.ShapeDtypeStruct:
  """Traces ``loss_fn`` on one abstract batch; returns the abstract loss."""
  loss, new_state = jax.eval_shape(
      loss_with_state, abstract(params), abstract(model_state), batch
  )
  if getattr(loss, "shape", None) != () or not jnp.issubdtype(
      loss.dtype, jnp.floating
  ):
    raise ValueError(
        "`loss_fn` must return a floating scalar loss for one batch, got "
        f"{loss}."
    )
  if signature(new_state) != signature(abstract(model_state)):
    raise ValueError(
        "`loss_fn` must return the new model state with the structure, "
        f"shapes and dtypes of the old one.\n  old: {abstract(model_state)}"
        f"\n  new: {abstract(new_state)}"
    )
  return loss

def leading_axis(name: str, tree: Any, num: int | None = None) -> int:
  """The length of every leaf's leading axis (``num`` if given); raises
  unless all leaves share it."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, x in leaves:
    shape = np.shape(x)
    if not shape or (num is not None and shape[0] != num):
      raise ValueError(
          f"`{name}` leaf {jax.tree_util.keystr(path) or '<root>'} has shape "
          f"{shape}, but every leaf needs a leading axis of "
          f"{'N' if num is None else num} (one entry per simulation)."
      )
    num = shape[0]
  if num is None:
    raise ValueError(f"`{name}` has no array leaves.")
  return num


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
  """The jaxprs an equation calls (loop bodies, branches, ...), duck-typed:
  a jaxpr has ``eqns``; a closed jaxpr holds one as ``jaxpr``."""
  subs = []
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      jaxpr = getattr(v, "jaxpr", v)
      if hasattr(jaxpr, "eqns"):
        subs.append(jaxpr)
  return subs


def convolves(loss_with_state: LossWithState, params: Any, model_state: Any,
              batch: Any) -> bool:
  """Whether the gradient of ``loss_fn`` on one abstract batch convolves."""
  grad = jax.grad(lambda p, ms, b: loss_with_state(p, ms, b)[0])
  stack = [jax.make_jaxpr(grad)(
      abstract(params), abstract(model_state), batch).jaxpr]
  while stack:
    jaxpr = stack.pop()
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        return True
      stack.extend(_sub_jaxprs(eqn.params))
  return False
