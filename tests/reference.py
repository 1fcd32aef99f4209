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

Beyond the paper (issue 10), each from its own source:
- per-worker MeanSquare (the authors' released code): ms[m] is updated only
  by worker m's gradients and used for them.
- bias correction (Adam): lam = lambda_ / sqrt(ms / (1 - decay**t) + eps),
  t = number of gradients folded into that ms.
- lambda warm-up: lam *= min(1, t / k), t = number of pushes so far (this one
  included).
- correction clip: the term lam * g * g * (w - backup) is clipped to
  [-c |g|, c |g|] per coordinate.
- Gap-Aware (Barkai, Hakimi, Schuster 2019): v <- b v + (1 - b) g * g,
  C = eta * (sqrt(v / (1 - b**t)) + eps), g <- g / (1 + |w - backup[m]| / C).
- Delayed Nesterov (Liu et al. 2024, Algorithm 3): D <- D + g; on every N-th
  push m <- beta m + D / N, w <- w - lr ((1 - cN + c) beta m + g / N), D <- 0;
  otherwise w <- w - lr (c beta m + g / N).
- Look-ahead pull (DANA-style, Hakimi et al. 2019): a pull sends, and records
  as the backup, w - lr_t * (mu + mu^2 + ... + mu^H) * v, the model H further
  heavy-ball steps would reach with no new gradient.
- Fisher diagonal (issue 18): the curvature g * g replaced by F, the mean of
  the per-example squared gradients the worker pushes; DC-ASGD-a's ms is the
  running mean of F. Nesterov look-ahead: the pull's sum times mu.
- Secant curvature (issue 18; the two-point idea of Barzilai and Borwein
  1988): on worker m's push, if m pushed before, dw = backup[m] -
  prev_backup[m], dg = g - prev_g[m], num <- d num + (1 - d) dg * dw,
  den <- d den + (1 - d) dw * dw (from zero, shared by all workers);
  h = max(num, 0) / den where den > 0, else 0; the term lam * h * (w -
  backup[m]) clipped to [-c |g|, c |g|]; then prev_backup[m] <- backup[m],
  prev_g[m] <- g.
- Look-ahead Adam/NAdam (Kosson et al. 2020, SpecTrain): Adam's update
  (Kingma and Ba; NAdam as Dozat / optax: m_hat = b1 m / (1 - b1^(t+1))
  + (1 - b1) g / (1 - b1^t)); a pull sends w - a * m_t_hat / (sqrt(v_t_hat)
  + eps), a = lr * (b1 + ... + b1^H) (times b1 for NAdam).
- PipeMare (Yang et al. 2019): the step of a tau-stale gradient at update k
  is lr / max(tau, 1) ** (1 - min(k / K, 1)).
- Staleness rules: inverse 1 / max(tau, 1) (Zhang et al. 2016), sqrt
  1 / sqrt(1 + tau) (Xie et al. 2019, FedAsync's polynomial (1 + tau)^-a,
  a = 1/2),
  delay-adaptive n / max(n, tau) (Mishchenko et al. 2022).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
      per_worker_mean_square: bool = False,
      bias_correction: bool = False,
      lambda_warmup: int = 0,
      correction_clip: float | None = None,
      delayed_nesterov_period: int | None = None,
      momentum_activation: float = 0.0,
      look_ahead_horizon: int | None = None,
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
    self.per_worker = per_worker_mean_square
    self.bias_correction = bias_correction
    self.lambda_warmup = lambda_warmup
    self.correction_clip = correction_clip
    # One (ms, count) per worker, or one shared pair.
    n_stats = num_workers if per_worker_mean_square else 1
    self.worker_ms = [
        [np.zeros_like(x) for x in self.w] for _ in range(n_stats)
    ]
    self.worker_count = [0] * n_stats
    self.period = delayed_nesterov_period
    self.activation = momentum_activation
    self.accumulated = [np.zeros_like(x) for x in self.w]
    self.horizon = look_ahead_horizon

  def _lr(self, t: int) -> float:
    lr = self.learning_rate
    return float(lr(t)) if callable(lr) else float(lr)

  def pull(self, m: int) -> list[np.ndarray]:
    """Worker m pulls: the server sends, and remembers, what m now holds."""
    sent = _f64(self.w)
    if self.horizon is not None:
      mu, h = self.momentum, self.horizon
      ahead = sum(mu**k for k in range(1, h + 1))
      if self.nesterov:  # each zero-gradient Nesterov step is mu * v_k
        ahead *= mu
      lr = self._lr(self.pushes)  # the rate of the next push
      sent = [wi - lr * ahead * vi for wi, vi in zip(sent, self.velocity)]
    self.backup[m] = sent
    return _f64(sent)

  def _fold_mean_square(self, g: list[np.ndarray], m: int) -> tuple[list, int]:
    """Updates worker m's (or the shared) ms with g; returns it, its count."""
    k = m if self.per_worker else 0
    self.worker_ms[k] = [
        self.decay * ms + (1.0 - self.decay) * gi * gi
        for ms, gi in zip(self.worker_ms[k], g)
    ]
    self.worker_count[k] += 1
    self.mean_square = (
        self.worker_ms[k] if not self.per_worker else self.worker_ms
    )
    return self.worker_ms[k], self.worker_count[k]

  def compensated_gradient(
      self, g: Sequence[np.ndarray], m: int
  ) -> list[np.ndarray]:
    """G + lam * g * g * (w - backup[m]); updates ms first for DC-ASGD-a."""
    g = _f64(g)
    if self.adaptive:
      ms, t = self._fold_mean_square(g, m)
      if self.bias_correction:
        ms = [x / (1.0 - self.decay**t) for x in ms]
      lams = [self.lambda_ / np.sqrt(x + self.eps) for x in ms]
    else:
      lams = [self.lambda_ for _ in g]
    if self.lambda_warmup:
      ramp = min(1.0, (self.pushes + 1) / self.lambda_warmup)
      lams = [lam * ramp for lam in lams]
    out = []
    for gi, lam, wi, bi in zip(g, lams, self.w, self.backup[m]):
      term = lam * gi * gi * (wi - bi)
      if self.correction_clip is not None:
        bound = self.correction_clip * np.abs(gi)
        term = np.clip(term, -bound, bound)
      out.append(gi + term)
    return out

  def _delayed_nesterov(self, d: list[np.ndarray]) -> list[np.ndarray]:
    """The direction of Liu et al.'s Algorithm 3 for this push."""
    n, c, beta = self.period, self.activation, self.momentum
    self.accumulated = [a + di for a, di in zip(self.accumulated, d)]
    if (self.pushes + 1) % n == 0:
      self.velocity = [
          beta * v + a / n for v, a in zip(self.velocity, self.accumulated)
      ]
      self.accumulated = [np.zeros_like(a) for a in self.accumulated]
      coeff = (1.0 - c * n + c) * beta
    else:
      coeff = c * beta
    return [coeff * v + di / n for v, di in zip(self.velocity, d)]

  def push(self, g: Sequence[np.ndarray], m: int) -> list[np.ndarray]:
    """Worker m pushes g; returns the change applied to w."""
    g_dc = self.compensated_gradient(g, m)
    d = [gi + self.weight_decay * wi for gi, wi in zip(g_dc, self.w)]
    if self.period is not None:
      d = self._delayed_nesterov(d)
    elif self.momentum is not None:
      self.velocity = [
          di + self.momentum * vi for di, vi in zip(d, self.velocity)
      ]
      if self.nesterov:
        d = [di + self.momentum * vi for di, vi in zip(d, self.velocity)]
      else:
        d = list(self.velocity)
    lr = self._lr(self.pushes)
    step = [-lr * di for di in d]
    self.w = [wi + si for wi, si in zip(self.w, step)]
    self.pushes += 1
    return step


class GapAwareServer(ParameterServer):
  """The same server with Gap-Aware's penalty in place of compensation.

  eta_max is the step size of C; decay and eps are Gap-Aware's b and eps.
  """

  def __init__(self, w0, num_workers, eta_max: float, *, decay: float = 0.999,
               eps: float = 1e-8, **sgd):
    super().__init__(w0, num_workers, 0.0, decay=decay, eps=eps, **sgd)
    self.eta_max = eta_max

  def compensated_gradient(
      self, g: Sequence[np.ndarray], m: int
  ) -> list[np.ndarray]:
    g = _f64(g)
    v, t = self._fold_mean_square(g, m)
    out = []
    for gi, vi, wi, bi in zip(g, v, self.w, self.backup[m]):
      c = self.eta_max * (np.sqrt(vi / (1.0 - self.decay**t)) + self.eps)
      out.append(gi / (1.0 + np.abs(wi - bi) / c))
    return out


def staleness_scale(
    rule: str, tau: int, num_workers: int | None = None
) -> float:
  """The factor a staleness rule multiplies a gradient of staleness tau by."""
  if rule == "inverse":
    return 1.0 / max(tau, 1)
  if rule == "sqrt":
    return 1.0 / np.sqrt(1.0 + tau)
  if rule == "delay_adaptive":
    return num_workers / max(num_workers, tau)
  raise ValueError(rule)


class FisherServer(ParameterServer):
  """The server with the pushed Fisher diagonal F in place of g * g."""

  def push_with_fisher(self, g, fisher, m):
    self._fisher = _f64(fisher)
    return self.push(g, m)

  def compensated_gradient(self, g, m):
    g, f = _f64(g), self._fisher
    if self.adaptive:
      k = m if self.per_worker else 0
      self.worker_ms[k] = [self.decay * ms + (1.0 - self.decay) * fi
                           for ms, fi in zip(self.worker_ms[k], f)]
      self.worker_count[k] += 1
      lams = [self.lambda_ / np.sqrt(x + self.eps) for x in self.worker_ms[k]]
    else:
      lams = [self.lambda_ for _ in g]
    out = []
    for gi, fi, lam, wi, bi in zip(g, f, lams, self.w, self.backup[m]):
      term = lam * fi * (wi - bi)
      if self.correction_clip is not None:
        bound = self.correction_clip * np.abs(gi)
        term = np.clip(term, -bound, bound)
      out.append(gi + term)
    return out


class SecantServer(ParameterServer):
  """The server with a running diagonal secant in place of g * g."""

  def __init__(self, w0, num_workers, lambda_, *, decay=0.99, **kwargs):
    super().__init__(w0, num_workers, lambda_, decay=decay, **kwargs)
    self.previous = [None] * num_workers  # (backup, g) at m's last push
    self.num = [np.zeros_like(x) for x in self.w]
    self.den = [np.zeros_like(x) for x in self.w]

  def compensated_gradient(self, g, m):
    g, b = _f64(g), self.backup[m]
    if self.previous[m] is not None:
      prev_b, prev_g = self.previous[m]
      d = self.decay
      for i, (gi, bi, pbi, pgi) in enumerate(zip(g, b, prev_b, prev_g)):
        dw, dg = bi - pbi, gi - pgi
        self.num[i] = d * self.num[i] + (1.0 - d) * dg * dw
        self.den[i] = d * self.den[i] + (1.0 - d) * dw * dw
    out = []
    for gi, n, s, wi, bi in zip(g, self.num, self.den, self.w, b):
      h = np.zeros_like(n)
      np.divide(np.maximum(n, 0.0), s, out=h, where=s > 0)
      term = self.lambda_ * h * (wi - bi)
      if self.correction_clip is not None:
        bound = self.correction_clip * np.abs(gi)
        term = np.clip(term, -bound, bound)
      out.append(gi + term)
    self.previous[m] = (_f64(b), g)
    return out


class LookAheadAdamServer:
  """DC-ASGD-c's compensation, then Adam or NAdam, with a predicted pull."""

  def __init__(self, w0, num_workers, lambda_, *, learning_rate, horizon,
               b1, b2, eps, nesterov):
    self.w = _f64(w0)
    self.backup = [_f64(self.w) for _ in range(num_workers)]
    self.lambda_, self.lr, self.h = lambda_, learning_rate, horizon
    self.b1, self.b2, self.eps, self.nesterov = b1, b2, eps, nesterov
    self.m = [np.zeros_like(x) for x in self.w]
    self.v = [np.zeros_like(x) for x in self.w]
    self.t = 0

  def _lr(self, t):
    return float(self.lr(t)) if callable(self.lr) else float(self.lr)

  def push(self, g, m):
    g = _f64(g)
    g = [gi + self.lambda_ * gi * gi * (wi - bi)
         for gi, wi, bi in zip(g, self.w, self.backup[m])]
    b1, b2 = self.b1, self.b2
    lr = self._lr(self.t)
    self.t += 1
    t = self.t
    self.m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(self.m, g)]
    self.v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(self.v, g)]
    if self.nesterov:
      m_hat = [b1 * mi / (1 - b1 ** (t + 1)) + (1 - b1) * gi / (1 - b1**t)
               for mi, gi in zip(self.m, g)]
    else:
      m_hat = [mi / (1 - b1**t) for mi in self.m]
    step = [-lr * mh / (np.sqrt(vi / (1 - b2**t)) + self.eps)
            for mh, vi in zip(m_hat, self.v)]
    self.w = [wi + si for wi, si in zip(self.w, step)]
    return step

  def pull(self, m):
    b1, t = self.b1, self.t
    ahead = sum(b1**k for k in range(1, self.h + 1))
    if self.nesterov:
      ahead *= b1
    a = self._lr(t) * ahead
    if t == 0:
      sent = _f64(self.w)
    else:
      sent = [wi - a * (mi / (1 - b1**t))
              / (np.sqrt(vi / (1 - self.b2**t)) + self.eps)
              for wi, mi, vi in zip(self.w, self.m, self.v)]
    self.backup[m] = sent
    return _f64(sent)


def pipemare_scale(tau: int, k: int, num_steps: int) -> float:
  """PipeMare's factor for a tau-stale gradient at update k (from 0)."""
  return 1.0 / max(tau, 1) ** (1.0 - min(k / num_steps, 1.0))
