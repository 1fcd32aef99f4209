"""The registry of the algorithms compared, whose names are spelled only here.

========================  ===========================================  =========
name                      server update (on top of the optimizer)      simulator
========================  ===========================================  =========
``sequential``            one worker, M=1 (staleness 0)                async
``ssgd``                  the mean of M fresh gradients per round      sync
``asgd``                  each stale gradient as it arrives            async
``sa-asgd``               step / max(τ, 1) (Zhang et al. 2016)         async
``sqrt-asgd``             step / sqrt(1 + τ)                           async
``da-asgd``               step · M / max(M, τ) (Mishchenko 2022)       async
``dc-asgd-c``             DC-ASGD, constant λ (default 0.04)           async
``dc-asgd-a``             DC-ASGD-a, λ_t = λ0 / sqrt(MeanSquare + ε)   async
``dc-asgd-a-bc``          DC-ASGD-a, bias-corrected MeanSquare         async
``dc-asgd-a-warmup``      DC-ASGD-a, λ ramped up over 100 updates      async
``dc-asgd-a-clip``        DC-ASGD-a, term at most |g| per coordinate   async
``dc-asgd-a-tuned``       DC-ASGD-a whose λ0 the evidence grid tunes   async
``dc-asgd-a-clip-tuned``  the clipped one, λ0 tuned                    async
``gap-aware``             g / (1 + |w - w_m| / C) (Barkai 2019)        async
``delayed-nesterov``      momentum once per M pushes (Liu 2024)        async
``delayed-nesterov-dc``   the same after DC-ASGD-a, λ0 tuned           async
``dana``                  look-ahead pull w - η Σ μ^k v (Hakimi 2019)  async
``dana-dc``               the look-ahead pull and DC-ASGD-a            async
``exact-dc``              g + H(w_m)(w - w_m) by exact HVP (ceiling)   async
``fisher-dc-a``           DC-ASGD-a, per-example Fisher, λ0 tuned      async
``secant-dc``             g + clip(λ h⊙(w - w_m), ±|g|), h a secant    async
``wp-nesterov``           pull the Nesterov weight prediction          async
``wp-nadam``              NAdam β1 0.99, predicted pull (AsyncPP)      async
``pipemare``              step / τ^(1 - min(k/K, 1)) (PipeMare)        async
========================  ===========================================  =========

The formulas and sources are in the docstrings of the ``dcasgd_optax``
transformations each one chains (:func:`dcasgd_optax.scale_by_staleness`,
:func:`~dcasgd_optax.fisher_compensation`,
:func:`~dcasgd_optax.secant_compensation`,
:func:`~dcasgd_optax.look_ahead_adam`, :func:`~dcasgd_optax.scale_by_pipemare`,
:func:`~dcasgd_optax.delay_compensation`, :func:`~dcasgd_optax.gap_aware`,
:func:`~dcasgd_optax.delayed_nesterov`,
:func:`~dcasgd_optax.look_ahead_momentum`). The last three act on SGD's
momentum (``delayed-nesterov``, ``dana``, ``dana-dc``: SGD with momentum
only) or scale with SGD's step (``gap-aware``: SGD only).

Each :class:`Algorithm` record says how the algorithm is named (its label
in tables and plots), which simulator runs it, how many workers it really
has, how many gradients each server update consumes, and how its optimizer
is built. Code elsewhere asks the record (``algorithms.get(config.algorithm)``),
never compares names. A new algorithm is one new record in :data:`REGISTRY`
(and its plot style in :data:`experiments.plots.STYLES`).

All share the same optimizer core, :func:`experiments.optimizers.optimizer`:
L2 weight decay added to the gradient, then ``config.optimizer``
(:data:`experiments.optimizers.OPTIMIZERS`: SGD with the config's momentum,
or Adam) with the config's learning-rate schedule. An algorithm adds an
adjustment of the stale gradient before it (weight decay is added to the
adjusted gradient), or replaces the optimizer's momentum (delayed Nesterov,
the look-ahead). :func:`make_tx` chains them.

**What an epoch is.** An epoch is ``S = num_train // batch_size`` minibatch
gradients, for every algorithm: the gradients are the same data stream (see
:func:`experiments.input_pipeline.gradient_indices`). The asynchronous
algorithms make one server update per gradient, ``S`` per epoch. SSGD with
``M`` workers averages ``M`` gradients per update, so it makes ``S / M``
updates per epoch, each on ``M`` times the data, with the same learning rate
(not scaled with ``M``); its learning-rate boundaries are placed at the same
epochs.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import inspect
import types
from typing import Any

import jax
import jax.numpy as jnp
import optax

import dcasgd_optax
from dcasgd_optax import harness
from experiments import optimizers

# (config, num_workers, learning_rate) -> (adjustment or None, core): the
# transformation of the stale gradient and the optimizer parts after it.
# ``config`` is read by attribute, its tuned fields possibly arrays.
TxBuilder = Callable[
    [Any, int, optax.ScalarOrSchedule],
    tuple[optax.GradientTransformation | None, list],
]


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One algorithm of the comparisons.

  Attributes:
    name: the config value (``config.algorithm``) and the results' key.
    label: the display name in tables and plots.
    build_tx: ``(config, num_workers, learning_rate) -> (adjustment, core)``:
      the transformation of the stale gradient (or ``None``) and the
      optimizer parts after it (:func:`make_tx` chains them).
    synchronous: run by ``harness.SyncSimulator`` (one update per round of
      ``num_workers`` fresh gradients) instead of ``harness.Simulator``.
    single_worker: always runs with one worker (sequential SGD), whatever
      ``config.num_workers`` says.
    tuned: config fields besides the learning rate that the evidence grid
      tunes for it (:mod:`experiments.methods`), e.g. ``("dc_lambda",)``.
    requires_momentum: only defined for SGD with momentum (it acts on the
      momentum buffer); skipped for other optimizers.
    optimizers: the ``config.optimizer`` values it is defined for (``None``:
      all).
    simulator_options: ``config -> dict``: keyword arguments of the
      simulator it needs (``None``: none), e.g. ``push_grad_sq=True`` for a
      compensation with the Fisher diagonal or ``exact_compensation=1.0``
      for the harness's exact Taylor correction.
  """

  name: str
  label: str
  build_tx: TxBuilder
  synchronous: bool = False
  single_worker: bool = False
  tuned: tuple[str, ...] = ()
  requires_momentum: bool = False
  optimizers: tuple[str, ...] | None = None
  simulator_options: Callable[[Any], dict] | None = None

  def simulator_kwargs(self, config: Any) -> dict:
    """The simulator's keyword arguments it needs for ``config``."""
    return {} if self.simulator_options is None else dict(
        self.simulator_options(config))

  @property
  def simulator(self) -> type:
    """The harness class that runs it."""
    return harness.SyncSimulator if self.synchronous else harness.Simulator

  def applies_to(self, config: Any) -> bool:
    """Whether it is defined for ``config``'s optimizer."""
    if self.optimizers is not None and config.optimizer not in self.optimizers:
      return False
    has_momentum = config.optimizer == "sgd" and bool(config.momentum)
    return has_momentum or not self.requires_momentum

  def requirement(self) -> str:
    """What :meth:`applies_to` asks of the config, in words."""
    needs = []
    if self.optimizers is not None:
      needs.append(f"config.optimizer in {self.optimizers}")
    if self.requires_momentum:
      needs.append("config.optimizer='sgd' with config.momentum > 0")
    return " and ".join(needs) or "nothing"

  def arrival_schedule(self, schedule: str) -> str:
    """The schedule it runs under: ``schedule``, or ``cyclic`` when
    synchronous (each round of ``M`` arrivals holds every worker once; the
    order in a round only labels the metrics)."""
    return "cyclic" if self.synchronous else schedule

  def schedule_label(self, schedule: str) -> str:
    """How results name its schedule: ``schedule``, or ``sync``."""
    return "sync" if self.synchronous else schedule

  def effective_workers(self, num_workers: int) -> int:
    """The number of workers it actually runs with."""
    return 1 if self.single_worker else num_workers

  def gradients_per_update(self, num_workers: int) -> int:
    """Gradients one server update consumes: ``M`` (SSGD) or 1."""
    return self.effective_workers(num_workers) if self.synchronous else 1

  def updates_per_epoch(self, num_workers: int, steps_per_epoch: int) -> float:
    """Server updates per epoch: ``S`` (async, sequential), ``S / M`` (SSGD)."""
    return steps_per_epoch / self.gradients_per_update(num_workers)


def _sgd(config, num_workers, learning_rate):
  del num_workers
  return None, optimizers.optimizer(config, learning_rate)


def _staleness_scaled(rule: str) -> TxBuilder:
  def build(config, num_workers, learning_rate):
    scale = dcasgd_optax.scale_by_staleness(rule, num_workers=num_workers)
    return scale, optimizers.optimizer(config, learning_rate)

  return build


def _delay_compensated(adaptive: bool, **options: Any) -> TxBuilder:
  def build(config, num_workers, learning_rate):
    compensation = dcasgd_optax.delay_compensation(
        num_workers, config.dc_lambda, adaptive=adaptive,
        decay=config.dc_decay, eps=config.dc_eps, **options,
    )
    return compensation, optimizers.optimizer(config, learning_rate)

  return build


def _gap_aware(config, num_workers, learning_rate):
  # C's step: the base rate's steady-state step with momentum, η / (1 - μ).
  step = config.learning_rate / (1.0 - config.momentum)
  return (dcasgd_optax.gap_aware(num_workers, step),
          optimizers.optimizer(config, learning_rate))


def _delayed_nesterov(config, num_workers, learning_rate):
  # The rate is per push: each push steps η / N, so the period's η is N times
  # it, and a period moves the model about as far as N pushes of momentum SGD.
  *decay, _ = optimizers.optimizer(config, learning_rate)
  nesterov = dcasgd_optax.delayed_nesterov(
      lambda count: num_workers * learning_rate(count), num_workers,
      momentum=config.momentum, momentum_activation=0.0)
  return None, [*decay, nesterov]


def _before_delayed_nesterov(compensated: TxBuilder) -> TxBuilder:
  """``compensated``'s adjustment of the stale gradient, then delayed
  Nesterov in place of its optimizer."""

  def build(config, num_workers, learning_rate):
    adjustment, _ = compensated(config, num_workers, learning_rate)
    return adjustment, _delayed_nesterov(config, num_workers,
                                         learning_rate)[1]

  return build


def _look_ahead(compensate: bool, nesterov: bool = False) -> TxBuilder:
  def build(config, num_workers, learning_rate):
    *decay, _ = optimizers.optimizer(config, learning_rate)
    # The backups record the look-ahead each worker pulls; λ = 0: DANA alone.
    compensation = dcasgd_optax.delay_compensation(
        num_workers, config.dc_lambda if compensate else 0.0,
        adaptive=compensate, decay=config.dc_decay, eps=config.dc_eps,
    )
    ahead = dcasgd_optax.look_ahead_momentum(
        learning_rate, config.momentum, horizon=num_workers - 1,
        nesterov=nesterov)
    return compensation, [*decay, ahead]

  return build


def _fisher_compensated(config, num_workers, learning_rate):
  compensation = dcasgd_optax.fisher_compensation(
      num_workers, config.dc_lambda, adaptive=True, decay=config.dc_decay,
      eps=config.dc_eps)
  return compensation, optimizers.optimizer(config, learning_rate)


def _secant_compensated(config, num_workers, learning_rate):
  # The trial's design (experiments/secant_trial.py): decay 0.99, the term
  # clipped to |g| per coordinate (secant_compensation's defaults).
  compensation = dcasgd_optax.secant_compensation(
      num_workers, config.secant_lambda)
  return compensation, optimizers.optimizer(config, learning_rate)


def _weight_prediction_nadam(config, num_workers, learning_rate):
  *decay, _ = optimizers.optimizer(config, learning_rate)
  # The backups record the prediction each worker pulls (λ = 0: no DC).
  compensation = dcasgd_optax.delay_compensation(num_workers, 0.0)
  return compensation, [*decay, dcasgd_optax.look_ahead_adam(
      learning_rate, horizon=num_workers - 1, b1=WEIGHT_PREDICTION_B1)]


def _pipemare(config, num_workers, learning_rate):
  del num_workers
  return (dcasgd_optax.scale_by_pipemare(PIPEMARE_STEPS),
          optimizers.optimizer(config, learning_rate))


# PipeMare's K: the rate climbs from η/τ to η over 2 epochs of the grid (250
# updates of batch 32 on the 4,000 digits), a fifth of its 10-epoch budget.
PIPEMARE_STEPS = 250
# AsyncPP's NAdam β1 for weight prediction (arXiv 2505.01099).
WEIGHT_PREDICTION_B1 = 0.99

# DC-ASGD-a's λ warm-up: the first 100 updates, where notebook 03 measured
# the over-compensation (MeanSquare needs about 1 / (1 - 0.95) = 20 to settle).
LAMBDA_WARMUP = 100

REGISTRY: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("sequential", "sequential SGD", _sgd, single_worker=True),
    Algorithm("ssgd", "SSGD", _sgd, synchronous=True),
    Algorithm("asgd", "ASGD", _sgd),
    Algorithm("sa-asgd", "SA-ASGD", _staleness_scaled("inverse")),
    Algorithm("sqrt-asgd", "ASGD 1/√(1+τ)", _staleness_scaled("sqrt")),
    Algorithm("da-asgd", "delay-adaptive",
              _staleness_scaled("delay_adaptive")),
    Algorithm("dc-asgd-c", "DC-ASGD-c", _delay_compensated(False),
              tuned=("dc_lambda",)),
    Algorithm("dc-asgd-a", "DC-ASGD-a", _delay_compensated(True)),
    Algorithm("dc-asgd-a-bc", "DC-ASGD-a, bias-corr.",
              _delay_compensated(True, bias_correction=True)),
    Algorithm("dc-asgd-a-warmup", "DC-ASGD-a, λ warm-up",
              _delay_compensated(True, lambda_warmup=LAMBDA_WARMUP)),
    Algorithm("dc-asgd-a-clip", "DC-ASGD-a, clip",
              _delay_compensated(True, correction_clip=1.0)),
    Algorithm("dc-asgd-a-tuned", "DC-ASGD-a, λ0 tuned",
              _delay_compensated(True), tuned=("dc_lambda",)),
    Algorithm("dc-asgd-a-clip-tuned", "DC-ASGD-a, clip, λ0 tuned",
              _delay_compensated(True, correction_clip=1.0),
              tuned=("dc_lambda",)),
    Algorithm("gap-aware", "Gap-Aware", _gap_aware, optimizers=("sgd",)),
    Algorithm("delayed-nesterov", "delayed Nesterov", _delayed_nesterov,
              requires_momentum=True),
    Algorithm("delayed-nesterov-dc", "delayed Nesterov + DC, λ0 tuned",
              _before_delayed_nesterov(_delay_compensated(True)),
              requires_momentum=True,
              tuned=("dc_lambda",)),
    Algorithm("dana", "look-ahead (DANA)", _look_ahead(False),
              requires_momentum=True),
    Algorithm("dana-dc", "DANA-DC", _look_ahead(True), requires_momentum=True),
    # The harness's exact Taylor correction (λ = 1,
    # harness.Simulator(exact_compensation=...)): the ceiling of every
    # first-order correction, not a method a server can run.
    Algorithm("exact-dc", "exact Taylor (ceiling)", _sgd,
              simulator_options=lambda config: {"exact_compensation": 1.0}),
    Algorithm("fisher-dc-a", "Fisher DC-ASGD-a, λ0 tuned", _fisher_compensated,
              tuned=("dc_lambda",),
              simulator_options=lambda config: {"push_grad_sq": True}),
    Algorithm("secant-dc", "secant DC, λ tuned", _secant_compensated,
              tuned=("secant_lambda",)),
    Algorithm("delayed-nesterov-secant", "delayed Nesterov + secant, λ tuned",
              _before_delayed_nesterov(_secant_compensated),
              requires_momentum=True,
              tuned=("secant_lambda",)),
    Algorithm("wp-nesterov", "weight prediction, Nesterov",
              _look_ahead(False, nesterov=True), requires_momentum=True),
    Algorithm("wp-nadam", "weight prediction, NAdam β1 0.99",
              _weight_prediction_nadam, optimizers=("adam",)),
    Algorithm("pipemare", "PipeMare", _pipemare),
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


def _relative(config: Any, algorithm: Algorithm, num_workers: int,
              steps_per_epoch: int) -> optax.Schedule:
  return optimizers.relative_schedule(
      config, algorithm.updates_per_epoch(num_workers, steps_per_epoch))


def make_tx(
    config: Any, num_workers: int, steps_per_epoch: int
) -> optax.GradientTransformation:
  """The optimizer of ``config.algorithm`` for ``num_workers`` workers.

  Its chain is the algorithm's gradient adjustment (if any), then the
  optimizer core (:func:`experiments.optimizers.optimizer`). The base
  learning rate and the algorithm's tuned fields (``Algorithm.tuned``) are
  injected with ``optax.inject_hyperparams``: they are arrays in the optimizer
  state, so runs that differ only in them (or in the seed) compile to the same
  program, and a sweep compiles once per cell.
  """
  algorithm = get(config.algorithm)
  relative = _relative(config, algorithm, num_workers, steps_per_epoch)

  def factory(**hyperparams):
    lr = hyperparams["learning_rate"]
    fields = types.SimpleNamespace(**{**config.to_dict(), **hyperparams})
    adjust, core = algorithm.build_tx(
        fields, num_workers, lambda count: lr * relative(count))
    return optax.chain(*([] if adjust is None else [adjust]), *core)

  names = ("learning_rate", *algorithm.tuned)
  # inject_hyperparams injects the factory's named parameters (its numbers).
  factory.__signature__ = inspect.Signature([
      inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names])
  return optax.inject_hyperparams(factory)(**{n: config[n] for n in names})


def injected(config: Any) -> dict[str, Any]:
  """The values :func:`make_tx` injects: the base learning rate and the
  algorithm's tuned fields that are numbers (a ``None`` stays static)."""
  names = ("learning_rate", *get(config.algorithm).tuned)
  return {n: config[n] for n in names if config[n] is not None}


def _is_injected_state(node: Any) -> bool:
  return isinstance(node, optax.InjectStatefulHyperparamsState)


def set_injected(opt_state: Any, config: Any) -> Any:
  """``opt_state`` with its injected hyperparameters set to ``config``'s.

  The state of :func:`make_tx`'s optimizer for one config serves any config
  that differs only in :func:`injected` values: this is how a compiled
  program is reused across a sweep (optax allows setting numeric
  hyperparameters by hand). Each value keeps the dtype and sharding of the
  one it replaces.
  """
  values = injected(config)

  def set_values(node):
    if not _is_injected_state(node):
      return node
    hyperparams = {
        k: jax.device_put(jnp.asarray(values[k], v.dtype), v.sharding)
        if k in values else v
        for k, v in node.hyperparams.items()
    }
    return node._replace(hyperparams=hyperparams)

  return jax.tree.map(set_values, opt_state, is_leaf=_is_injected_state)


def gradient_adjustment(
    config: Any, num_workers: int, steps_per_epoch: int
) -> optax.GradientTransformation | None:
  """The transformation that starts ``make_tx``'s chain and adjusts the
  stale gradient (delay compensation, Gap-Aware, a staleness rule), built
  with the config's values; ``None`` when the algorithm adjusts nothing.

  It is what the simulator's diagnostics need as ``first_transform`` to
  report the applied direction (they find its state in ``make_tx``'s by
  structure).
  """
  algorithm = get(config.algorithm)
  relative = _relative(config, algorithm, num_workers, steps_per_epoch)
  adjust, _ = algorithm.build_tx(
      config, num_workers, lambda count: config.learning_rate * relative(count))
  return adjust
