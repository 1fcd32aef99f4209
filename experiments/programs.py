"""What a run compiles, and what runs of a study share of it.

A :class:`Program` holds the parts of a run that depend only on its code,
not on its seed or data order: the data on device, the model's ``apply``,
the loss, the simulator (:func:`make_simulator`) and the evaluation, with
their compiled programs. Runs whose configs have the same
:func:`program_key` (they differ only in seed, arrivals, length or injected
hyperparameters) can share one. A :class:`ProgramCache` is how a study
shares them: it makes one and passes it to every
:func:`experiments.train.train_and_evaluate` of its sweep (nothing is
cached at module level).
"""

from __future__ import annotations

from collections.abc import Callable
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dcasgd_optax import harness
from experiments import algorithms
from experiments import data
from experiments import input_pipeline
from experiments import models


def make_loss(apply, ds: data.Dataset):
  """``loss(params, model_state, batch) -> (loss, model_state)`` on device data.

  ``batch`` is ``{'idx': int32 [B]}``: the minibatch's example indices, plus
  ``'key'``, its augmentation key, when ``ds.augment``.
  """
  images = jnp.asarray(ds.train_images)
  labels = jnp.asarray(ds.train_labels)

  def loss_fn(params, model_state, batch):
    x_BxHxWxC = images[batch["idx"]]
    if ds.augment:
      x_BxHxWxC = data.crop_and_flip(batch["key"], x_BxHxWxC)
    logits, model_state = apply(params, model_state, x_BxHxWxC, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels[batch["idx"]]
    )
    return jnp.mean(loss), model_state

  return loss_fn


def make_evaluate(apply, ds: data.Dataset, batch_size: int):
  """A jitted ``evaluate(params, model_state) -> (error, loss)`` (test set)."""
  n = len(ds.test_labels)
  pad = -n % batch_size
  x = np.concatenate(
      [ds.test_images, np.zeros((pad, *ds.image_shape), np.float32)]
  )
  y = np.concatenate([ds.test_labels, np.zeros((pad,), np.int32)])
  mask = np.arange(n + pad) < n
  nb = (n + pad) // batch_size
  x_NBxBxHxWxC = jnp.asarray(x.reshape(nb, batch_size, *ds.image_shape))
  y_NBxB = jnp.asarray(y.reshape(nb, batch_size))
  mask_NBxB = jnp.asarray(mask.reshape(nb, batch_size))

  @jax.jit
  def evaluate(params, model_state):
    def one(args):
      x_B, y_B, m_B = args
      logits, _ = apply(params, model_state, x_B, train=False)
      wrong = (jnp.argmax(logits, -1) != y_B) & m_B
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_B)
      return jnp.sum(wrong), jnp.sum(jnp.where(m_B, loss, 0.0))

    wrong, loss = jax.lax.map(one, (x_NBxBxHxWxC, y_NBxB, mask_NBxB))
    return jnp.sum(wrong) / n, jnp.sum(loss) / n

  return evaluate


def create_model(config: Any, ds: data.Dataset):
  """The config's model for ``ds``, initialized from ``config.seed``."""
  return models.create(
      config.model, image_shape=ds.image_shape, num_classes=ds.num_classes,
      seed=config.seed, mlp_hidden=tuple(config.mlp_hidden),
  )


def make_simulator(
    config: Any,
    loss_fn: Callable[..., Any],
    *,
    steps_per_epoch: int,
    has_model_state: bool,
) -> harness.Simulator | harness.SyncSimulator:
  """The simulator that runs ``config.algorithm`` (its effective workers),
  with diagnostics every ``config.diagnostics_every`` arrivals (0: none)."""
  algorithm = algorithms.get(config.algorithm)
  m = algorithm.effective_workers(config.num_workers)
  tx = algorithms.make_tx(config, m, steps_per_epoch)
  diagnostics = {}
  if config.diagnostics_every:
    diagnostics = dict(
        diagnostics_every=config.diagnostics_every,
        first_transform=algorithms.gradient_adjustment(
            config, m, steps_per_epoch),
    )
  return algorithm.simulator(loss_fn, tx, m, has_model_state=has_model_state,
                             **diagnostics,
                             **algorithm.simulator_kwargs(config))


class Program:
  """What runs that differ only in seed and injected hyperparameters share:
  the data on device, the model's ``apply``, the simulator and the
  evaluation, with their compiled programs.

  Attributes:
    algorithm: the config's :class:`experiments.algorithms.Algorithm`.
    num_workers: the workers it runs with.
    ds: the dataset.
    steps_per_epoch: gradients per epoch.
    stateful: whether the model has a state (BatchNorm statistics).
    sim: the simulator (:func:`make_simulator`).
    evaluate: ``evaluate(params, model_state) -> (error, loss)``.
  """

  def __init__(self, config: ml_collections.ConfigDict, ds: data.Dataset):
    self.algorithm = algorithms.get(config.algorithm)
    self.num_workers = self.algorithm.effective_workers(config.num_workers)
    self.ds = ds
    self.steps_per_epoch = input_pipeline.steps_per_epoch(
        len(ds.train_labels), config.batch_size
    )
    apply, _, model_state = models.functional(create_model(config, ds))
    self.stateful = bool(jax.tree.leaves(model_state))
    stateful_loss = make_loss(apply, ds)
    loss_fn = (stateful_loss if self.stateful
               else lambda p, b: stateful_loss(p, {}, b)[0])
    self.sim = make_simulator(
        config, loss_fn, steps_per_epoch=self.steps_per_epoch,
        has_model_state=self.stateful,
    )
    self.evaluate = make_evaluate(apply, ds, config.eval_batch_size)


def program_key(config: ml_collections.ConfigDict) -> str:
  """The config without what a run's programs do not depend on: its seed,
  its arrivals and length, and the injected hyperparameters
  (:func:`algorithms.injected`), unless the diagnostics bake them into
  their adjustment."""
  fields = json.loads(config.to_json())
  drop = {"seed", "schedule", "gamma_shape", "num_epochs"}  # data, not code
  if not config.diagnostics_every:
    drop |= set(algorithms.injected(config))
  return json.dumps({k: v for k, v in fields.items() if k not in drop},
                    sort_keys=True)


class ProgramCache:
  """The datasets and :class:`Program` s that a study's runs share.

  A study makes one and passes it to each :func:`train_and_evaluate` of its
  sweep, so that runs which differ only in their seed, arrivals, length or
  injected hyperparameters (:func:`program_key`) reuse one compiled
  program, and every run reads its dataset from memory. It keeps the
  ``size`` most recent programs (a sweep runs a cell's runs one after
  another) and every dataset it loaded.

  Example::

    cache = programs.ProgramCache()
    for seed in (0, 1, 2):
      config.seed = seed
      train.train_and_evaluate(config, f"runs/seed{seed}", cache=cache)
  """

  def __init__(self, size: int = 2):
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise ValueError(f"size must be an int >= 1, got {size!r}.")
    self.size = size
    self._programs: dict[str, Program] = {}
    self._datasets: dict[tuple, data.Dataset] = {}

  def dataset(self, config: Any) -> data.Dataset:
    """``config``'s dataset (:func:`experiments.input_pipeline.load`),
    loaded once."""
    key = (config.dataset, config.data_dir, config.download)
    if key not in self._datasets:
      self._datasets[key] = input_pipeline.load(config)
    return self._datasets[key]

  def program(self, config: ml_collections.ConfigDict) -> Program:
    """The :class:`Program` of ``config``, built on first use."""
    key = program_key(config)
    if key not in self._programs:
      while len(self._programs) >= self.size:
        del self._programs[next(iter(self._programs))]
      self._programs[key] = Program(config, self.dataset(config))
    return self._programs[key]
