"""secant_compensation and secant_dcasgd against the reference server.

The reference (tests/reference.py, ``SecantServer``) is the paper's server
with a running diagonal secant in place of g * g, transcribed from the
formula; the trial's own estimator is checked against the library in
tests/test_experiments_secant_trial.py.
"""

from __future__ import annotations

import contextlib

import hypothesis
from hypothesis import strategies as st
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

import dcasgd_optax
from dcasgd_optax.harness import Simulator

import helpers
import reference

LR = 0.1


def _precision(clip, w0):
  """``(context, w0)`` to compare the library with the float64 reference in.

  With the clip, float32. Without it, float64 (``jax.enable_x64``): the
  unclipped secant of random gradients divides by Δw⊙Δw, which amplifies
  float32's round-off of Δw by |w|/|Δw|, past any fixed tolerance when a
  coordinate's Δw nearly cancels (hypothesis found one at 2.5e-4); the
  clip bounds the term by |g|.
  """
  if clip is not None:
    return contextlib.nullcontext(), w0
  return jax.enable_x64(True), jax.tree.map(lambda x: x.astype(np.float64), w0)


def _replay(tx, ref, w0, order, rng, spec, clip):
  """``helpers.replay_against_reference``, pulls checked, in the precision
  of :func:`_precision`."""
  context, w0 = _precision(clip, w0)
  with context:
    helpers.replay_against_reference(
        tx, ref, w0, order, rng, spec, check_pulls=True
    )


@hypothesis.settings(helpers.SETTINGS, max_examples=5)
@hypothesis.given(
    spec=helpers.pytree_specs(),
    num_workers=st.integers(1, 3),
    data=st.data(),
    lambda_=st.sampled_from([0.5, 2.0]),
    clip=st.sampled_from([None, 1.0]),
    momentum=st.sampled_from([None, 0.9]),
    seed=st.integers(0, 2**31 - 1),
)
def test_secant_dcasgd_matches_reference_server(
    spec, num_workers, data, lambda_, clip, momentum, seed
):
  order = data.draw(
      st.lists(st.integers(0, num_workers - 1), min_size=1, max_size=10),
      label="worker order",
  )
  rng = np.random.default_rng(seed)
  w0 = helpers.random_tree(rng, spec)
  ref = reference.SecantServer(
      helpers.leaves_np(w0),
      num_workers,
      lambda_,
      decay=0.9,
      learning_rate=LR,
      momentum=momentum,
      correction_clip=clip,
  )
  tx = dcasgd_optax.secant_dcasgd(
      LR,
      num_workers,
      lambda_=lambda_,
      decay=0.9,
      correction_clip=clip,
      momentum=momentum,
  )
  _replay(tx, ref, w0, order, rng, spec, clip)


@hypothesis.settings(helpers.SETTINGS, max_examples=5)
@hypothesis.given(
    spec=helpers.pytree_specs(),
    num_workers=st.integers(1, 3),
    data=st.data(),
    period=st.integers(1, 3),
    activation=st.sampled_from([0.0, 1.0]),  # as a fraction of 1 / period
    clip=st.sampled_from([None, 1.0]),
    weight_decay=st.sampled_from([0.0, 0.05]),
    seed=st.integers(0, 2**31 - 1),
)
def test_delayed_nesterov_secant_dcasgd_matches_reference_server(
    spec, num_workers, data, period, activation, clip, weight_decay, seed
):
  # The secant server with Liu et al.'s delayed Nesterov step (the
  # reference's delayed_nesterov_period), as delayed_nesterov_dcasgd's
  # test checks it with g * g.
  order = data.draw(
      st.lists(st.integers(0, num_workers - 1), min_size=1, max_size=12),
      label="worker order",
  )
  rng = np.random.default_rng(seed)
  w0 = helpers.random_tree(rng, spec)
  c = activation / period
  ref = reference.SecantServer(
      helpers.leaves_np(w0),
      num_workers,
      1.0,
      decay=0.9,
      learning_rate=LR,
      momentum=0.9,
      delayed_nesterov_period=period,
      momentum_activation=c,
      correction_clip=clip,
      weight_decay=weight_decay,
  )
  tx = dcasgd_optax.delayed_nesterov_secant_dcasgd(
      LR,
      num_workers,
      period=period,
      momentum=0.9,
      momentum_activation=c,
      lambda_=1.0,
      decay=0.9,
      correction_clip=clip,
      weight_decay=weight_decay,
  )
  _replay(tx, ref, w0, order, rng, spec, clip)


@hypothesis.settings(helpers.SETTINGS, max_examples=5)
@hypothesis.given(
    spec=helpers.pytree_specs(),
    num_workers=st.integers(1, 3),
    data=st.data(),
    clip=st.sampled_from([None, 1.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_secant_compensation_with_pulls_between_pushes_matches_reference(
    spec, num_workers, data, clip, seed
):
  """Pushes and pulls in a random order (a worker may push several times
  from one pull: then its secant is zero), the transformation alone with
  SGD applied by hand, under jit."""
  events = data.draw(
      st.lists(
          st.tuples(
              st.sampled_from(["push", "pull"]), st.integers(0, num_workers - 1)
          ),
          min_size=1,
          max_size=14,
      ),
      label="events",
  )
  rng = np.random.default_rng(seed)
  w0 = helpers.random_tree(rng, spec)
  ref = reference.SecantServer(
      helpers.leaves_np(w0),
      num_workers,
      0.7,
      decay=0.8,
      learning_rate=LR,
      correction_clip=clip,
  )
  tx = dcasgd_optax.secant_compensation(
      num_workers, 0.7, decay=0.8, correction_clip=clip
  )

  @jax.jit
  def push(params, state, g, m):
    out, state = tx.update(g, state, params, worker=m)
    return jax.tree.map(lambda w, c: w - LR * c, params, out), state

  pull = jax.jit(dcasgd_optax.record_pull)
  context, w0 = _precision(clip, w0)
  with context:
    params = jax.tree.map(jnp.asarray, w0)
    state = tx.init(params)
    for i, (kind, m) in enumerate(events):
      if kind == "pull":
        ref.pull(m)
        state = pull(state, params, jnp.int32(m))
        continue
      g = helpers.random_tree(rng, spec)
      ref.push(helpers.leaves_np(g), m)
      params, state = push(params, state, g, jnp.int32(m))
      helpers.assert_close_to_reference(params, ref.w, f"params after {i}")
      helpers.assert_close_to_reference(
          dcasgd_optax.worker_params(state, m), ref.backup[m], f"backup {i}"
      )


def _two_pushes(tx, params):
  """Worker 0 pushes at params, pulls params + 1, pushes at w = params + 1.5:
  its secant exists at the second push."""
  state = tx.init(params)
  g1 = jax.tree.map(jnp.ones_like, params)
  _, state = tx.update(g1, state, params, worker=0)
  state = dcasgd_optax.record_pull(state, helpers.shifted(params, 1.0), 0)
  g2 = jax.tree.map(lambda p: 3 * jnp.ones_like(p), params)
  return tx.update(g2, state, helpers.shifted(params, 1.5), worker=0)


def test_the_second_push_is_corrected_by_its_secant():
  """The secant is (3 - 1) / (1 - 0) = 2 everywhere: 3 + lam * 2 * 0.5."""
  tx = dcasgd_optax.secant_compensation(2, 0.5, correction_clip=None)
  out, state = _two_pushes(tx, helpers.params_tree())
  for x in jax.tree.leaves(out):
    np.testing.assert_allclose(x, 3.5, rtol=1e-6)
  assert bool(state.seen[0]) and not bool(state.seen[1])
  np.testing.assert_allclose(state.denominator["b"], 0.01, rtol=1e-5)


def test_negative_curvature_and_unmoved_coordinates_give_no_correction():
  params = {"w": jnp.array([0.0, 0.0])}
  tx = dcasgd_optax.secant_compensation(1, 1.0, correction_clip=None)
  state = tx.init(params)
  _, state = tx.update({"w": jnp.array([1.0, 1.0])}, state, params, worker=0)
  # Coordinate 0 moved with a falling gradient (negative secant), 1 did not.
  state = dcasgd_optax.record_pull(state, {"w": jnp.array([1.0, 0.0])}, 0)
  g = {"w": jnp.array([-1.0, 2.0])}
  out, _ = tx.update(g, state, {"w": jnp.array([3.0, 3.0])}, worker=0)
  np.testing.assert_array_equal(out["w"], g["w"])


def test_the_clip_bounds_the_term_by_c_times_the_gradient():
  tx = dcasgd_optax.secant_compensation(2, 0.5, correction_clip=0.1)
  out, _ = _two_pushes(tx, helpers.params_tree())
  for x in jax.tree.leaves(out):
    np.testing.assert_allclose(x, 3.3, rtol=1e-6)  # 3 + 0.1 * 3


def test_a_traced_out_of_range_worker_writes_nothing_and_gives_nan():
  params = helpers.params_tree()
  tx = dcasgd_optax.secant_compensation(2, 0.5)
  _, state = _two_pushes(tx, params)
  g = helpers.grads_like(params, 0)
  step = jax.jit(lambda s, m: tx.update(g, s, params, worker=m))
  for bad in (-1, 2):
    out, new = step(state, jnp.int32(bad))
    assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(out))
    helpers.assert_bitwise_equal(new, state)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_workers=0), ValueError, "`num_workers`"),
        (dict(num_workers=2.0), TypeError, "`num_workers`"),
        (dict(lambda_=-0.1), ValueError, "`lambda_`"),
        (dict(decay=1.0), ValueError, r"`decay` must lie in \[0, 1\)"),
        (dict(decay=-0.5), ValueError, "`decay`"),
        (dict(correction_clip=0.0), ValueError, r"`correction_clip` must lie"),
        (dict(backup_dtype=jnp.int32), TypeError, "`backup_dtype`"),
    ],
)
def test_bad_arguments_are_rejected_naming_them(kwargs, error, match):
  kwargs = {"num_workers": 2, **kwargs}
  with pytest.raises(error, match=match):
    dcasgd_optax.secant_compensation(**kwargs)
  with pytest.raises(error, match=match):
    dcasgd_optax.secant_dcasgd(0.1, **kwargs)
  with pytest.raises(error, match=match):
    dcasgd_optax.delayed_nesterov_secant_dcasgd(0.1, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(period=0), ValueError, "`period`"),
        (dict(momentum=1.0), ValueError, "`momentum`"),
        (dict(momentum_activation=0.6), ValueError, "`momentum_activation`"),
        (dict(learning_rate=-0.1), ValueError, "`learning_rate`"),
        (dict(weight_decay=-1.0), ValueError, "`weight_decay`"),
    ],
)
def test_delayed_nesterov_secant_dcasgd_names_its_bad_arguments(
    kwargs, error, match
):
  kwargs = {"learning_rate": 0.1, "num_workers": 2, "period": 2, **kwargs}
  with pytest.raises(error, match=match):
    dcasgd_optax.delayed_nesterov_secant_dcasgd(**kwargs)


def test_bad_update_inputs_are_rejected_naming_them():
  params = helpers.params_tree()
  tx = dcasgd_optax.secant_compensation(2)
  state = tx.init(params)
  with pytest.raises(TypeError, match="`worker`"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="`worker`"):
    tx.update(params, state, params, worker=2)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state, {"w": jnp.ones(3)}, worker=0)
  with pytest.raises(ValueError, match="num_workers=3"):
    dcasgd_optax.secant_compensation(3).update(params, state, params, worker=0)
  with pytest.raises(ValueError, match="`momentum`"):
    dcasgd_optax.secant_dcasgd(0.1, 2, momentum=1.5)


def test_simulator_replays_secant_dcasgd_and_diagnoses_its_curvature():
  """The simulator's replay, with ``diagnose_curvature``, against a loop
  over the arrivals with the full Hessian of the flattened tiny net: the
  same final model, and the same ratio k = d'(c - g) / d'Hd of the secant's
  term to the true curvature along d = w - w_m."""
  w_, a_ = helpers.W, 12
  arrivals = helpers.random_order(w_, a_, seed=1)
  batches = helpers.make_batches(a_)
  tx = dcasgd_optax.secant_dcasgd(0.2, w_, lambda_=1.0, correction_clip=None)
  sim = Simulator(helpers.loss_fn, tx, diagnose_curvature=True)
  state, metrics = sim.replay(
      sim.init(helpers.init_params()), batches, arrivals
  )

  flat0, unravel = ravel_pytree(helpers.init_params())
  flat_loss = lambda x, b: helpers.loss_fn(unravel(x), b)
  grad, hess = jax.jit(jax.grad(flat_loss)), jax.jit(jax.hessian(flat_loss))
  secant = dcasgd_optax.secant_compensation(w_, 1.0, correction_clip=None)
  s, w, ratios = secant.init(flat0), flat0, []
  for k, m in enumerate(np.asarray(arrivals).tolist()):
    held = dcasgd_optax.worker_params(s, m)
    g, h, delta = grad(held, batches[k]), hess(held, batches[k]), w - held
    c, s = secant.update(g, s, w, worker=m)
    ratios.append(float(delta @ (c - g) / (delta @ h @ delta)))
    w = w - 0.2 * c
    s = dcasgd_optax.record_pull(s, w, m)
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-5),
      state.params,
      unravel(w),
  )
  ratios, got = np.array(ratios), np.asarray(metrics["curvature_ratio"])
  measured = np.isfinite(ratios)
  np.testing.assert_allclose(
      got[measured], ratios[measured], rtol=2e-3, atol=1e-6
  )
  assert np.any(ratios[measured] > 0.05)  # the secant did correct


def test_a_donated_step_writes_the_per_worker_arrays_in_place():
  """The state from ``init`` can be donated (no two leaves share a buffer),
  and the jitted, donated step writes the worker's rows in place: XLA's
  temporaries stay far below one [num_workers, ...] array, where a copy of
  the backups, the previous backups or the previous gradients would need
  at least one (XLA:CPU made two of each before the writes were tied to
  the reads)."""
  num_workers, size = 8, 1 << 14
  params = {"w": jnp.zeros((size,), jnp.float32)}
  grads = {"w": jnp.full((size,), 1e-3, jnp.float32)}
  tx = dcasgd_optax.secant_dcasgd(0.1, num_workers, momentum=0.9)
  state = tx.init(params)
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
  assert len(pointers) == len(set(pointers))

  def step(p, s, m):
    u, s = tx.update(grads, s, p, worker=m)
    return jax.tree.map(jnp.add, p, u), s

  jitted = jax.jit(step, donate_argnums=(0, 1))
  temp = (
      jitted.lower(params, state, jnp.int32(0))
      .compile()
      .memory_analysis()
      .temp_size_in_bytes
  )
  assert temp < num_workers * size * 4 / 2, temp
  p = jax.tree.map(jnp.copy, params)
  for m in (0, 1, 0):
    p, state = jitted(p, state, jnp.int32(m))
  assert np.all(np.isfinite(np.asarray(p["w"])))
