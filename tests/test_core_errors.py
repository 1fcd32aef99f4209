"""Bad input fails loudly, names the argument, and never corrupts state.

A traced out-of-range worker cannot raise inside ``jit``; the library's
documented behaviour then is all-NaN updates and an untouched
DelayCompensationState (``record_pull`` writes nothing), so
``optax.apply_if_finite`` skips the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax

NUM_WORKERS = 3

FACTORIES = {
    "delay_compensation": lambda **kw: dcasgd_optax.delay_compensation(**kw),
    "dcasgd": lambda **kw: dcasgd_optax.dcasgd(0.1, **kw),
}
BUILDERS = {
    "delay_compensation": lambda: dcasgd_optax.delay_compensation(NUM_WORKERS, 0.5),
    "delay_compensation_a": lambda: dcasgd_optax.delay_compensation(
        NUM_WORKERS, 2.0, adaptive=True
    ),
    "dcasgd": lambda: dcasgd_optax.dcasgd(0.1, NUM_WORKERS, momentum=0.9),
    "pull_after_push": lambda: dcasgd_optax.pull_after_push(
        optax.chain(dcasgd_optax.delay_compensation(NUM_WORKERS), optax.adam(0.1))
    ),
}
factories = pytest.mark.parametrize("factory", FACTORIES.values(), ids=FACTORIES)
builders = pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS)


def params_tree():
  return {"w": jnp.arange(4.0).reshape(2, 2), "b": jnp.array([1.0, -1.0])}


def dc_state(opt_state):
  states = [
      s
      for s in jax.tree.leaves(
          opt_state,
          is_leaf=lambda x: isinstance(x, dcasgd_optax.DelayCompensationState),
      )
      if isinstance(s, dcasgd_optax.DelayCompensationState)
  ]
  assert len(states) == 1
  return states[0]


def stale_state(tx, params):
  state = tx.init(params)
  for m in range(NUM_WORKERS):
    state = dcasgd_optax.record_pull(
        state, jax.tree.map(lambda p: p - 0.1 * (m + 1), params), m
    )
  return state


def snapshot(tree):
  return [np.array(x) for x in jax.tree.leaves(tree)]


def assert_unchanged(tree, before):
  after = jax.tree.leaves(tree)
  assert len(after) == len(before)
  for x, y in zip(after, before):
    np.testing.assert_array_equal(np.asarray(x), y)


# --- static arguments, validated when the transformation is built ----------


@factories
@pytest.mark.parametrize(
    "value, error",
    [
        (0, ValueError),
        (-1, ValueError),
        (2.5, TypeError),
        (True, TypeError),
        ("3", TypeError),
        (None, TypeError),
        (jnp.array(3), TypeError),
    ],
)
def test_num_workers_must_be_a_positive_int(factory, value, error):
  with pytest.raises(error, match="`num_workers`"):
    factory(num_workers=value)


@factories
@pytest.mark.parametrize("value", [-0.1, -1, float("nan"), float("inf"), jnp.array(-2.0)])
def test_lambda_must_be_non_negative_and_finite(factory, value):
  with pytest.raises(ValueError, match="`lambda_`"):
    factory(num_workers=2, lambda_=value)


@factories
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan")])
def test_decay_must_lie_in_zero_one(factory, value):
  with pytest.raises(ValueError, match=r"`decay` must lie in \[0, 1\)"):
    factory(num_workers=2, adaptive=True, decay=value)


@factories
@pytest.mark.parametrize("value", [0.0, -1e-7, float("nan")])
def test_eps_must_be_positive(factory, value):
  with pytest.raises(ValueError, match=r"`eps` must lie in \(0"):
    factory(num_workers=2, adaptive=True, eps=value)


@factories
def test_boundary_values_are_accepted(factory):
  tx = factory(num_workers=1, lambda_=0.0, adaptive=True, decay=0.0, eps=1e-30)
  updates, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}),
                         {"w": jnp.ones(2)}, worker=0)
  assert np.all(np.isfinite(np.asarray(updates["w"])))


@factories
def test_non_scalar_or_non_numeric_hyperparameters_are_rejected(factory):
  with pytest.raises(ValueError, match="`lambda_` must be a scalar"):
    factory(num_workers=2, lambda_=jnp.ones(2))
  with pytest.raises(TypeError, match="`lambda_` must be a real number"):
    factory(num_workers=2, lambda_="0.1")


@factories
def test_backup_dtype_must_be_floating(factory):
  with pytest.raises(TypeError, match="`backup_dtype`"):
    factory(num_workers=2, backup_dtype=jnp.int32)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.5), "momentum"),
        (dict(weight_decay=-1e-4), "weight_decay"),
        (dict(learning_rate=-0.1), "learning_rate"),
    ],
)
def test_dcasgd_rejects_bad_sgd_arguments(kwargs, name):
  kwargs = {"learning_rate": 0.1, **kwargs}
  with pytest.raises(ValueError, match=f"`{name}`"):
    dcasgd_optax.dcasgd(num_workers=2, **kwargs)


# --- per-call arguments ---------------------------------------------------


@builders
def test_missing_worker_is_a_type_error_naming_worker(build):
  tx, params = build(), params_tree()
  state = tx.init(params)
  with pytest.raises(TypeError, match="`worker`"):
    tx.update(params, state, params)
  with pytest.raises(TypeError, match="`worker`"):
    dcasgd_optax.record_pull(state, params, None)


@builders
@pytest.mark.parametrize(
    "worker, error",
    [(1.0, TypeError), (True, TypeError), (jnp.array(1.0), TypeError),
     (jnp.array([0, 1]), ValueError), ("1", TypeError)],
)
def test_worker_must_be_an_integer_scalar(build, worker, error):
  tx, params = build(), params_tree()
  state = tx.init(params)
  with pytest.raises(error, match="`worker`"):
    tx.update(params, state, params, worker=worker)
  with pytest.raises(error, match="`worker`"):
    dcasgd_optax.record_pull(state, params, worker)


@builders
@pytest.mark.parametrize(
    "worker", [NUM_WORKERS, -1, 100, jnp.array(NUM_WORKERS), np.int32(-1)],
    ids=["int_n", "int_-1", "int_100", "jnp_n", "np_-1"],
)
def test_concrete_out_of_range_worker_raises(build, worker):
  tx, params = build(), params_tree()
  state = tx.init(params)
  match = rf"`worker` must be in \[0, {NUM_WORKERS}\)"
  with pytest.raises(ValueError, match=match):
    tx.update(params, state, params, worker=worker)
  with pytest.raises(ValueError, match=match):
    dcasgd_optax.record_pull(state, params, worker)
  with pytest.raises(ValueError, match=match):
    dcasgd_optax.worker_params(state, worker)


@builders
def test_params_none_is_rejected_naming_params(build):
  tx, params = build(), params_tree()
  with pytest.raises(ValueError, match="`params` is None"):
    tx.init(None)
  state = tx.init(params)
  with pytest.raises(ValueError, match="`params` is None"):
    tx.update(params, state, None, worker=0)
  with pytest.raises(ValueError, match="`params` is None"):
    dcasgd_optax.record_pull(state, None, 0)


@builders
@pytest.mark.parametrize(
    "bad, match",
    [
        ({"w": jnp.zeros((2, 2))}, "different tree structure"),
        ({"w": jnp.zeros((2, 2)), "b": jnp.zeros(2), "c": jnp.zeros(1)},
         "different tree structure"),
        ([jnp.zeros(2), jnp.zeros((2, 2))], "different tree structure"),
        ({"w": jnp.zeros((2, 3)), "b": jnp.zeros(2)}, r"leaf \['w'\] has shape"),
        ({"w": jnp.zeros((2, 2)), "b": jnp.zeros(())}, r"leaf \['b'\] has shape"),
    ],
    ids=["missing_leaf", "extra_leaf", "list", "kernel_shape", "bias_shape"],
)
def test_params_must_match_the_state(build, bad, match):
  tx, params = build(), params_tree()
  state = tx.init(params)
  with pytest.raises(ValueError, match=f"`params`.*{match}"):
    tx.update(params, state, bad, worker=0)
  with pytest.raises(ValueError, match=f"`params`.*{match}"):
    dcasgd_optax.record_pull(state, bad, 0)


@builders
def test_updates_must_match_the_state(build):
  tx, params = build(), params_tree()
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"`updates` leaf \['w'\] has shape"):
    tx.update({"w": jnp.zeros(4), "b": jnp.zeros(2)}, state, params, worker=0)


def test_state_from_a_different_num_workers_is_rejected():
  params = params_tree()
  state = dcasgd_optax.delay_compensation(4).init(params)
  tx = dcasgd_optax.delay_compensation(NUM_WORKERS)
  with pytest.raises(ValueError, match="num_workers=3"):
    tx.update(params, state, params, worker=0)


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


# --- traced out-of-range workers: NaN updates, untouched state ------------


@builders
@pytest.mark.parametrize("worker", [NUM_WORKERS, -1, 2**30])
def test_traced_out_of_range_worker_gives_nan_updates_and_leaves_backups(build, worker):
  tx, params = build(), params_tree()
  state = stale_state(tx, params)
  before = snapshot(dc_state(state))
  step = jax.jit(lambda g, s, p, m: tx.update(g, s, p, worker=m))
  updates, new_state = step(params, state, params, worker)
  for u in jax.tree.leaves(updates):
    assert np.all(np.isnan(np.asarray(u)))
  # No worker's backup moved, and DC-ASGD-a's mean square did not absorb the
  # gradient.
  assert_unchanged(dc_state(new_state), before)
  # The same jitted step with a valid id is finite (the NaN is the id's doing).
  ok, _ = step(params, state, params, 1)
  assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(ok))


@builders
@pytest.mark.parametrize("worker", [NUM_WORKERS, -1])
def test_traced_out_of_range_record_pull_writes_nothing(build, worker):
  tx, params = build(), params_tree()
  state = stale_state(tx, params)
  before = snapshot(state)
  pulled = jax.tree.map(lambda p: p + 100.0, params)
  new_state = jax.jit(dcasgd_optax.record_pull)(state, pulled, worker)
  assert_unchanged(new_state, before)
  # The same jitted call with a valid id does write (the check can fail).
  written = jax.jit(dcasgd_optax.record_pull)(state, pulled, NUM_WORKERS - 1)
  held = dcasgd_optax.worker_params(written, NUM_WORKERS - 1)
  np.testing.assert_array_equal(held["w"], pulled["w"])


# optax.apply_if_finite tests the updates it *receives*, so it goes after
# delay_compensation in the chain, where the NaN updates arrive.
GUARDED = {
    "delay_compensation": lambda: optax.chain(
        dcasgd_optax.delay_compensation(NUM_WORKERS, 0.5),
        optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), 3),
    ),
    "delay_compensation_a": lambda: optax.chain(
        dcasgd_optax.delay_compensation(NUM_WORKERS, 2.0, adaptive=True),
        optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), 3),
    ),
    "pull_after_push": lambda: dcasgd_optax.pull_after_push(
        optax.chain(
            dcasgd_optax.delay_compensation(NUM_WORKERS),
            optax.apply_if_finite(optax.adam(0.1), 3),
        )
    ),
}


@pytest.mark.parametrize("build", GUARDED.values(), ids=GUARDED)
def test_apply_if_finite_after_compensation_skips_a_traced_out_of_range_worker(build):
  tx, params = build(), params_tree()
  state = stale_state(tx, params)
  guard = lambda s: s[1]  # the ApplyIfFiniteState

  @jax.jit
  def step(params, state, worker):
    updates, state = tx.update(params, state, params, worker=worker)
    return optax.apply_updates(params, updates), state

  new_params, new_state = step(params, state, NUM_WORKERS + 1)
  assert_unchanged(new_params, snapshot(params))
  assert int(guard(new_state).notfinite_count) == 1
  # Everything but the guard's own counters is as it was: backups, mean
  # square and the inner optimizer's moments.
  restore = lambda s: (s[0], guard(s).inner_state) + tuple(s[2:])
  assert_unchanged(restore(new_state), snapshot(restore(state)))
  moved, good_state = step(params, new_state, 0)
  assert int(guard(good_state).notfinite_count) == 0
  assert not np.array_equal(np.asarray(moved["w"]), np.asarray(params["w"]))


# --- errors come before any state change -----------------------------------


@builders
@pytest.mark.parametrize(
    "bad_call",
    ["params_shape", "params_none", "missing_worker", "worker_out_of_range"],
)
def test_errors_are_raised_before_a_donated_state_is_consumed(build, bad_call):
  """The checks run at trace time, so a failing donated step donates nothing."""
  tx, params = build(), params_tree()
  state = stale_state(tx, params)
  before = snapshot(state)
  bad_params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  call = {
      "params_shape": lambda g, s: tx.update(g, s, bad_params, worker=0),
      "params_none": lambda g, s: tx.update(g, s, None, worker=0),
      "missing_worker": lambda g, s: tx.update(g, s, params),
      "worker_out_of_range": lambda g, s: tx.update(g, s, params, worker=NUM_WORKERS),
  }[bad_call]
  step = jax.jit(call, donate_argnums=1)
  with pytest.raises((TypeError, ValueError)):
    step(params, state)
  assert not any(x.is_deleted() for x in jax.tree.leaves(state))
  assert_unchanged(state, before)
  # The same donated step with good arguments does consume the state.
  good = jax.jit(lambda g, s: tx.update(g, s, params, worker=0), donate_argnums=1)
  good(params, state)
  assert all(x.is_deleted() for x in jax.tree.leaves(dc_state(state).backups))


@pytest.mark.parametrize("name", ["lambda_", "decay", "eps"])
def test_schedule_for_a_numeric_hyperparameter_is_rejected_by_name(name):
  with pytest.raises(TypeError, match=f"`{name}` must be a number, not a schedule"):
    dcasgd_optax.delay_compensation(NUM_WORKERS, adaptive=True, **{name: lambda step: 0.1})


def test_default_lambda_follows_the_variant():
  params = {"w": jnp.array([1.0, 2.0])}
  grads = {"w": jnp.array([0.5, -1.0])}
  moved = {"w": jnp.array([2.0, 0.0])}
  for adaptive, lam in ((False, 0.04), (True, 2.0)):
    tx = dcasgd_optax.delay_compensation(2, adaptive=adaptive)
    explicit = dcasgd_optax.delay_compensation(2, lam, adaptive=adaptive)
    got, _ = tx.update(grads, tx.init(params), moved, worker=0)
    want, _ = explicit.update(grads, explicit.init(params), moved, worker=0)
    np.testing.assert_array_equal(got["w"], want["w"])
    assert not np.array_equal(got["w"], grads["w"])


def test_nesterov_without_momentum_is_rejected():
  with pytest.raises(ValueError, match="nesterov"):
    dcasgd_optax.dcasgd(0.1, NUM_WORKERS, nesterov=True)


def test_negative_concrete_staleness_is_rejected():
  tx = dcasgd_optax.scale_by_inverse_staleness()
  with pytest.raises(ValueError, match="staleness"):
    tx.update({"w": jnp.ones(2)}, tx.init(None), staleness=-1)


def test_pull_after_push_without_delay_compensation_fails_at_init():
  tx = dcasgd_optax.pull_after_push(optax.sgd(0.1))
  with pytest.raises(ValueError, match="delay_compensation"):
    tx.init({"w": jnp.zeros(2)})
