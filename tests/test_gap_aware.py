"""gap_aware and gap_aware_asgd against a NumPy transcription of Gap-Aware.

The reference (tests/reference.py, ``GapAwareServer``) divides each
coordinate of a stale gradient by 1 + |w - backup[m]| / C with C the step
size times the bias-corrected RMS of the gradients (Barkai et al. 2019).
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
    momentum=st.sampled_from([None, 0.5, 0.9]),
    decay=st.sampled_from([0.0, 0.9, 0.999]),
    seed=st.integers(0, 2**31 - 1),
)
def test_gap_aware_sgd_matches_reference_server(
    spec, num_workers, data, momentum, decay, seed
):
  order = data.draw(
      st.lists(st.integers(0, num_workers - 1), min_size=1, max_size=12),
      label="worker order",
  )
  lr = 0.05
  eta_max = lr / (1.0 - (momentum or 0.0))
  rng = np.random.default_rng(seed)
  w0 = helpers.random_tree(rng, spec)
  ref = reference.GapAwareServer(
      helpers.leaves_np(w0), num_workers, eta_max, decay=decay,
      learning_rate=lr, momentum=momentum,
  )
  tx = dcasgd_optax.gap_aware_asgd(lr, num_workers, momentum=momentum,
                                  decay=decay)
  _, state = helpers.replay_against_reference(tx, ref, w0, order, rng, spec)
  for m in range(num_workers):
    helpers.assert_close_to_reference(
        dcasgd_optax.worker_params(state, m), ref.backup[m], f"backup {m}")


def test_fresh_gradient_passes_unchanged_and_a_gap_divides_it():
  tx = dcasgd_optax.gap_aware(2, step_size=0.5, decay=0.0)
  params = {"w": jnp.array([1.0, 1.0, 1.0])}
  state = tx.init(params)
  g = {"w": jnp.array([2.0, -1.0, 0.5])}
  fresh, _ = tx.update(g, state, params, worker=0)
  np.testing.assert_array_equal(fresh["w"], g["w"])
  # Worker 1 holds a model one and two typical steps (C = 0.5 |g|) behind.
  state = dcasgd_optax.record_pull(
      state, {"w": jnp.array([0.0, 1.5, 1.0])}, 1)
  stale, _ = tx.update(g, state, params, worker=1)
  gap = np.abs([1.0, -0.5, 0.0]) / (0.5 * np.abs([2.0, -1.0, 0.5]))
  np.testing.assert_allclose(stale["w"], g["w"] / (1 + gap), rtol=1e-6)


def test_shares_the_backups_state_with_the_pull_helpers_and_simulator():
  tx = dcasgd_optax.gap_aware_asgd(0.1, 3)
  state = tx.init({"w": jnp.zeros(2)})
  (dc,) = helpers.find_dc_states(state)  # one backups-holding state, no copy
  assert jax.tree.leaves(dc.backups)[0].shape == (3, 2)
  pulled, state = dcasgd_optax.pull(state, {"w": jnp.ones(2)}, 2)
  np.testing.assert_array_equal(
      dcasgd_optax.worker_params(state, 2)["w"], pulled["w"])


def test_traced_out_of_range_worker_gives_nan_and_keeps_the_state():
  tx = dcasgd_optax.gap_aware(2, step_size=0.1)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  updates, after = jax.jit(lambda s, m: tx.update(params, s, params, worker=m))(
      state, jnp.int32(2))
  assert np.isnan(updates["w"]).all()
  helpers.assert_bitwise_equal(after, state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(step_size=0.0), "`step_size`"),
        (dict(step_size=-1.0), "`step_size`"),
        (dict(step_size=0.1, decay=1.0), "`decay`"),
        (dict(step_size=0.1, eps=0.0), "`eps`"),
    ],
)
def test_bad_gap_aware_arguments_name_themselves(kwargs, match):
  with pytest.raises(ValueError, match=match):
    dcasgd_optax.gap_aware(2, **kwargs)


def test_gap_aware_sgd_with_a_schedule_needs_a_step_size():
  schedule = optax.linear_schedule(0.0, 0.1, 10)
  with pytest.raises(ValueError, match="`step_size` is required"):
    dcasgd_optax.gap_aware_asgd(schedule, 2)
  dcasgd_optax.gap_aware_asgd(schedule, 2, step_size=0.1)  # accepted
