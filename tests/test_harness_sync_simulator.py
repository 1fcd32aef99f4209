"""SyncSimulator (SSGD): rounds of averaged gradients against a Python loop."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax
from dcasgd_optax.harness import Simulator
from dcasgd_optax.harness import SyncSimulator

from helpers import REPLAY_TOL
from helpers import STRATEGIES
from helpers import W
from helpers import bn_loss_fn
from helpers import init_model_state
from helpers import init_params
from helpers import loss_fn
from helpers import make_batches


def reference_sync(tx, params, batches, rounds):
  opt_state = tx.init(params)
  for r in range(rounds):
    grads = [jax.grad(loss_fn)(params, batches[r * W + j]) for j in range(W)]
    mean = jax.tree.map(lambda *g: jnp.mean(jnp.stack(g), axis=0), *grads)
    updates, opt_state = tx.update(mean, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("vmap_slots", [None, W])
def test_sync_simulator_averages_gradients_per_round(vmap_slots, strategy):
  batches = make_batches(5 * W)
  sim = SyncSimulator(loss_fn, optax.sgd(0.1, momentum=0.9), W,
                      vmap_slots=vmap_slots, strategy=strategy)
  state, metrics = sim.replay(sim.init(init_params()), batches)
  params = reference_sync(optax.sgd(0.1, momentum=0.9), init_params(),
                          batches, 5)
  chex.assert_trees_all_close(state.params, params, **REPLAY_TOL)
  assert metrics["loss"].shape == (5 * W,) and int(state.step) == 5
  assert not np.any(metrics["staleness"])
  dc = SyncSimulator(loss_fn, dcasgd_optax.dcasgd(0.1, W, momentum=0.9), W,
                     strategy=strategy)
  dc_state, _ = dc.replay(dc.init(init_params()), batches)
  chex.assert_trees_all_close(dc_state.params, params, **REPLAY_TOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sync_simulator_averages_model_state(strategy):
  sim = SyncSimulator(bn_loss_fn, optax.sgd(0.1), W, has_model_state=True,
                      strategy=strategy)
  state, _ = sim.replay(sim.init(init_params(), init_model_state()),
                        make_batches(2 * W))
  assert int(state.model_state["count"]) == 2
  assert state.model_state["mean"].shape == (5,)


def test_sync_strategies_agree_with_rounds_of_several_groups():
  num_workers = 19  # "host_chunks": 3 groups of 7 slots per round
  batches = make_batches(2 * num_workers)
  results = []
  for strategy in STRATEGIES:
    sim = SyncSimulator(bn_loss_fn, dcasgd_optax.dcasgd(0.1, num_workers),
                        num_workers, has_model_state=True, strategy=strategy)
    results.append(sim.replay(sim.init(init_params(), init_model_state()),
                              batches))
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_sync_batches_must_fill_rounds():
  sim = SyncSimulator(loss_fn, optax.sgd(0.1), W)
  with pytest.raises(ValueError, match="R \\* num_workers"):
    sim.replay(sim.init(init_params()), make_batches(W + 1))


def test_sync_replay_rejects_a_state_from_another_simulator():
  params = {"w": jnp.zeros(3)}
  loss = lambda p, b: jnp.sum((p["w"] - b) ** 2)
  batches = jnp.ones((4, 3))
  async_state = Simulator(loss, optax.sgd(0.1), 2).init(params)
  sync = SyncSimulator(loss, optax.sgd(0.1), 2)
  with pytest.raises(ValueError, match="opt_state"):
    sync.replay(async_state, batches)
  with pytest.raises(ValueError, match="workers"):
    sync.replay(SyncSimulator(loss, optax.sgd(0.1), 4).init(params), batches)
  state, _ = sync.replay(sync.init(params), batches)  # its own state works
  assert int(state.step) == 2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sync_replay_many_equals_separate_replays(strategy):
  """N SSGD runs (different initial models, learning rates and model-state
  statistics) as one program, against N replays."""
  num_sims, rounds = 2, 3
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.5)
  sim = SyncSimulator(bn_loss_fn, tx, W, has_model_state=True,
                      strategy=strategy)
  params = [jax.tree.map(lambda x, i=i: x * (1.0 + 0.2 * i), init_params())
            for i in range(num_sims)]
  lrs = jnp.array([0.1, 0.3])
  batches = [make_batches(rounds * W, seed=i) for i in range(num_sims)]
  stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
  states = sim.init_many(stack(params), stack([init_model_state()] * 2),
                         hyperparams={"learning_rate": lrs})
  states, record = sim.replay_many(states, stack(batches))
  for i in range(num_sims):
    state = sim.init(params[i], init_model_state())
    state = state._replace(opt_state=state.opt_state._replace(
        hyperparams=dict(state.opt_state.hyperparams, learning_rate=lrs[i])))
    state, alone = sim.replay(state, batches[i])
    chex.assert_trees_all_close(
        jax.tree.map(lambda x, i=i: x[i], states), state, **REPLAY_TOL)
    for key, value in alone.items():
      chex.assert_trees_all_close(record[key][i], value, **REPLAY_TOL)
