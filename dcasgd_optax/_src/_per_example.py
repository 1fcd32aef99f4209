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
from typing import Any

import jax
import jax.numpy as jnp


def mean_square_grads(
    loss_fn: Callable[[Any, Any], Any], params: Any, batch: Any
) -> Any:
  """``mean_i grad(loss_fn)(params, batch[i:i+1]) ** 2``, params-shaped.

  Each example is given to ``loss_fn`` as a batch of one
  (``jax.vmap(jax.grad(loss_fn))`` over the examples); the squares are
  taken in at least float32 and the mean is cast to each param's dtype.
  Memory: one params-sized gradient per example of the batch.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: where the gradients are taken.
    batch: a pytree whose leaves all have the same leading (example) axis.

  Returns:
    A params-shaped pytree.

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
  examples = jax.tree.map(lambda x: x[:, None], batch)  # B batches of one
  per_example = jax.vmap(jax.grad(loss_fn), (None, 0))(params, examples)

  def mean_square(g, p):
    g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    return jnp.mean(g * g, axis=0).astype(jnp.result_type(p))

  return jax.tree.map(mean_square, per_example, params)
