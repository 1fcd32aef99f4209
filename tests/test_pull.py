"""record_pull, worker_params and the pull hook: what they refuse, what a pull
records, its cost.

``pull`` is the server's side of a pull for every driver (simulator,
``pull_after_push``, Ray); its contract is pinned against the lower-level
``record_pull`` / ``worker_params`` and a hand-written one-worker-at-a-time
server. A traced out-of-range worker cannot raise inside ``jit``:
``record_pull`` then writes nothing. With the state donated, a pull reads the
new params and read-modify-writes one backup, whatever the number of workers
(XLA's own accounting, no timing).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax

from helpers import FEW_WORKERS
from helpers import MANY_WORKERS
from helpers import NUM_WORKERS
from helpers import WIDE_MODEL_BYTES
from helpers import backup_copies
from helpers import builders
from helpers import cost_analysis
from helpers import params_tree
from helpers import shifted
from helpers import snapshot
from helpers import stale_state
from helpers import wide_params


def test_pull_helpers_need_a_delay_compensation_state():
  params = params_tree()
  state = optax.sgd(0.1).init(params)
  with pytest.raises(ValueError, match="no DelayCompensationState"):
    dcasgd_optax.record_pull(state, params, 0)
  with pytest.raises(ValueError, match="no DelayCompensationState"):
    dcasgd_optax.worker_params(state, 0)
  two = dcasgd_optax.delay_compensation(2).init(params)
  with pytest.raises(ValueError, match="exactly one"):
    dcasgd_optax.worker_params((two, two), 0)


@builders
@pytest.mark.parametrize("worker", [NUM_WORKERS, -1])
def test_traced_out_of_range_record_pull_writes_nothing(build, worker):
  tx, params = build(), params_tree()
  state = stale_state(tx, params, first=1)
  before = snapshot(state)
  pulled = jax.tree.map(lambda p: p + 100.0, params)
  new_state = jax.jit(dcasgd_optax.record_pull)(state, pulled, worker)
  chex.assert_trees_all_equal(new_state, before)
  # The same jitted call with a valid id does write (the check can fail).
  written = jax.jit(dcasgd_optax.record_pull)(state, pulled, NUM_WORKERS - 1)
  held = dcasgd_optax.worker_params(written, NUM_WORKERS - 1)
  np.testing.assert_array_equal(held["w"], pulled["w"])


def test_donated_record_pull_alone_writes_one_slice():
  def compile_pull(num_workers):
    state = dcasgd_optax.delay_compensation(num_workers).init(wide_params())
    jitted = jax.jit(dcasgd_optax.record_pull, donate_argnums=0)
    compiled = jitted.lower(state, wide_params(), jnp.int32(0)).compile()
    return compiled, cost_analysis(compiled)["bytes accessed"]

  (_, small_bytes), (large, large_bytes) = map(
      compile_pull, (FEW_WORKERS, MANY_WORKERS)
  )
  assert abs(large_bytes - small_bytes) < 0.1 * WIDE_MODEL_BYTES
  # Reading the new params, then one slice read-modify-written: about three
  # models' worth, against MANY_WORKERS models for a copy of the backups.
  assert large_bytes < 4 * WIDE_MODEL_BYTES
  assert backup_copies(large, MANY_WORKERS) == []


PARAMS = {
    "dense": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)},
    "scale": jnp.array(2.0),
}


def nested_optimizers():
  """Optimizers whose DelayCompensationState sits at different depths."""
  dc = dcasgd_optax.delay_compensation(3, 0.5)
  return {
      "alone": dc,
      "chain": optax.chain(dc, optax.sgd(0.1)),
      "named_chain": optax.named_chain(("dc", dc), ("sgd", optax.adam(0.1))),
      "inject": optax.inject_hyperparams(
          dcasgd_optax.dcasgd, static_args=("num_workers",))(
              learning_rate=0.1, num_workers=3),
      "dcasgd": dcasgd_optax.dcasgd(0.1, 3, momentum=0.9),
  }


@pytest.mark.parametrize("name", sorted(nested_optimizers()))
@pytest.mark.parametrize("use_jit", [False, True])
def test_pull_sends_params_and_records_them_as_the_backup(name, use_jit):
  tx = nested_optimizers()[name]
  state = tx.init(PARAMS)
  new = shifted(PARAMS, 0.5)
  pull = jax.jit(dcasgd_optax.pull) if use_jit else dcasgd_optax.pull
  pulled, state = pull(state, new, 1)
  chex.assert_trees_all_equal(pulled, new)
  chex.assert_trees_all_equal(dcasgd_optax.worker_params(state, 1), new)
  # The other workers still hold the initial params.
  for m in (0, 2):
    chex.assert_trees_all_equal(dcasgd_optax.worker_params(state, m), PARAMS)
  # It is the same write as record_pull.
  recorded = dcasgd_optax.record_pull(tx.init(PARAMS), new, 1)
  chex.assert_trees_all_equal(state, recorded)


def test_traced_out_of_range_pull_sends_nan_and_records_nothing():
  tx = dcasgd_optax.delay_compensation(3, 0.5)
  state = tx.init(PARAMS)
  pull = jax.jit(dcasgd_optax.pull)
  for bad in (-1, 3):
    pulled, after = pull(state, shifted(PARAMS, 1.0), jnp.int32(bad))
    assert all(np.isnan(x).all() for x in jax.tree.leaves(pulled))
    chex.assert_trees_all_equal(after, state)
  pulled, after = pull(state, shifted(PARAMS, 1.0), jnp.int32(2))
  chex.assert_trees_all_equal(pulled, shifted(PARAMS, 1.0))


def test_concrete_out_of_range_pull_raises_naming_worker():
  state = dcasgd_optax.delay_compensation(3).init(PARAMS)
  with pytest.raises(ValueError, match="`worker` must be in"):
    dcasgd_optax.pull(state, PARAMS, 3)


def test_pull_needs_a_delay_compensation_state():
  state = optax.sgd(0.1).init(PARAMS)
  with pytest.raises(ValueError, match="holds no DelayCompensationState"):
    dcasgd_optax.pull(state, PARAMS, 0)


def test_pull_after_push_and_dcasgd_are_marked_as_pulling():
  inner = optax.chain(dcasgd_optax.delay_compensation(2), optax.sgd(0.1))
  assert isinstance(dcasgd_optax.pull_after_push(inner),
                    dcasgd_optax.PullAfterPush)
  assert isinstance(dcasgd_optax.dcasgd(0.1, 2), dcasgd_optax.PullAfterPush)
  assert not isinstance(inner, dcasgd_optax.PullAfterPush)
  # The marker is a plain optax transformation otherwise.
  tx = dcasgd_optax.dcasgd(0.1, 2)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  assert optax.with_extra_args_support(tx) is tx


def test_pull_after_push_equals_update_then_pull_by_hand():
  inner = optax.chain(dcasgd_optax.delay_compensation(3, 0.5), optax.sgd(0.1))
  tx = dcasgd_optax.pull_after_push(inner)
  rng = np.random.default_rng(0)
  params, state = PARAMS, tx.init(PARAMS)
  ref_params, ref_state = PARAMS, inner.init(PARAMS)
  step = jax.jit(lambda g, s, p, m: tx.update(g, s, p, worker=m))
  for m in (0, 2, 2, 1, 0):
    grads = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
    updates, state = step(grads, state, params, m)
    params = optax.apply_updates(params, updates)
    ref_updates, ref_state = inner.update(
        grads, ref_state, ref_params, worker=m
    )
    ref_params = optax.apply_updates(ref_params, ref_updates)
    _, ref_state = dcasgd_optax.pull(ref_state, ref_params, m)
    chex.assert_trees_all_close(params, ref_params, rtol=1e-6)
    assert isinstance(state, dcasgd_optax.PullAfterPushState)
    chex.assert_trees_all_close(state.inner_state, ref_state, rtol=1e-6)
    chex.assert_trees_all_close(dcasgd_optax.worker_params(state, m), params,
                                rtol=1e-6)


@pytest.mark.parametrize("bad", [-1, 3, 2**30])
def test_traced_out_of_range_id_is_nan_everywhere_and_writes_nothing(bad):
  """update, pull and worker_params agree: NaN out, state untouched."""
  tx = dcasgd_optax.dcasgd(0.1, 3, momentum=0.9)
  state = tx.init(PARAMS)
  _, state = dcasgd_optax.pull(state, shifted(PARAMS, 1.0), 2)
  worker = jnp.int32(bad)
  updates, after_update = jax.jit(
      lambda s, m: tx.update(PARAMS, s, PARAMS, worker=m))(state, worker)
  pulled, after_pull = jax.jit(dcasgd_optax.pull)(state, PARAMS, worker)
  held = jax.jit(dcasgd_optax.worker_params)(state, worker)
  for tree in (updates, pulled, held):
    assert all(np.isnan(x).all() for x in jax.tree.leaves(tree))
  # dcasgd's state wraps a chain's: the DelayCompensationState comes first.
  assert isinstance(state.inner_state[0], dcasgd_optax.DelayCompensationState)
  for after in (after_update, after_pull):
    chex.assert_trees_all_equal(after.inner_state[0], state.inner_state[0])
  # A valid traced id reads its own backup (never a clamped neighbour's).
  chex.assert_trees_all_equal(
      jax.jit(dcasgd_optax.worker_params)(state, jnp.int32(2)),
      shifted(PARAMS, 1.0))


def test_the_state_says_whether_its_update_pulls():
  """A driver reads it from the state, where wrappers keep it (abstract
  states and traced ones answer the same)."""
  from dcasgd_optax import extend
  dc = lambda: dcasgd_optax.delay_compensation(2, 0.5)
  pulling = lambda: dcasgd_optax.dcasgd(0.1, 2)
  cases = {
      "dcasgd": (pulling(), True),
      "pull_after_push": (dcasgd_optax.pull_after_push(
          optax.chain(dc(), optax.sgd(0.1))), True),
      "inject_hyperparams": (optax.inject_hyperparams(
          dcasgd_optax.dcasgd, static_args=("num_workers",))(
              learning_rate=0.1, num_workers=2), True),
      "chain_ending_in_it": (optax.chain(optax.clip(1.0), pulling()), True),
      "chain_after_it": (optax.chain(pulling(), optax.scale(0.5)), False),
      "apply_if_finite": (optax.apply_if_finite(pulling(), 2), False),
      "composed": (optax.chain(dc(), optax.sgd(0.1)), False),
  }
  for name, (tx, pulls) in cases.items():
    state = jax.eval_shape(tx.init, PARAMS)
    assert extend.pulls_in_update(state) is pulls, name
    traced = jax.jit(lambda s: s)(tx.init(PARAMS))
    assert extend.pulls_in_update(traced) is pulls, name
