r"""What a worker pushes beside its gradient: its per-example curvature.

With ``Simulator(..., push_grad_sq=True)`` each worker computes, at the
model it holds and on its own batch, the mean over the batch of its
per-example squared gradients,

.. math::
  F = \frac{1}{B} \sum_{i=1}^{B} \nabla \ell(w_m, x_i) \odot
  \nabla \ell(w_m, x_i),

(``jax.vmap(jax.grad(...))`` over the batch's examples, each given to
``loss_fn`` as a batch of one), and pushes it with the gradient; the server
passes it to ``tx.update`` as the keyword ``grad_sq``
(:func:`dcasgd_optax.fisher_compensation` reads it). The gradient itself is
unchanged (the batch's, as without the option).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Pushed(NamedTuple):
  """A gradient and the per-example curvature pushed with it."""

  grads: Any
  grad_sq: Any


def check_option(push_grad_sq: Any, has_model_state: bool) -> bool:
  """``push_grad_sq``, checked against the simulator's other options."""
  if not isinstance(push_grad_sq, bool):
    raise TypeError(f"`push_grad_sq` must be a bool, got {push_grad_sq!r}.")
  if push_grad_sq and has_model_state:
    raise ValueError(
        "`push_grad_sq=True` is not supported with has_model_state=True: a "
        "per-example gradient of a stateful model (e.g. batch norm) depends "
        "on the other examples of the batch. Use a stateless loss_fn."
    )
  return push_grad_sq


def mean_square_grads(loss_fn: Callable[[Any, Any], Any], params: Any,
                      batch: Any) -> Any:
  """``mean_i grad(loss_fn)(params, batch[i:i+1]) ** 2``, params-shaped.

  Every leaf of ``batch`` must have the same leading (example) axis. On CPU
  the examples' gradients are taken one after another and their squares
  summed as they come (:func:`_by_scan`); elsewhere all at once with
  ``jax.vmap`` (:func:`_by_vmap`). The two differ only in the order of the
  sum. XLA:CPU writes ``vmap``'s B per-example outer products of a dense
  layer in a transposed layout, about 75x slower than the scan for the
  demo's MLP (benchmarks/fisher_first_look.md).
  """
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None
           for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        "`push_grad_sq=True` needs every leaf of a batch to have the same "
        "leading (example) axis, to take per-example gradients over it; got "
        f"leading sizes {sorted(sizes, key=str)}."
    )
  return jax.lax.platform_dependent(
      params, batch, cpu=functools.partial(_by_scan, loss_fn),
      default=functools.partial(_by_vmap, loss_fn))


def _examples(batch: Any) -> Any:
  return jax.tree.map(lambda x: x[:, None], batch)  # B batches of one


def _mean_square_dtype(p: Any) -> Any:
  return jnp.promote_types(jnp.result_type(p), jnp.float32)


def _by_vmap(loss_fn: Callable[[Any, Any], Any], params: Any,
             batch: Any) -> Any:
  """:func:`mean_square_grads` with every example's gradient at once."""
  per_example = jax.vmap(jax.grad(loss_fn), (None, 0))(params,
                                                       _examples(batch))

  def mean_square(g, p):
    g = g.astype(_mean_square_dtype(p))
    return jnp.mean(g * g, axis=0).astype(jnp.result_type(p))

  return jax.tree.map(mean_square, per_example, params)


def _by_scan(loss_fn: Callable[[Any, Any], Any], params: Any,
             batch: Any) -> Any:
  """:func:`mean_square_grads` one example after another (``lax.scan``),
  summing the squares in float32 (or wider) as they come."""
  examples = _examples(batch)
  size = jax.tree.leaves(batch)[0].shape[0]
  grad = jax.grad(loss_fn)

  def add_square(total, example):
    g = grad(params, example)
    return jax.tree.map(
        lambda t, g: t + jnp.square(g.astype(t.dtype)), total, g), None

  zeros = jax.tree.map(
      lambda p: jnp.zeros(jnp.shape(p), _mean_square_dtype(p)), params)
  total, _ = jax.lax.scan(add_square, zeros, examples)
  return jax.tree.map(lambda t, p: (t / size).astype(jnp.result_type(p)),
                      total, params)


def push(loss_with_state: Callable[..., Any], params: Any, model_state: Any,
         batch: Any, grads: Any) -> Pushed:
  """``grads`` with the mean of the per-example squared gradients at
  ``params`` (``loss_with_state`` is the simulator's stateless form)."""
  loss = lambda p, b: loss_with_state(p, model_state, b)[0]
  return Pushed(grads, mean_square_grads(loss, params, batch))


def split(pushed: Any) -> tuple[Any, dict[str, Any]]:
  """The gradient, and the keyword arguments of ``tx.update`` that carry
  what was pushed with it (none without the option)."""
  if isinstance(pushed, Pushed):
    return pushed.grads, {"grad_sq": pushed.grad_sq}
  return pushed, {}
