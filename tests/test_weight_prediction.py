"""Weight prediction at pull: Nesterov look-ahead and look_ahead_adam.

The references (tests/reference.py): ``ParameterServer`` with
``look_ahead_horizon`` and ``nesterov=True`` sends w - lr * mu * (mu + ... +
mu^H) * v; ``LookAheadAdamServer`` runs Adam / NAdam after DC-ASGD-c and
sends w - lr * (b1 + ... + b1^H) (times b1 for NAdam) * m_hat / (sqrt(v_hat)
+ eps). Both record what they send as the worker's backup, so the
compensation is taken against the predicted point.
"""

from __future__ import annotations

import hypothesis
from hypothesis import strategies as st
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax

import helpers
import reference


@hypothesis.settings(helpers.SETTINGS, max_examples=5)
@hypothesis.given(
    spec=helpers.pytree_specs(),
    num_workers=st.integers(1, 4),
    data=st.data(),
    lambda_=st.sampled_from([0.0, 0.5]),
    horizon=st.integers(0, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_nesterov_look_ahead_matches_reference_server(
    spec, num_workers, data, lambda_, horizon, seed
):
  order = data.draw(
      st.lists(st.integers(0, num_workers - 1), min_size=1, max_size=10),
      label="worker order",
  )
  rng = np.random.default_rng(seed)
  w0 = helpers.random_tree(rng, spec)
  ref = reference.ParameterServer(
      helpers.leaves_np(w0), num_workers, lambda_, learning_rate=0.05,
      momentum=0.99, nesterov=True, look_ahead_horizon=horizon,
  )
  tx = dcasgd_optax.pull_after_push(optax.chain(
      dcasgd_optax.delay_compensation(num_workers, lambda_),
      dcasgd_optax.look_ahead_momentum(0.05, 0.99, horizon, nesterov=True),
  ))
  helpers.replay_against_reference(tx, ref, w0, order, rng, spec,
                                   check_pulls=True)


@hypothesis.settings(helpers.SETTINGS, max_examples=6)
@hypothesis.given(
    spec=helpers.pytree_specs(),
    num_workers=st.integers(1, 4),
    data=st.data(),
    lambda_=st.sampled_from([0.0, 0.5]),
    horizon=st.integers(0, 4),
    nesterov=st.booleans(),
    scheduled=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_look_ahead_adam_matches_reference_server(
    spec, num_workers, data, lambda_, horizon, nesterov, scheduled, seed
):
  order = data.draw(
      st.lists(st.integers(0, num_workers - 1), min_size=1, max_size=10),
      label="worker order",
  )
  lr = (lambda t: 0.01 / (1.0 + 0.5 * t)) if scheduled else 0.01
  rng = np.random.default_rng(seed)
  w0 = helpers.random_tree(rng, spec)
  ref = reference.LookAheadAdamServer(
      helpers.leaves_np(w0), num_workers, lambda_, learning_rate=lr,
      horizon=horizon, b1=0.9, b2=0.99, eps=1e-3, nesterov=nesterov,
  )
  tx = dcasgd_optax.pull_after_push(optax.chain(
      dcasgd_optax.delay_compensation(num_workers, lambda_),
      dcasgd_optax.look_ahead_adam(lr, horizon, b1=0.9, b2=0.99, eps=1e-3,
                                   nesterov=nesterov),
  ))
  helpers.replay_against_reference(tx, ref, w0, order, rng, spec,
                                   check_pulls=True)


@pytest.mark.parametrize("nesterov", [False, True])
def test_look_ahead_adam_updates_are_optax_adam_exactly(nesterov):
  tx = dcasgd_optax.look_ahead_adam(0.1, horizon=5, nesterov=nesterov)
  want = (optax.nadam if nesterov else optax.adam)(0.1, b1=0.99)
  params = {"a": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  helpers.assert_same_updates_bitwise(tx, want, params)


def test_nesterov_look_ahead_updates_are_optax_sgd_exactly():
  tx = dcasgd_optax.look_ahead_momentum(0.1, 0.99, horizon=5, nesterov=True)
  sgd = optax.sgd(0.1, momentum=0.99, nesterov=True)
  params = {"a": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  helpers.assert_same_updates_bitwise(tx, sgd, params)


def test_the_prediction_is_the_model_after_horizon_zero_gradient_steps():
  """With no new gradient, the optimizer itself walks to the prediction
  (exactly for SGD with Nesterov momentum, whose steps are linear in v)."""
  horizon = 3
  tx = optax.chain(
      dcasgd_optax.delay_compensation(1, 0.0),
      dcasgd_optax.look_ahead_momentum(0.1, 0.9, horizon, nesterov=True))
  params = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(params)
  for seed in range(3):
    updates, state = tx.update(helpers.grads_like(params, seed), state,
                               params, worker=0)
    params = optax.apply_updates(params, updates)
  predicted, _ = dcasgd_optax.pull(state, params, 0)
  walked = params
  for _ in range(horizon):
    updates, state = tx.update({"w": jnp.zeros(2)}, state, walked, worker=0)
    walked = optax.apply_updates(walked, updates)
  np.testing.assert_allclose(predicted["w"], walked["w"], rtol=1e-6)


def test_bad_arguments_are_rejected_naming_them():
  with pytest.raises(ValueError, match="b1"):
    dcasgd_optax.look_ahead_adam(0.1, 2, b1=1.0)
  with pytest.raises(ValueError, match="horizon"):
    dcasgd_optax.look_ahead_adam(0.1, -1)
  with pytest.raises(TypeError, match="nesterov"):
    dcasgd_optax.look_ahead_adam(0.1, 2, nesterov=1)
  with pytest.raises(TypeError, match="nesterov"):
    dcasgd_optax.look_ahead_momentum(0.1, 0.9, 2, nesterov="yes")
