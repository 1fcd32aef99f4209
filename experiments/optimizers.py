"""The optimizer core every algorithm shares, and its learning-rate schedule.

``config.optimizer`` names one of :data:`OPTIMIZERS` (SGD with the config's
momentum, Adam, or Muon); :func:`optimizer` puts L2 weight decay before it.
:func:`relative_schedule` is the learning rate's multiplier over server
updates (warm-up, then step decay). The algorithms of
:mod:`experiments.algorithms` wrap this core with their adjustment of the
stale gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax


def relative_schedule(config: Any, updates_per_epoch: float) -> optax.Schedule:
  """The learning rate's multiplier over time: a linear warm-up from 1/10,
  then times ``lr_decay_factor`` at each boundary.

  Boundaries (``config.lr_boundaries_epochs``) and warm-up
  (``config.warmup_epochs``) are given in epochs and converted to server
  updates, so every algorithm decays at the same point of the data stream.
  """
  boundaries = {
      int(round(e * updates_per_epoch)): config.lr_decay_factor
      for e in config.lr_boundaries_epochs
  }
  decay = optax.piecewise_constant_schedule(1.0, boundaries)
  warmup = int(round(config.warmup_epochs * updates_per_epoch))
  if warmup == 0:
    return decay
  ramp = optax.linear_schedule(0.1, 1.0, warmup)
  return optax.join_schedules([ramp, lambda t: decay(t + warmup)], [warmup])


OPTIMIZERS: dict[str, Callable[[Any, optax.ScalarOrSchedule],
                               optax.GradientTransformation]] = {
    "sgd": lambda config, learning_rate: optax.sgd(
        learning_rate, momentum=config.momentum or None,
        nesterov=config.nesterov),
    "adam": lambda config, learning_rate: optax.adam(learning_rate),
    # Orthogonalised updates of the 2-D weights (Newton-Schulz), Adam with
    # the same rate for the rest (biases): optax.contrib.muon's defaults.
    "muon": lambda config, learning_rate: optax.contrib.muon(learning_rate),
}
"""``config.optimizer``: SGD (with ``config.momentum``, ``config.nesterov``),
Adam (optax's defaults: b1 0.9, b2 0.999, eps 1e-8), or Muon
(``optax.contrib.muon``'s defaults: momentum 0.95, Nesterov, 5
Newton-Schulz steps; its Adam part for non-matrix parameters at the same
rate)."""


def check_optimizer(name: str) -> str:
  """Returns ``name`` if it is in :data:`OPTIMIZERS`, else raises."""
  if name not in OPTIMIZERS:
    raise ValueError(
        f"Unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}."
    )
  return name


def optimizer(config: Any, learning_rate: optax.ScalarOrSchedule) -> list:
  """The shared core: L2 weight decay (if any), then ``config.optimizer``."""
  parts = []
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  parts.append(
      OPTIMIZERS[check_optimizer(config.optimizer)](config, learning_rate)
  )
  return parts
