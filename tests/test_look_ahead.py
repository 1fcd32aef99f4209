"""look_ahead_momentum and dana_dcasgd: the pull sends and records a prediction.

The reference (tests/reference.py, ``ParameterServer`` with
``look_ahead_horizon``) sends w - lr * (mu + ... + mu^H) * v on every pull
and compensates against exactly that point.
"""

from __future__ import annotations

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax

import helpers
import reference


@hypothesis.settings(helpers.SETTINGS, max_examples=6)
@hypothesis.given(
    spec=helpers.pytree_specs(),
    num_workers=st.integers(1, 4),
    data=st.data(),
    adaptive=st.booleans(),
    lambda_=st.sampled_from([0.0, 0.5]),
    horizon=st.integers(0, 4),
    scheduled=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_dana_dc_matches_reference_server(
    spec, num_workers, data, adaptive, lambda_, horizon, scheduled, seed
):
  order = data.draw(
      st.lists(st.integers(0, num_workers - 1), min_size=1, max_size=12),
      label="worker order",
  )
  lr = (lambda t: 0.05 / (1.0 + 0.5 * t)) if scheduled else 0.05
  rng = np.random.default_rng(seed)
  w0 = helpers.random_tree(rng, spec)
  ref = reference.ParameterServer(
      helpers.leaves_np(w0), num_workers, lambda_, adaptive=adaptive,
      learning_rate=lr, momentum=0.9, look_ahead_horizon=horizon,
  )
  tx = dcasgd_optax.dana_dcasgd(lr, num_workers, momentum=0.9, horizon=horizon,
                            lambda_=lambda_, adaptive=adaptive)
  helpers.replay_against_reference(tx, ref, w0, order, rng, spec,
                                   check_pulls=True)


def test_updates_are_heavy_ball_sgd_exactly():
  tx = dcasgd_optax.look_ahead_momentum(0.1, 0.9, horizon=5)
  sgd = optax.sgd(0.1, momentum=0.9)
  params = {"a": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  helpers.assert_same_updates_bitwise(tx, sgd, params)


def test_user_pulls_in_a_chain_go_through_the_look_ahead():
  tx = optax.chain(dcasgd_optax.delay_compensation(2, 0.5),
                   dcasgd_optax.look_ahead_momentum(0.1, 0.5, horizon=3))
  params = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.array([1.0, 2.0])}, state, params,
                             worker=1)
  params = optax.apply_updates(params, updates)
  pulled, state = jax.jit(dcasgd_optax.pull)(state, params, 0)
  # v = g after one update; the look-ahead is 0.1 * (0.5 + 0.25 + 0.125) * v.
  want = params["w"] - 0.1 * 0.875 * jnp.array([1.0, 2.0])
  np.testing.assert_allclose(pulled["w"], want, rtol=1e-6)
  np.testing.assert_allclose(
      dcasgd_optax.worker_params(state, 0)["w"], want, rtol=1e-6)
  # The next compensation measures the distance from that very point.
  g = {"w": jnp.array([2.0, 1.0])}
  dc_only = dcasgd_optax.delay_compensation(2, 0.5)
  compensated, _ = dc_only.update(g, state[0], params, worker=0)
  np.testing.assert_allclose(
      compensated["w"], g["w"] + 0.5 * g["w"] ** 2 * (params["w"] - want),
      rtol=1e-5)


def test_horizon_zero_sends_the_params_themselves():
  tx = dcasgd_optax.dana_dcasgd(0.1, 2, horizon=0)
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.ones(2)}, state, params, worker=0)
  np.testing.assert_allclose(
      dcasgd_optax.worker_params(state, 0)["w"],
      optax.apply_updates(params, updates)["w"])


@pytest.mark.parametrize("momentum", [None, 0.0, 1.0, -0.5])
def test_a_look_ahead_needs_a_momentum_buffer(momentum):
  with pytest.raises(ValueError, match="`momentum`"):
    dcasgd_optax.dana_dcasgd(0.1, 2, momentum=momentum)
  if momentum is not None:
    with pytest.raises(ValueError, match="`momentum`"):
      dcasgd_optax.look_ahead_momentum(0.1, momentum, horizon=1)


def test_negative_horizon_is_rejected_naming_it():
  with pytest.raises(ValueError, match="`horizon`"):
    dcasgd_optax.look_ahead_momentum(0.1, 0.9, horizon=-1)


def test_two_look_aheads_in_one_state_are_rejected_at_the_pull():
  look = dcasgd_optax.look_ahead_momentum(0.1, 0.9, horizon=1)
  tx = optax.chain(dcasgd_optax.delay_compensation(2), look, look)
  state = tx.init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="LookAheadStates"):
    dcasgd_optax.pull(state, {"w": jnp.ones(2)}, 0)


def test_a_fractional_horizon_takes_the_closed_form_between_its_neighbours():
  g = {"w": jnp.array([1.0, -2.0])}

  def pulled_at(horizon):
    tx = optax.chain(dcasgd_optax.delay_compensation(2, 0.0),
                     dcasgd_optax.look_ahead_momentum(0.1, 0.5, horizon))
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    updates, state = tx.update(g, state, params, worker=0)
    params = optax.apply_updates(params, updates)
    return np.asarray(dcasgd_optax.pull(state, params, 1)[0]["w"])

  one, half, two = pulled_at(1), pulled_at(1.5), pulled_at(2)
  # w = -0.1 g, v = g; the look-ahead is 0.1 * 0.5 (1 - 0.5^H) / 0.5 * v.
  np.testing.assert_allclose(
      half, -0.1 * g["w"] - 0.1 * (1 - 0.5**1.5) * g["w"], rtol=1e-6)
  assert np.all((np.abs(one) < np.abs(half)) & (np.abs(half) < np.abs(two)))
