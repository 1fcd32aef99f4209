"""The registry of the algorithms compared: the one place their names are spelled.

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

Each :class:`Algorithm` record says how the algorithm is shown (label, plot
style), which simulator runs it, how many workers it really has, how many
gradients each server update consumes, and how its optimizer is built. Code
elsewhere asks the record (``algorithms.get(config.algorithm)``), never
compares names. A new algorithm is one new record in :data:`REGISTRY`.

All share the same optimizer core, :func:`optimizer`: L2 weight decay added
to the gradient, then ``config.optimizer`` (:data:`OPTIMIZERS`: SGD with the
config's momentum, or Adam) with the config's learning-rate schedule, so the
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

import dataclasses
import types
from typing import Any, Callable

import optax

import dcasgd_optax
from dcasgd_optax import harness

# (config, num_workers, learning_rate) -> the server's optimizer; ``config``
# is read by attribute, its tuned fields possibly arrays (see make_tx).
TxBuilder = Callable[[Any, int, optax.ScalarOrSchedule], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One algorithm of the comparisons.

  Attributes:
    name: the config value (``config.algorithm``) and the results' key.
    label: the display name in tables and plots.
    color: its matplotlib colour, the same in every figure.
    marker: its matplotlib marker.
    build_tx: ``(config, num_workers, learning_rate) -> optax transformation``.
    synchronous: run by ``harness.SyncSimulator`` (one update per round of
      ``num_workers`` fresh gradients) instead of ``harness.Simulator``.
    single_worker: always runs with one worker (sequential SGD), whatever
      ``config.num_workers`` says.
    tuned: config fields besides the learning rate that the evidence grid
      tunes for it (:mod:`experiments.methods`), e.g. ``("dc_lambda",)``.
    requires_momentum: only defined for SGD with momentum (it acts on the
      momentum buffer); skipped for other optimizers.
  """

  name: str
  label: str
  color: str
  marker: str
  build_tx: TxBuilder
  synchronous: bool = False
  single_worker: bool = False
  tuned: tuple[str, ...] = ()
  requires_momentum: bool = False

  @property
  def linestyle(self) -> str:
    """Dashed for the single-worker reference, solid otherwise."""
    return "--" if self.single_worker else "-"

  @property
  def simulator(self) -> type:
    """The harness class that runs it."""
    return harness.SyncSimulator if self.synchronous else harness.Simulator

  def applies_to(self, config: Any) -> bool:
    """Whether it is defined for ``config``'s optimizer."""
    has_momentum = config.optimizer == "sgd" and bool(config.momentum)
    return has_momentum or not self.requires_momentum

  def effective_workers(self, num_workers: int) -> int:
    """The number of workers it actually runs with."""
    return 1 if self.single_worker else num_workers

  def gradients_per_update(self, num_workers: int) -> int:
    """Gradients one server update consumes: ``M`` (SSGD) or 1."""
    return self.effective_workers(num_workers) if self.synchronous else 1

  def updates_per_epoch(self, num_workers: int, steps_per_epoch: int) -> float:
    """Server updates per epoch: ``S`` (async, sequential) or ``S / M`` (SSGD)."""
    return steps_per_epoch / self.gradients_per_update(num_workers)


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
}
"""``config.optimizer``: SGD (with ``config.momentum``, ``config.nesterov``),
or Adam (optax's defaults: b1 0.9, b2 0.999, eps 1e-8)."""


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
  parts.append(OPTIMIZERS[check_optimizer(config.optimizer)](config, learning_rate))
  return parts


def _sgd(config, num_workers, learning_rate):
  del num_workers
  return optax.chain(*optimizer(config, learning_rate))


def _staleness_aware(config, num_workers, learning_rate):
  del num_workers
  *decay, sgd = optimizer(config, learning_rate)
  # The gradient, weight decay included, is divided by τ: a step of η / τ.
  return optax.chain(*decay, dcasgd_optax.scale_by_inverse_staleness(), sgd)


def _delay_compensated(adaptive: bool) -> TxBuilder:
  def build(config, num_workers, learning_rate):
    compensation = dcasgd_optax.delay_compensation(
        num_workers, config.dc_lambda, adaptive=adaptive,
        decay=config.dc_decay, eps=config.dc_eps,
    )
    return optax.chain(compensation, *optimizer(config, learning_rate))

  return build


REGISTRY: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("sequential", "sequential SGD", "k", "None", _sgd,
              single_worker=True),
    Algorithm("ssgd", "SSGD", "C0", "s", _sgd, synchronous=True),
    Algorithm("asgd", "ASGD", "C1", "o", _sgd),
    Algorithm("sa-asgd", "SA-ASGD", "C2", "v", _staleness_aware),
    Algorithm("dc-asgd-c", "DC-ASGD-c", "C4", "^", _delay_compensated(False),
              tuned=("dc_lambda",)),
    Algorithm("dc-asgd-a", "DC-ASGD-a", "C3", "D", _delay_compensated(True)),
)}
"""Every algorithm, in the paper's column order (tables and legends use it)."""

SEQUENTIAL = REGISTRY["sequential"]
"""The reference: what asynchronous training should come close to."""
ASGD = REGISTRY["asgd"]
"""Plain asynchronous SGD: a method's gap closed is measured from it."""


def get(name: str) -> Algorithm:
  """The record of ``name``; raises listing the valid choices."""
  if name not in REGISTRY:
    raise ValueError(
        f"Unknown algorithm {name!r}; valid choices: {', '.join(REGISTRY)}."
    )
  return REGISTRY[name]


def ordered(names) -> list[Algorithm]:
  """The records of ``names``, in registry order, each once."""
  names = set(names)
  return [a for a in REGISTRY.values() if a.name in names]


def make_tx(
    config: Any, num_workers: int, steps_per_epoch: int
) -> optax.GradientTransformation:
  """The optimizer of ``config.algorithm`` for ``num_workers`` workers.

  The base learning rate and the algorithm's tuned fields
  (``Algorithm.tuned``) are injected with ``optax.inject_hyperparams``: they
  are arrays in the optimizer state, so runs that differ only in them (or in
  the seed) compile to the same program, and a sweep compiles once per cell.
  """
  algorithm = get(config.algorithm)
  relative = relative_schedule(
      config, algorithm.updates_per_epoch(num_workers, steps_per_epoch)
  )

  def factory(learning_rate, **tuned):
    fields = types.SimpleNamespace(**{**config.to_dict(), **tuned})
    return algorithm.build_tx(
        fields, num_workers, lambda count: learning_rate * relative(count)
    )

  tuned = {f: config[f] for f in algorithm.tuned}
  return optax.inject_hyperparams(factory)(
      learning_rate=config.learning_rate, **tuned
  )


def make_simulator(
    config: Any,
    loss_fn: Callable[..., Any],
    *,
    steps_per_epoch: int,
    has_model_state: bool,
) -> harness.Simulator | harness.SyncSimulator:
  """The simulator that runs ``config.algorithm`` (its effective workers)."""
  algorithm = get(config.algorithm)
  m = algorithm.effective_workers(config.num_workers)
  tx = make_tx(config, m, steps_per_epoch)
  return algorithm.simulator(loss_fn, tx, m, has_model_state=has_model_state)
