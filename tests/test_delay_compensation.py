"""delay_compensation: the paper's formula, exact identities, bad input, memory.

The NumPy reference server (tests/reference.py) is written from the paper
alone; the library runs under ``jit`` over random pytrees, random worker
orders and random gradients (float32 in the library, float64 in the
reference). Bad input fails loudly, names the argument, and never corrupts
state: a traced out-of-range worker cannot raise inside ``jit``, so the
documented behaviour then is all-NaN updates and an untouched
DelayCompensationState, which ``optax.apply_if_finite`` skips. Finally the
backups are updated in place: XLA's own accounting of the compiled step must
not grow with ``num_workers`` (no timing).
"""

from __future__ import annotations

import operator

import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax

from helpers import FEW_WORKERS
from helpers import MANY_WORKERS
from helpers import NUM_WORKERS
from helpers import SETTINGS
from helpers import WIDE_MODEL_BYTES
from helpers import assert_bitwise_equal
from helpers import assert_close_to_reference
from helpers import backup_copies
from helpers import builders
from helpers import cost_analysis
from helpers import dc_state
from helpers import leaves_np
from helpers import params_tree
from helpers import pytree_specs
from helpers import random_tree
from helpers import snapshot
from helpers import stale_state
from helpers import update_step
from helpers import wide_params
import reference  # tests/reference.py (pytest puts tests/ on sys.path)

FACTORIES = {
    "delay_compensation": lambda **kw: dcasgd_optax.delay_compensation(**kw),
    "dcasgd": lambda **kw: dcasgd_optax.dcasgd(0.1, **kw),
}
factories = pytest.mark.parametrize(
    "factory", FACTORIES.values(), ids=FACTORIES
)

# --- against the reference server and exact identities ---------------------


@st.composite
def user_pull_runs(draw):
  num_workers = draw(st.integers(1, 4))
  events = draw(
      st.lists(
          st.tuples(
              st.sampled_from(["pull", "push", "push"]),
              st.integers(0, num_workers - 1),
          ),
          min_size=1,
          max_size=16,
      )
  )
  return num_workers, events


@SETTINGS
@hypothesis.given(
    spec=pytree_specs(),
    run=user_pull_runs(),
    adaptive=st.booleans(),
    lambda_=st.sampled_from([0.0, 0.04, 0.5, 2.0]),
    decay=st.sampled_from([0.0, 0.5, 0.95]),
    eps=st.sampled_from([1e-7, 1e-3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_delay_compensation_with_user_pulls_matches_reference_server(
    spec, run, adaptive, lambda_, decay, eps, seed
):
  num_workers, events = run
  lr = 0.05
  rng = np.random.default_rng(seed)
  w0 = random_tree(rng, spec)
  ref = reference.ParameterServer(
      leaves_np(w0),
      num_workers,
      lambda_,
      adaptive=adaptive,
      decay=decay,
      eps=eps,
      learning_rate=lr,
  )
  tx = optax.chain(
      dcasgd_optax.delay_compensation(
          num_workers, lambda_, adaptive=adaptive, decay=decay, eps=eps
      ),
      optax.sgd(lr),
  )
  push = jax.jit(lambda g, s, p, m: tx.update(g, s, p, worker=m))
  pull = jax.jit(dcasgd_optax.record_pull)
  params = jax.tree.map(jnp.asarray, w0)
  state = tx.init(params)
  for i, (kind, m) in enumerate(events):
    if kind == "pull":
      ref.pull(m)
      state = pull(state, params, m)
    else:
      g = random_tree(rng, spec)
      want = ref.push(leaves_np(g), m)
      updates, state = push(g, state, params, m)
      assert_close_to_reference(updates, want, f"updates at event {i}")
      params = optax.apply_updates(params, updates)
    assert_close_to_reference(params, ref.w, f"params after event {i}")
  for m in range(num_workers):
    held = dcasgd_optax.worker_params(state[0], m)
    assert_close_to_reference(held, ref.backup[m], f"backup of worker {m}")
  if adaptive:
    assert_close_to_reference(state[0].mean_square, ref.mean_square, "ms")


def test_reference_server_compensates_a_stale_gradient_by_hand():
  """Pins the reference itself to the paper's formula on a hand-worked case."""
  ref = reference.ParameterServer(
      [np.array([1.0, 2.0])], 2, 0.5, learning_rate=0.1
  )
  ref.pull(1)  # worker 1 holds [1, 2]
  ref.push([np.array([1.0, 1.0])], 0)  # w -> [0.9, 1.9]
  step = ref.push([np.array([2.0, 1.0])], 1)  # stale by one push
  # g + 0.5 * g * g * (w - backup[1]) = [2 + 0.5*4*(-0.1), 1 + 0.5*1*(-0.1)]
  np.testing.assert_allclose(step[0], -0.1 * np.array([1.8, 0.95]))


@SETTINGS
@hypothesis.given(
    num_workers=st.integers(1, 4),
    adaptive=st.booleans(),
    events=st.lists(
        st.tuples(st.sampled_from(["pull", "push"]), st.integers(0, 3)),
        min_size=1,
        max_size=8,
    ),
    seed=st.integers(0, 2**31 - 1),
)
def test_zero_lambda_delay_compensation_passes_gradients_through_bitwise(
    num_workers, adaptive, events, seed
):
  """With user-driven pulls: chain(dc(lambda_=0), sgd) is sgd, bit for bit."""
  rng = np.random.default_rng(seed)
  tx = optax.chain(
      dcasgd_optax.delay_compensation(num_workers, 0.0, adaptive=adaptive),
      optax.sgd(0.1, momentum=0.9),
  )
  plain = optax.sgd(0.1, momentum=0.9)
  params = {"a": jnp.ones((2, 3)), "b": jnp.zeros(4)}
  state, plain_state = tx.init(params), plain.init(params)
  step = jax.jit(lambda g, s, p, m: tx.update(g, s, p, worker=m))
  plain_step = jax.jit(plain.update)
  for kind, m in events:
    m = m % num_workers
    if kind == "pull":
      state = dcasgd_optax.record_pull(state, params, m)
      continue
    g = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params
    )
    updates, state = step(g, state, params, m)
    plain_updates, plain_state = plain_step(g, plain_state, params)
    assert_bitwise_equal(updates, plain_updates)
    params = optax.apply_updates(params, updates)


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
@pytest.mark.parametrize(
    "value", [-0.1, -1, float("nan"), float("inf"), jnp.array(-2.0)]
)
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


@pytest.mark.parametrize("name", ["lambda_", "decay", "eps"])
def test_schedule_for_a_numeric_hyperparameter_is_rejected_by_name(name):
  with pytest.raises(
      TypeError, match=f"`{name}` must be a number, not a schedule"
  ):
    dcasgd_optax.delay_compensation(
        NUM_WORKERS, adaptive=True, **{name: lambda step: 0.1}
    )


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


# --- per-call arguments (update, and record_pull alike) -------------------


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
        (
            {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2), "c": jnp.zeros(1)},
            "different tree structure",
        ),
        ([jnp.zeros(2), jnp.zeros((2, 2))], "different tree structure"),
        (
            {"w": jnp.zeros((2, 3)), "b": jnp.zeros(2)},
            r"leaf \['w'\] has shape",
        ),
        (
            {"w": jnp.zeros((2, 2)), "b": jnp.zeros(())},
            r"leaf \['b'\] has shape",
        ),
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


# --- traced out-of-range workers: NaN updates, untouched state ------------


@builders
@pytest.mark.parametrize("worker", [NUM_WORKERS, -1, 2**30])
def test_traced_out_of_range_worker_gives_nan_updates_and_leaves_backups(
    build, worker
):
  tx, params = build(), params_tree()
  state = stale_state(tx, params, first=1)
  before = snapshot(dc_state(state))
  step = jax.jit(lambda g, s, p, m: tx.update(g, s, p, worker=m))
  updates, new_state = step(params, state, params, worker)
  for u in jax.tree.leaves(updates):
    assert np.all(np.isnan(np.asarray(u)))
  # No worker's backup moved, and DC-ASGD-a's mean square did not absorb the
  # gradient.
  chex.assert_trees_all_equal(dc_state(new_state), before)
  # The same jitted step with a valid id is finite (the NaN is the id's doing).
  ok, _ = step(params, state, params, 1)
  assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(ok))


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
def test_apply_if_finite_after_compensation_skips_a_traced_out_of_range_worker(
    build,
):
  tx, params = build(), params_tree()
  state = stale_state(tx, params, first=1)
  chain = lambda s: (s.inner_state if isinstance(
      s, dcasgd_optax.PullAfterPushState) else s)
  guard = lambda s: chain(s)[1]  # the ApplyIfFiniteState

  @jax.jit
  def step(params, state, worker):
    updates, state = tx.update(params, state, params, worker=worker)
    return optax.apply_updates(params, updates), state

  new_params, new_state = step(params, state, NUM_WORKERS + 1)
  chex.assert_trees_all_equal(new_params, snapshot(params))
  assert int(guard(new_state).notfinite_count) == 1
  # Everything but the guard's own counters is as it was: backups, mean
  # square and the inner optimizer's moments.
  restore = lambda s: (chain(s)[0], guard(s).inner_state) + tuple(
      chain(s)[2:])
  chex.assert_trees_all_equal(restore(new_state), snapshot(restore(state)))
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
  state = stale_state(tx, params, first=1)
  before = snapshot(state)
  bad_params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  call = {
      "params_shape": lambda g, s: tx.update(g, s, bad_params, worker=0),
      "params_none": lambda g, s: tx.update(g, s, None, worker=0),
      "missing_worker": lambda g, s: tx.update(g, s, params),
      "worker_out_of_range": lambda g, s: tx.update(
          g, s, params, worker=NUM_WORKERS
      ),
  }[bad_call]
  step = jax.jit(call, donate_argnums=1)
  with pytest.raises((TypeError, ValueError)):
    step(params, state)
  assert not any(x.is_deleted() for x in jax.tree.leaves(state))
  chex.assert_trees_all_equal(state, before)
  # The same donated step with good arguments does consume the state.
  good = jax.jit(
      lambda g, s: tx.update(g, s, params, worker=0), donate_argnums=1
  )
  good(params, state)
  assert all(x.is_deleted() for x in jax.tree.leaves(dc_state(state).backups))


# --- in-place backups: XLA's accounting must not grow with num_workers ----


def dcasgd_step(num_workers, adaptive=True):
  tx = dcasgd_optax.dcasgd(0.1, num_workers, adaptive=adaptive, momentum=0.9)
  return tx, update_step(tx)


def user_pull_step(num_workers):
  """delay_compensation in a user's chain, with a pull by another worker."""
  tx = optax.chain(
      dcasgd_optax.delay_compensation(num_workers, 0.04), optax.sgd(0.1)
  )

  def step(params, state, grads, worker):
    params, state = update_step(tx)(params, state, grads, worker)
    puller = (worker + 1) % num_workers
    return params, dcasgd_optax.record_pull(state, params, puller)

  return tx, step


def full_rewrite_step(num_workers):
  """A deliberately wrong pull: rewrites every backup through a select."""
  tx = optax.chain(
      dcasgd_optax.delay_compensation(num_workers, 0.04), optax.sgd(0.1)
  )

  def step(params, state, grads, worker):
    params, state = update_step(tx)(params, state, grads, worker)
    dc = state[0]
    one_hot = jnp.arange(num_workers) == worker
    backups = jax.tree.map(
        lambda b, p: jnp.where(
            one_hot.reshape((num_workers,) + (1,) * p.ndim), p[None], b
        ),
        dc.backups,
        params,
    )
    return params, (dc._replace(backups=backups),) + tuple(state[1:])

  return tx, step


STEPS = {
    "dcasgd_a": dcasgd_step,
    "dcasgd_c": lambda n: dcasgd_step(n, adaptive=False),
    "user_pull": user_pull_step,
}


def compile_step(make_step, num_workers, donate):
  tx, step = make_step(num_workers)
  params = wide_params()
  state = tx.init(params)
  jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  compiled = jitted.lower(params, state, params, jnp.int32(0)).compile()
  return compiled, cost_analysis(compiled), compiled.memory_analysis()


def growth(make_step, donate):
  """How much bytes accessed / extra allocation grow with the worker count."""
  small = compile_step(make_step, FEW_WORKERS, donate)
  large = compile_step(make_step, MANY_WORKERS, donate)

  def unaliased(memory):
    return memory.output_size_in_bytes - memory.alias_size_in_bytes

  return dict(
      bytes_accessed=large[1]["bytes accessed"] - small[1]["bytes accessed"],
      unaliased_output=unaliased(large[2]) - unaliased(small[2]),
      temp=large[2].temp_size_in_bytes - small[2].temp_size_in_bytes,
  )


@pytest.mark.parametrize("make_step", STEPS.values(), ids=STEPS)
def test_donated_update_cost_does_not_grow_with_num_workers(make_step):
  grown = growth(make_step, donate=True)
  # A copy of the extra backups would add MANY_WORKERS - FEW_WORKERS models.
  for what, extra in grown.items():
    assert abs(extra) < 0.1 * WIDE_MODEL_BYTES, (what, extra, WIDE_MODEL_BYTES)


@pytest.mark.parametrize("make_step", STEPS.values(), ids=STEPS)
def test_donated_update_aliases_the_backups_and_never_copies_them(make_step):
  compiled, _, memory = compile_step(make_step, MANY_WORKERS, donate=True)
  backups_bytes = MANY_WORKERS * WIDE_MODEL_BYTES
  assert memory.alias_size_in_bytes >= backups_bytes
  assert backup_copies(compiled, MANY_WORKERS) == []


@pytest.mark.parametrize("make_step", STEPS.values(), ids=STEPS)
def test_without_donation_the_same_checks_see_the_copy(make_step):
  """The checks above can fail: without donation XLA must copy the backups."""
  grown = growth(make_step, donate=False)
  extra_backups = (MANY_WORKERS - FEW_WORKERS) * WIDE_MODEL_BYTES
  assert grown["bytes_accessed"] >= extra_backups
  assert grown["unaliased_output"] >= extra_backups
  compiled, _, memory = compile_step(make_step, MANY_WORKERS, donate=False)
  assert memory.alias_size_in_bytes == 0
  assert backup_copies(compiled, MANY_WORKERS)


def test_a_pull_that_rewrites_every_backup_is_caught_even_when_donated():
  """An O(num_workers) pull (select over all backups) fails the cost check."""
  grown = growth(full_rewrite_step, donate=True)
  assert (
      grown["bytes_accessed"] >= (MANY_WORKERS - FEW_WORKERS) * WIDE_MODEL_BYTES
  )


# --- the opt-in variants: per-worker MeanSquare, remedies -------------------


@hypothesis.settings(SETTINGS, max_examples=8)
@hypothesis.given(
    spec=pytree_specs(),
    run=user_pull_runs(),
    per_worker=st.booleans(),
    bias_correction=st.booleans(),
    warmup=st.sampled_from([0, 3]),
    clip=st.sampled_from([None, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_variants_match_reference_server(
    spec, run, per_worker, bias_correction, warmup, clip, seed
):
  num_workers, events = run
  lr, decay = 0.05, 0.5
  rng = np.random.default_rng(seed)
  w0 = random_tree(rng, spec)
  options = dict(per_worker_mean_square=per_worker,
                 bias_correction=bias_correction, lambda_warmup=warmup,
                 correction_clip=clip)
  ref = reference.ParameterServer(
      leaves_np(w0), num_workers, 2.0, adaptive=True, decay=decay,
      learning_rate=lr, **options)
  tx = optax.chain(
      dcasgd_optax.delay_compensation(
          num_workers, 2.0, adaptive=True, decay=decay, **options),
      optax.sgd(lr),
  )
  push = jax.jit(lambda g, s, p, m: tx.update(g, s, p, worker=m))
  params = jax.tree.map(jnp.asarray, w0)
  state = tx.init(params)
  for i, (kind, m) in enumerate(events):
    if kind == "pull":
      ref.pull(m)
      _, state = dcasgd_optax.pull(state, params, m)
    else:
      g = random_tree(rng, spec)
      want = ref.push(leaves_np(g), m)
      updates, state = push(g, state, params, jnp.int32(m))
      assert_close_to_reference(updates, want, f"updates at event {i}")
      params = optax.apply_updates(params, updates)
  mean_square = state[0].mean_square
  if per_worker:  # one row per worker, each fed by that worker's gradients
    for m in range(num_workers):
      row = jax.tree.map(operator.itemgetter(m), mean_square)
      assert_close_to_reference(row, ref.worker_ms[m], f"ms of worker {m}")
    np.testing.assert_array_equal(state[0].count, ref.worker_count)
  else:
    assert_close_to_reference(mean_square, ref.worker_ms[0], "ms")
    assert int(state[0].count) == ref.worker_count[0]


def test_reference_variants_by_hand():
  """Pins the reference's remedies on one hand-worked push."""
  g = np.array([2.0, 1.0])

  def first_step(**options):
    ref = reference.ParameterServer([np.array([1.0, 2.0])], 2, 2.0,
                                    adaptive=True, decay=0.75, eps=0.0,
                                    learning_rate=1.0, **options)
    ref.backup[1] = [np.array([0.0, 2.5])]  # w - backup = [1, -0.5]
    return -ref.push([g], 1)[0]

  # ms = 0.25 g^2, so lam = 2 / (0.5 |g|) and the term is 4 |g| (w - b).
  np.testing.assert_allclose(first_step(), g + 4 * np.abs(g) * [1, -0.5])
  # Bias-corrected: ms / (1 - 0.75) = g^2, the term is 2 |g| (w - b).
  np.testing.assert_allclose(first_step(bias_correction=True),
                             g + 2 * np.abs(g) * [1, -0.5])
  # Warm-up over 4 pushes: a quarter of the term at the first push.
  np.testing.assert_allclose(first_step(lambda_warmup=4),
                             g + np.abs(g) * [1, -0.5])
  # Clipped to |g|.
  np.testing.assert_allclose(first_step(correction_clip=1.0),
                             g + np.abs(g) * [1, -1])


def test_per_worker_mean_square_costs_one_model_per_worker():
  params = {"w": jnp.zeros((3, 2))}
  shared = dcasgd_optax.delay_compensation(4, adaptive=True).init(params)
  own = dcasgd_optax.delay_compensation(
      4, adaptive=True, per_worker_mean_square=True).init(params)
  assert shared.mean_square["w"].shape == (3, 2) and shared.count.shape == ()
  assert own.mean_square["w"].shape == (4, 3, 2) and own.count.shape == (4,)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(per_worker_mean_square=True),
            ValueError,
            "`per_worker_mean_square=True` needs `adaptive=True`",
        ),
        (
            dict(bias_correction=True),
            ValueError,
            "`bias_correction=True` needs `adaptive=True`",
        ),
        (
            dict(adaptive=True, bias_correction=1),
            TypeError,
            "`bias_correction`",
        ),
        (
            dict(adaptive=True, per_worker_mean_square="yes"),
            TypeError,
            "`per_worker_mean_square`",
        ),
        (dict(lambda_warmup=-1), ValueError, "`lambda_warmup`"),
        (dict(correction_clip=0.0), ValueError, "`correction_clip`"),
        (dict(correction_clip=-1.0), ValueError, "`correction_clip`"),
    ],
)
def test_bad_variant_arguments_name_themselves(kwargs, error, match):
  with pytest.raises(error, match=match):
    dcasgd_optax.delay_compensation(2, **kwargs)


def test_variants_under_inject_hyperparams_and_jit_match_the_plain_build():
  """The variants' numeric options become arrays (traced in a jitted update)."""
  options = dict(num_workers=NUM_WORKERS, lambda_=2.0, adaptive=True,
                 per_worker_mean_square=True, bias_correction=True,
                 lambda_warmup=2, correction_clip=1.0)
  injected = optax.inject_hyperparams(
      dcasgd_optax.delay_compensation, static_args=("num_workers",))(**options)
  plain = dcasgd_optax.delay_compensation(**options)
  params = params_tree()
  state, plain_state = stale_state(injected, params), stale_state(plain, params)
  step = jax.jit(lambda g, s, m: injected.update(g, s, params, worker=m))
  for m, seed in ((1, 0), (2, 1), (1, 2)):
    g = jax.tree.map(lambda p, k=seed + 1.0: p * k, params)
    got, state = step(g, state, m)
    want, plain_state = plain.update(g, plain_state, params, worker=m)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state.inner_state, plain_state, rtol=1e-5)
