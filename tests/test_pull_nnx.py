"""Flax NNX users: the pull helpers take what an NNX user holds.

``nnx.Optimizer`` wraps every leaf of the optax state in ``OptVariable`` and
``nnx.state(model, nnx.Param)`` wraps params in ``Param``. The same training
run through NNX and through plain pytrees must give the same numbers, also
when a pull sends a look-ahead read from the (wrapped) momentum buffer.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax

nnx = pytest.importorskip("flax.nnx")


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(3, 4, rngs=rngs)
    self.out = nnx.Linear(4, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def loss_fn(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


OPTIMIZERS = {
    # Pulls after each push itself.
    "dcasgd": lambda: dcasgd_optax.dcasgd(0.1, 3, momentum=0.9),
    # A bare chain: the test pulls explicitly.
    "chain": lambda: optax.chain(
        dcasgd_optax.delay_compensation(3, 2.0, adaptive=True),
        optax.sgd(0.1)),
    # Pulls a look-ahead after each push (read from the wrapped momentum).
    "dana_dcasgd": lambda: dcasgd_optax.dana_dcasgd(0.1, 3, momentum=0.9),
    # A bare chain whose explicit pulls send the look-ahead.
    "look_ahead_chain": lambda: optax.chain(
        dcasgd_optax.delay_compensation(3, 2.0, adaptive=True),
        dcasgd_optax.look_ahead_momentum(0.1, 0.9, horizon=2)),
}
EVENTS = ((0, True), (2, False), (2, True), (0, True))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_nnx_training_gives_the_plain_pytree_numbers(name):
  model = MLP(nnx.Rngs(0))
  replica = nnx.clone(model)  # one worker's copy, refreshed before each use
  optimizer = nnx.Optimizer(model, OPTIMIZERS[name](), wrt=nnx.Param)
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(params))
  tx = OPTIMIZERS[name]()
  state = tx.init(params)
  plain_grad = jax.grad(
      lambda p, x, y: loss_fn(nnx.merge(graphdef, p), x, y))
  rng = np.random.default_rng(0)
  for worker, explicit_pull in EVENTS:
    x = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((5, 1)), jnp.float32)
    # NNX: the worker's model is what the optimizer state says it holds.
    nnx.update(replica, dcasgd_optax.worker_params(optimizer.opt_state, worker))
    optimizer.update(model, nnx.grad(loss_fn)(replica, x, y), worker=worker)
    # The same with plain pytrees.
    held = dcasgd_optax.worker_params(state, worker)
    grads = plain_grad(held, x, y)
    updates, state = tx.update(grads, state, params, worker=worker)
    params = optax.apply_updates(params, updates)
    if explicit_pull:
      pulled, optimizer.opt_state = dcasgd_optax.pull(
          optimizer.opt_state, nnx.state(model, nnx.Param), worker)
      nnx.update(replica, pulled)
      _, state = dcasgd_optax.pull(state, params, worker)
    chex.assert_trees_all_close(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)), params, rtol=1e-6)
    for m in range(3):
      chex.assert_trees_all_close(
          nnx.to_pure_dict(dcasgd_optax.worker_params(optimizer.opt_state, m)),
          dcasgd_optax.worker_params(state, m), rtol=1e-6)


def test_record_pull_keeps_the_nnx_state_wrapped_and_reads_back_bare():
  model = MLP(nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, dcasgd_optax.dcasgd(0.1, 2), wrt=nnx.Param)
  moved = jax.tree.map(lambda p: p + 1.0, nnx.state(model, nnx.Param))
  state = dcasgd_optax.record_pull(optimizer.opt_state, moved, 1)
  assert jax.tree.structure(state) == jax.tree.structure(optimizer.opt_state)
  held = dcasgd_optax.worker_params(state, 1)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(
      held, is_leaf=lambda v: isinstance(v, nnx.Variable)))
  want = nnx.to_pure_dict(moved)
  chex.assert_trees_all_equal(nnx.to_pure_dict(held), want)
  # Worker 0 still holds the initial model.
  chex.assert_trees_all_equal(
      nnx.to_pure_dict(dcasgd_optax.worker_params(state, 0)),
      nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_nnx_params_of_another_model_are_rejected_naming_params():
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, dcasgd_optax.dcasgd(0.1, 2), wrt=nnx.Param)
  other = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="`params` has a different tree"):
    dcasgd_optax.record_pull(
        optimizer.opt_state, nnx.state(other, nnx.Param), 0)
