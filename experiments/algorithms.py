"""The algorithms compared, each an optax transformation run by a simulator.

=================  ===================================================  =========
name               server update                                        simulator
=================  ===================================================  =========
``sequential``     SGD, one worker (staleness 0)                        async, M=1
``ssgd``           SGD on the mean of M fresh gradients per round       sync
``asgd``           SGD on each stale gradient as it arrives             async
``sa-asgd``        staleness-aware ASGD: learning rate / max(τ, 1)      async
``dc-asgd-c``      DC-ASGD, constant λ (default 0.04)                   async
``dc-asgd-a``      DC-ASGD, adaptive λ_t = λ0 / sqrt(MeanSquare + ε)    async
=================  ===================================================  =========

All share the same SGD core (``optax.sgd`` with the config's momentum and
learning-rate schedule, plus L2 weight decay added to the gradient), so the
only difference between two algorithms is how a gradient is adjusted before
it.

**What an epoch is.** An epoch is ``S = num_train // batch_size`` minibatch
gradients, for every algorithm: the gradients are the same data stream (see
:func:`experiments.train.gradient_indices`). The asynchronous algorithms make
one server update per gradient, ``S`` per epoch. SSGD with ``M`` workers
averages ``M`` gradients per update, so it makes ``S / M`` updates per epoch,
each on ``M`` times the data, with the same learning rate (not scaled with
``M``); its learning-rate boundaries are placed at the same epochs.
"""

from __future__ import annotations

from typing import Any, Callable

import optax

import dcasgd_optax
from dcasgd_optax import harness

ALGORITHMS = ("sequential", "ssgd", "asgd", "sa-asgd", "dc-asgd-c", "dc-asgd-a")
ASYNC = ("asgd", "sa-asgd", "dc-asgd-c", "dc-asgd-a")
# Display names, in the paper's column order.
LABELS = {
    "sequential": "sequential SGD",
    "ssgd": "SSGD",
    "asgd": "ASGD",
    "sa-asgd": "SA-ASGD",
    "dc-asgd-c": "DC-ASGD-c",
    "dc-asgd-a": "DC-ASGD-a",
}


def check_name(name: str) -> str:
  """Returns ``name`` if it is a known algorithm, else raises with the choices."""
  if name not in ALGORITHMS:
    raise ValueError(
        f"Unknown algorithm {name!r}; valid choices: {', '.join(ALGORITHMS)}."
    )
  return name


def effective_workers(algorithm: str, num_workers: int) -> int:
  """Sequential SGD always runs with one worker, whatever ``num_workers`` says."""
  return 1 if algorithm == "sequential" else num_workers


def updates_per_epoch(algorithm: str, num_workers: int, steps_per_epoch: int) -> float:
  """Server updates per epoch: ``S`` (async, sequential) or ``S / M`` (SSGD)."""
  if algorithm == "ssgd":
    return steps_per_epoch / num_workers
  return float(steps_per_epoch)


def learning_rate_schedule(
    config: Any, updates_per_epoch_: float
) -> optax.Schedule:
  """Linear warm-up, then the base rate times ``lr_decay_factor`` per boundary.

  Boundaries (``config.lr_boundaries_epochs``) and warm-up
  (``config.warmup_epochs``) are given in epochs and converted to server
  updates, so every algorithm decays at the same point of the data stream.
  """
  base = config.learning_rate
  boundaries = {
      int(round(e * updates_per_epoch_)): config.lr_decay_factor
      for e in config.lr_boundaries_epochs
  }
  decay = optax.piecewise_constant_schedule(base, boundaries)
  warmup = int(round(config.warmup_epochs * updates_per_epoch_))
  if warmup == 0:
    return decay
  ramp = optax.linear_schedule(base / 10, base, warmup)
  return optax.join_schedules([ramp, lambda t: decay(t + warmup)], [warmup])


def make_tx(
    config: Any, num_workers: int, steps_per_epoch: int
) -> optax.GradientTransformation:
  """The optimizer of ``config.algorithm`` for ``num_workers`` workers."""
  algorithm = config.algorithm
  lr = learning_rate_schedule(
      config, updates_per_epoch(algorithm, num_workers, steps_per_epoch)
  )
  momentum = config.momentum or None
  if algorithm in ("dc-asgd-c", "dc-asgd-a"):
    return dcasgd_optax.dcasgd(
        lr,
        num_workers,
        lambda_=config.dc_lambda,
        adaptive=algorithm == "dc-asgd-a",
        decay=config.dc_decay,
        eps=config.dc_eps,
        momentum=momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
  parts = []
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  if algorithm == "sa-asgd":
    parts.append(dcasgd_optax.scale_by_inverse_staleness())
  parts.append(optax.sgd(lr, momentum=momentum, nesterov=config.nesterov))
  return optax.chain(*parts)


def make_simulator(
    config: Any,
    loss_fn: Callable[..., Any],
    *,
    steps_per_epoch: int,
    has_model_state: bool,
) -> harness.Simulator | harness.SyncSimulator:
  """The simulator that runs ``config.algorithm``."""
  algorithm = check_name(config.algorithm)
  m = effective_workers(algorithm, config.num_workers)
  tx = make_tx(config, m, steps_per_epoch)
  if algorithm == "ssgd":
    return harness.SyncSimulator(
        loss_fn, tx, m, has_model_state=has_model_state
    )
  return harness.Simulator(loss_fn, tx, m, has_model_state=has_model_state)
