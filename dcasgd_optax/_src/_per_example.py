r"""The per-example curvature a worker pushes beside its gradient.

:func:`mean_square_grads` is the :math:`F` that
:func:`dcasgd_optax.fisher_compensation` reads as ``grad_sq``: the mean over
the worker's batch of its per-example squared gradients,

.. math::
  F = \frac{1}{B} \sum_{i=1}^{B} \nabla \ell(w_m, x_i) \odot
  \nabla \ell(w_m, x_i).

Both drivers compute it with this one function (the simulator's
``push_grad_sq=True``, the Ray workers' ``push_grad_sq=True``), through
:mod:`dcasgd_optax.extend`, so a run on Ray replays exactly in the
simulator.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import jax
import jax.numpy as jnp


def mean_square_grads(
    loss_fn: Callable[[Any, Any], Any], params: Any, batch: Any
) -> Any:
  """``mean_i grad(loss_fn)(params, batch[i:i+1]) ** 2``, params-shaped.

  Every leaf of ``batch`` must have the same leading (example) axis; each
  example is given to ``loss_fn`` as a batch of one. On CPU the examples'
  gradients are taken one after another and their squares summed as they
  come (:func:`_by_scan`); elsewhere all at once with ``jax.vmap``
  (:func:`_by_vmap`). The two differ only in the order of the sum. XLA:CPU
  writes ``vmap``'s B per-example outer products of a dense layer in a
  transposed layout, many times slower than the scan (the figures are in
  benchmarks/per_example_curvature.md).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: where the gradients are taken.
    batch: a pytree whose leaves all have the same leading (example) axis.

  Returns:
    The mean square, a pytree shaped like ``params``: the squares taken in
    at least float32, the mean cast to each param's dtype.

  Raises:
    ValueError: if the leaves of ``batch`` do not share a leading axis.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dcasgd_optax.extend import mean_square_grads
    >>> loss = lambda p, x: jnp.mean((p['w'] * x) ** 2) / 2  # grad: w x^2
    >>> mean_square_grads(loss, {'w': jnp.array(1.0)},
    ...                   jnp.array([1.0, 2.0]))['w']  # (1 + 16) / 2
    Array(8.5, dtype=float32)
  """
  sizes = {
      jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)
  }
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        "`push_grad_sq=True` needs every leaf of a batch to have the same "
        "leading (example) axis, to take per-example gradients over it; got "
        f"leading sizes {sorted(sizes, key=str)}."
    )
  return jax.lax.platform_dependent(
      params,
      batch,
      cpu=functools.partial(_by_scan, loss_fn),
      default=functools.partial(_by_vmap, loss_fn),
  )


def _examples(batch: Any) -> Any:
  return jax.tree.map(lambda x: x[:, None], batch)  # B batches of one


def _mean_square_dtype(p: Any) -> Any:
  return jnp.promote_types(jnp.result_type(p), jnp.float32)


def _by_vmap(
    loss_fn: Callable[[Any, Any], Any], params: Any, batch: Any
) -> Any:
  """:func:`mean_square_grads` with every example's gradient at once."""
  per_example = jax.vmap(jax.grad(loss_fn), (None, 0))(params, _examples(batch))

  def mean_square(g, p):
    g = g.astype(_mean_square_dtype(p))
    return jnp.mean(g * g, axis=0).astype(jnp.result_type(p))

  return jax.tree.map(mean_square, per_example, params)


def _by_scan(
    loss_fn: Callable[[Any, Any], Any], params: Any, batch: Any
) -> Any:
  """:func:`mean_square_grads` one example after another (``lax.scan``),
  summing the squares in float32 (or wider) as they come."""
  examples = _examples(batch)
  size = jax.tree.leaves(batch)[0].shape[0]
  grad = jax.grad(loss_fn)

  def add_square(total, example):
    g = grad(params, example)
    return (
        jax.tree.map(lambda t, g: t + jnp.square(g.astype(t.dtype)), total, g),
        None,
    )

  zeros = jax.tree.map(
      lambda p: jnp.zeros(jnp.shape(p), _mean_square_dtype(p)), params
  )
  total, _ = jax.lax.scan(add_square, zeros, examples)
  return jax.tree.map(
      lambda t, p: (t / size).astype(jnp.result_type(p)), total, params
  )
