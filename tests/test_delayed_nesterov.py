"""delayed_nesterov and delayed_nesterov_dcasgd against Liu et al.'s
Algorithm 3.

The reference (tests/reference.py, ``ParameterServer`` with
``delayed_nesterov_period``) transcribes the paper's Delayed Nesterov update.
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


@hypothesis.settings(helpers.SETTINGS, max_examples=6)
@hypothesis.given(
    spec=helpers.pytree_specs(),
    num_workers=st.integers(1, 4),
    data=st.data(),
    period=st.integers(1, 4),
    activation=st.sampled_from([0.0, 1.0]),  # as a fraction of 1 / period
    lambda_=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_delayed_nesterov_dcasgd_matches_reference_server(
    spec, num_workers, data, period, activation, lambda_, seed
):
  order = data.draw(
      st.lists(st.integers(0, num_workers - 1), min_size=1, max_size=12),
      label="worker order",
  )
  lr, beta, c = 0.05, 0.9, activation / period
  rng = np.random.default_rng(seed)
  w0 = helpers.random_tree(rng, spec)
  ref = reference.ParameterServer(
      helpers.leaves_np(w0), num_workers, lambda_, adaptive=False,
      learning_rate=lr, momentum=beta, delayed_nesterov_period=period,
      momentum_activation=c,
  )
  tx = dcasgd_optax.delayed_nesterov_dcasgd(
      lr, num_workers, period=period, momentum=beta, momentum_activation=c,
      lambda_=lambda_, adaptive=False,
  )
  helpers.replay_against_reference(tx, ref, w0, order, rng, spec)


def test_period_one_is_nesterov_sgd_exactly():
  tx = dcasgd_optax.delayed_nesterov(0.1, 1, momentum=0.9)
  nesterov = optax.sgd(0.1, momentum=0.9, nesterov=True)
  params = {"a": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  helpers.assert_same_updates_bitwise(tx, nesterov, params)


def test_momentum_moves_the_model_only_at_the_end_of_a_period():
  tx = dcasgd_optax.delayed_nesterov(1.0, 3, momentum=0.5)
  state = tx.init({"w": jnp.zeros(1)})
  g = {"w": jnp.ones(1)}
  steps = []
  for _ in range(6):
    u, state = tx.update(g, state)
    steps.append(float(u["w"][0]))
  # Plain steps of -g/3, then -(0.5 m + g/3) with m = 1, then m = 1.5.
  np.testing.assert_allclose(
      steps, [-1 / 3, -1 / 3, -(0.5 + 1 / 3), -1 / 3, -1 / 3, -(0.75 + 1 / 3)],
      rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(period=0), ValueError, "`period`"),
        (dict(period=2.5), TypeError, "`period`"),
        (dict(period=2, momentum=1.0), ValueError, "`momentum`"),
        (dict(period=2, momentum_activation=0.6), ValueError,
         "`momentum_activation`"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, match):
  with pytest.raises(error, match=match):
    dcasgd_optax.delayed_nesterov(0.1, **kwargs)
  with pytest.raises(error, match=match):
    dcasgd_optax.delayed_nesterov_dcasgd(0.1, 2, **kwargs)
