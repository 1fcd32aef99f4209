"""Simulator and SyncSimulator share one protocol: arguments, tx, init,
replay(state, batches, arrivals), describe and the per-arrival record."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax
from dcasgd_optax.harness import Simulator
from dcasgd_optax.harness import SyncSimulator
from dcasgd_optax.harness import schedules

W = 4
XS = jax.random.normal(jax.random.key(0), (32, 3))
YS = jnp.cos(XS @ jnp.array([1.0, -1.0, 0.5]))
PARAMS = {"w": jnp.array([0.3, -0.2, 0.1]), "b": jnp.zeros(())}
RECORD_KEYS = {"worker", "staleness", "loss", "step"}
SIMULATORS = (Simulator, SyncSimulator)


def loss_fn(params, idx):
  return jnp.mean(
      (jnp.tanh(XS[idx] @ params["w"] + params["b"]) - YS[idx]) ** 2
  )


def make_batches(num, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 32, (num, 4)))


@pytest.mark.parametrize("cls", SIMULATORS)
def test_one_calling_code_runs_both_simulators(cls):
  arrivals = schedules.shuffled_rounds(W, 3, seed=0)
  sim = cls(loss_fn, dcasgd_optax.dcasgd(0.1, W))  # W read from tx's backups
  assert isinstance(sim.tx, optax.GradientTransformationExtraArgs)
  state = sim.init(PARAMS)
  assert state.last_pull.shape == (W,)
  plan = sim.describe(arrivals, PARAMS, make_batches(3 * W))
  assert set(plan) == {"num_arrivals", "num_runs", "chunk", "num_chunks",
                       "fill_ratio", "strategy"}
  state, record = sim.replay(state, make_batches(3 * W), arrivals)
  assert set(record) == RECORD_KEYS
  for key in RECORD_KEYS:
    assert record[key].shape == (3 * W,), key
  np.testing.assert_array_equal(record["worker"], arrivals)
  assert record["staleness"].dtype == record["step"].dtype == jnp.int32
  assert int(state.step) == int(record["step"][-1])


def test_step_is_the_server_step_after_each_update():
  sim = Simulator(loss_fn, optax.sgd(0.1), W)
  state, first = sim.replay(sim.init(PARAMS), make_batches(6),
                            schedules.cyclic(W, 6))
  _, second = sim.replay(state, make_batches(5), schedules.cyclic(W, 5))
  np.testing.assert_array_equal(first["step"], np.arange(1, 7))
  np.testing.assert_array_equal(second["step"], np.arange(7, 12))
  sync = SyncSimulator(loss_fn, optax.sgd(0.1), W)
  state, first = sync.replay(sync.init(PARAMS), make_batches(2 * W))
  _, second = sync.replay(state, make_batches(W))
  np.testing.assert_array_equal(first["step"], np.repeat([1, 2], W))
  np.testing.assert_array_equal(second["step"], np.full(W, 3))


def test_sync_arrivals_name_the_workers_but_not_the_update():
  sim = SyncSimulator(loss_fn, optax.sgd(0.1, momentum=0.9), W, donate=False)
  batches = make_batches(3 * W)
  arrivals = np.array([2, 0, 3, 1, 1, 2, 3, 0, 0, 1, 2, 3], np.int32)
  state = sim.init(PARAMS)
  default, plain = sim.replay(state, batches)
  named, labelled = sim.replay(state, batches, arrivals)
  # The same update up to float rounding (the sum's terms come in another
  # order: worker j's slot holds another batch).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               default.params, named.params)
  np.testing.assert_allclose(plain["loss"], labelled["loss"], rtol=1e-6)
  np.testing.assert_array_equal(plain["worker"], np.tile(np.arange(W), 3))
  np.testing.assert_array_equal(labelled["worker"], arrivals)
  # Each arrival's loss is its own batch's, at its round's params.
  first_round = [loss_fn(PARAMS, batches[k]) for k in range(W)]
  np.testing.assert_allclose(labelled["loss"][:W], first_round, rtol=1e-6)


@pytest.mark.parametrize("arrivals,match", [
    ([0, 0, 1, 2], "every worker once"),
    ([0, 1, 2, 3, 0, 1], "whole rounds"),
    ([0, 1, 2, 4], r"\[0, 4\)"),
])
def test_sync_arrivals_must_be_rounds(arrivals, match):
  sim = SyncSimulator(loss_fn, optax.sgd(0.1), W)
  state = sim.init(PARAMS)
  with pytest.raises(ValueError, match=match):
    sim.replay(state, make_batches(len(arrivals)), arrivals)
  assert not state.params["w"].is_deleted()


@pytest.mark.parametrize("cls", SIMULATORS)
def test_num_workers_comes_from_the_optimizer_state(cls):
  assert cls(loss_fn, dcasgd_optax.dcasgd(0.1, 3)).init(
      PARAMS).last_pull.shape == (3,)
  assert cls(loss_fn, dcasgd_optax.dcasgd(0.1, 3), num_workers=3).init(
      PARAMS).last_pull.shape == (3,)
  with pytest.raises(ValueError, match="disagrees"):
    cls(loss_fn, dcasgd_optax.dcasgd(0.1, 3), num_workers=4).init(PARAMS)
  with pytest.raises(ValueError, match="`num_workers` is needed"):
    cls(loss_fn, optax.sgd(0.1)).init(PARAMS)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
@pytest.mark.parametrize("cls", SIMULATORS)
def test_bad_num_workers_raise_at_construction(cls, bad):
  with pytest.raises((TypeError, ValueError), match="num_workers"):
    cls(loss_fn, optax.sgd(0.1), bad)


def test_async_tx_is_the_server_transformation():
  """A plain optimizer runs after a λ=0 compensation that keeps the backups."""
  sim = Simulator(loss_fn, optax.sgd(0.1), W)
  opt_state = sim.tx.init(PARAMS)
  grads = jax.grad(loss_fn)(PARAMS, make_batches(1)[0])
  updates, opt_state = sim.tx.update(grads, opt_state, PARAMS, worker=2)
  want, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(PARAMS))
  chex.assert_trees_all_equal(updates, want)
  held = dcasgd_optax.worker_params(opt_state, 2)
  chex.assert_trees_all_equal(held, PARAMS)
