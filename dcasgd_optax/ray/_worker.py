"""A worker: computes a JAX gradient of the loss on its own data.

``GradientWorker`` is a plain class that :func:`dcasgd_optax.ray.train` runs
as a Ray actor. It holds no training state, so a restarted worker only needs
to pull the current params to continue.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np


class GradientMeta(NamedTuple):
  """The small part of a worker's push (the gradient travels separately).

  Attributes:
    worker: the worker's id.
    seq: the gradient's sequence number for this worker (0, 1, ...).
    version: the server step of the params it was computed at.
    loss: the minibatch loss at those params.
    seconds: time spent loading the batch and computing the gradient.
  """

  worker: int
  seq: int
  version: int
  loss: float
  seconds: float


class GradientWorker:
  """Computes ``jax.value_and_grad(loss_fn)`` on batches from ``data_fn``.

  Args:
    worker: this worker's id in ``[0, num_workers)``.
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    data_fn: ``data_fn(worker, seq) -> batch``, the batch of this worker's
      gradient number ``seq``; called in the worker's process.
  """

  def __init__(self, worker: int, loss_fn: Callable, data_fn: Callable):
    self._worker = worker
    self._data_fn = data_fn
    self._grad = jax.jit(jax.value_and_grad(loss_fn))

  def ready(self) -> bool:
    """Returns once the actor has started (lets the driver time the run)."""
    return True

  def compute(
      self, seq: int, pulled: tuple[int, Any]
  ) -> tuple[GradientMeta, Any]:
    """The gradient number ``seq`` at the pulled ``(step, params)``.

    Returns:
      ``(meta, grads)`` with ``grads`` a NumPy pytree shaped like params.
    """
    start = time.perf_counter()
    version, params = pulled
    batch = self._data_fn(self._worker, seq)
    loss, grads = self._grad(params, batch)
    grads = jax.tree.map(np.asarray, grads)
    seconds = time.perf_counter() - start
    meta = GradientMeta(self._worker, seq, version, float(loss), seconds)
    return meta, grads
