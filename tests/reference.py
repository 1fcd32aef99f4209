"""An independent NumPy transcription of the DC-ASGD parameter server.

Written from the paper (Zheng et al. 2017, Algorithm 1 and Section 4) and not
from the library: it shares no code with ``dcasgd_optax``. A model is a list
of arrays (the leaves of a pytree, in any fixed order); everything is
elementwise, so the leaves never interact. All arithmetic is float64.

Server, on a pull from worker m:   backup[m] <- w
Server, on a push of g from m:     g_dc = g + lam * g * g * (w - backup[m])
                                   w    <- w - lr_t * sgd_direction(g_dc + wd*w)

DC-ASGD-c: lam is the constant lambda_.
DC-ASGD-a: ms <- decay * ms + (1 - decay) * g * g   (one global ms, from zero,
           updated with the current gradient before use);
           lam = lambda_ / sqrt(ms + eps).

The SGD direction with momentum mu is the usual heavy-ball buffer
v <- d + mu * v, stepping along v (or d + mu * v for Nesterov), where d is the
compensated gradient plus weight decay; lr_t is the learning rate at the
t-th push (t counted from 0).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def _f64(xs: Sequence[np.ndarray]) -> list[np.ndarray]:
  return [np.array(x, dtype=np.float64) for x in xs]


class ParameterServer:
  """The server of Algorithm 1, with one backup of the model per worker."""

  def __init__(
      self,
      w0: Sequence[np.ndarray],
      num_workers: int,
      lambda_: float,
      *,
      adaptive: bool = False,
      decay: float = 0.95,
      eps: float = 1e-7,
      learning_rate: float | Callable[[int], float] = 0.1,
      momentum: float | None = None,
      nesterov: bool = False,
      weight_decay: float = 0.0,
  ):
    self.w = _f64(w0)
    # At the start every worker holds w_0.
    self.backup = [_f64(self.w) for _ in range(num_workers)]
    self.lambda_ = lambda_
    self.adaptive = adaptive
    self.decay = decay
    self.eps = eps
    self.mean_square = [np.zeros_like(x) for x in self.w]
    self.learning_rate = learning_rate
    self.momentum = momentum
    self.nesterov = nesterov
    self.weight_decay = weight_decay
    self.velocity = [np.zeros_like(x) for x in self.w]
    self.pushes = 0

  def pull(self, m: int) -> list[np.ndarray]:
    """Worker m pulls: the server remembers what m now holds."""
    self.backup[m] = _f64(self.w)
    return _f64(self.w)

  def compensated_gradient(self, g: Sequence[np.ndarray], m: int) -> list[np.ndarray]:
    """g + lam * g * g * (w - backup[m]); updates ms first for DC-ASGD-a."""
    g = _f64(g)
    if self.adaptive:
      self.mean_square = [
          self.decay * ms + (1.0 - self.decay) * gi * gi
          for ms, gi in zip(self.mean_square, g)
      ]
      lams = [self.lambda_ / np.sqrt(ms + self.eps) for ms in self.mean_square]
    else:
      lams = [self.lambda_ for _ in g]
    return [
        gi + lam * gi * gi * (wi - bi)
        for gi, lam, wi, bi in zip(g, lams, self.w, self.backup[m])
    ]

  def push(self, g: Sequence[np.ndarray], m: int) -> list[np.ndarray]:
    """Worker m pushes g; returns the change applied to w."""
    g_dc = self.compensated_gradient(g, m)
    d = [gi + self.weight_decay * wi for gi, wi in zip(g_dc, self.w)]
    if self.momentum is not None:
      self.velocity = [di + self.momentum * vi for di, vi in zip(d, self.velocity)]
      if self.nesterov:
        d = [di + self.momentum * vi for di, vi in zip(d, self.velocity)]
      else:
        d = list(self.velocity)
    lr = self.learning_rate
    lr = float(lr(self.pushes)) if callable(lr) else float(lr)
    step = [-lr * di for di in d]
    self.w = [wi + si for wi, si in zip(self.w, step)]
    self.pushes += 1
    return step
