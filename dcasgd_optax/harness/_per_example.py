r"""What a worker pushes beside its gradient: its per-example curvature.

With ``Simulator(..., push_grad_sq=True)`` each worker computes, at the
model it holds and on its own batch, the mean over the batch of its
per-example squared gradients,

.. math::
  F = \frac{1}{B} \sum_{i=1}^{B} \nabla \ell(w_m, x_i) \odot
  \nabla \ell(w_m, x_i),

(a gradient per example of the batch, each given to ``loss_fn`` as a batch
of one: :func:`dcasgd_optax.extend.mean_square_grads`, which the Ray
workers use too), and pushes it with the gradient; the server
passes it to ``tx.update`` as the keyword ``grad_sq``
(:func:`dcasgd_optax.fisher_compensation` reads it). The gradient itself is
unchanged (the batch's, as without the option).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from dcasgd_optax.extend import mean_square_grads


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
