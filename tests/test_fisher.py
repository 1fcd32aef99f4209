"""fisher_compensation, fisher_dcasgd and the simulator's push_grad_sq.

The reference (tests/reference.py, ``FisherServer``) is the paper's server
with the pushed Fisher diagonal F in place of g * g; the per-example
curvature is checked against a loop over the examples, one jax.grad each.
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
from dcasgd_optax._src import _per_example
from dcasgd_optax.harness import Simulator
from dcasgd_optax.harness import schedules

import helpers
import reference


@hypothesis.settings(helpers.SETTINGS, max_examples=5)
@hypothesis.given(
    spec=helpers.pytree_specs(),
    num_workers=st.integers(1, 4),
    data=st.data(),
    adaptive=st.booleans(),
    per_worker=st.booleans(),
    lambda_=st.sampled_from([0.5, 2.0]),
    momentum=st.sampled_from([None, 0.9]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fisher_dcasgd_matches_reference_server(
    spec, num_workers, data, adaptive, per_worker, lambda_, momentum, seed
):
  per_worker = per_worker and adaptive
  order = data.draw(
      st.lists(st.integers(0, num_workers - 1), min_size=1, max_size=10),
      label="worker order",
  )
  rng = np.random.default_rng(seed)
  w0 = helpers.random_tree(rng, spec)
  ref = reference.FisherServer(
      helpers.leaves_np(w0), num_workers, lambda_, adaptive=adaptive,
      learning_rate=0.05, momentum=momentum,
      per_worker_mean_square=per_worker,
  )
  tx = dcasgd_optax.fisher_dcasgd(
      0.05, num_workers, lambda_=lambda_, adaptive=adaptive,
      momentum=momentum, per_worker_mean_square=per_worker,
  )

  @jax.jit
  def step(params, state, g, f, m):
    updates, state = tx.update(g, state, params, worker=m, grad_sq=f)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.asarray, w0)
  state = tx.init(params)
  for i, m in enumerate(order):
    g = helpers.random_tree(rng, spec)
    # A Fisher diagonal is >= g * g elementwise (a mean of squares is at
    # least the square of the mean): g * g plus a random positive part.
    f = jax.tree.map(
        lambda x: x * x + rng.uniform(0, 2, x.shape).astype(np.float32), g)
    ref.push_with_fisher(helpers.leaves_np(g), helpers.leaves_np(f), m)
    ref.pull(m)
    params, state = step(params, state, g, f, jnp.int32(m))
    helpers.assert_close_to_reference(params, ref.w, f"params after push {i}")
    helpers.assert_close_to_reference(
        dcasgd_optax.worker_params(state, m), ref.backup[m], f"pull {i}")


@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_sq_equal_to_g_squared_is_delay_compensation(adaptive):
  """F = g * g gives DC-ASGD's numbers (its curvature is the batch's)."""
  params = helpers.params_tree()
  fisher = dcasgd_optax.fisher_compensation(3, 0.5, adaptive=adaptive)
  dc = dcasgd_optax.delay_compensation(3, 0.5, adaptive=adaptive)
  s_f = helpers.stale_state(fisher, params)
  s_d = helpers.stale_state(dc, params)
  step = jax.jit(lambda g, s, m: fisher.update(
      g, s, params, worker=m, grad_sq=jax.tree.map(jnp.square, g)))
  for seed, m in enumerate((1, 2, 1)):
    g = helpers.grads_like(params, seed)
    got, s_f = step(g, s_f, m)
    want, s_d = dc.update(g, s_d, params, worker=m)
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
    np.testing.assert_allclose(got["b"], want["b"], rtol=1e-6)


def test_a_missing_grad_sq_is_a_loud_error_naming_it():
  params = helpers.params_tree()
  tx = dcasgd_optax.fisher_dcasgd(0.1, 2)
  state = tx.init(params)
  with pytest.raises(TypeError, match="`grad_sq`"):
    tx.update(params, state, params, worker=0)


def test_a_grad_sq_of_another_shape_is_rejected_naming_it():
  params = helpers.params_tree()
  tx = dcasgd_optax.fisher_compensation(2, 0.5)
  state = tx.init(params)
  bad = {"w": jnp.ones(3), "b": jnp.ones(2)}
  with pytest.raises(ValueError, match="grad_sq"):
    tx.update(params, state, params, worker=0, grad_sq=bad)


def test_bad_arguments_are_rejected_naming_them():
  with pytest.raises(ValueError, match="lambda_"):
    dcasgd_optax.fisher_compensation(2, -1.0)
  with pytest.raises(ValueError, match="per_worker_mean_square"):
    dcasgd_optax.fisher_compensation(2, per_worker_mean_square=True)
  with pytest.raises(TypeError, match="num_workers"):
    dcasgd_optax.fisher_compensation(2.0)


# --- the worker's side: the per-example curvature -----------------------------


# The default (on CPU: one example after another), and both ways on every
# platform: the one CI's CPU does not pick is tested all the same.
@pytest.mark.parametrize("way", ["default", "_by_scan", "_by_vmap"])
def test_mean_square_grads_is_the_mean_of_per_example_squares(way):
  params = helpers.init_params()
  idx = helpers.make_batches(1)[0]  # 8 examples
  fn = getattr(_per_example,
               "mean_square_grads" if way == "default" else way)
  got = jax.jit(lambda p: fn(helpers.loss_fn, p, idx))(params)
  grad = jax.jit(jax.grad(helpers.loss_fn))
  per = [grad(params, idx[i:i + 1]) for i in range(idx.shape[0])]
  for key in params:
    want = np.mean([np.square(np.asarray(g[key], np.float64)) for g in per],
                   axis=0)
    np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-8)
  # ... and it is not the square of the batch's gradient (larger here).
  g = jax.grad(helpers.loss_fn)(params, idx)
  assert float(jnp.sum(got["w1"])) > 1.5 * float(jnp.sum(g["w1"] ** 2))


@pytest.mark.parametrize("strategy", helpers.STRATEGIES)
def test_simulator_pushes_grad_sq_like_a_one_at_a_time_loop(strategy):
  num_workers, num = 3, 9
  tx = dcasgd_optax.fisher_dcasgd(0.1, num_workers, lambda_=1.0,
                                   adaptive=False)
  sim = Simulator(helpers.loss_fn, tx, push_grad_sq=True, strategy=strategy)
  batches = helpers.make_batches(num)
  arrivals = schedules.cyclic(num_workers, num)
  state, _ = sim.replay(sim.init(helpers.init_params()), batches, arrivals)

  params = helpers.init_params()
  opt = tx.init(params)
  held = [params] * num_workers
  grad = jax.jit(jax.grad(helpers.loss_fn))
  update = jax.jit(lambda g, o, p, m, f: tx.update(g, o, p, worker=m,
                                                   grad_sq=f))
  for k, m in enumerate(np.asarray(arrivals)):
    m, idx = int(m), batches[k]
    g = grad(held[m], idx)
    per = [grad(held[m], idx[i:i + 1]) for i in range(idx.shape[0])]
    f = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs) ** 2, 0), *per)
    updates, opt = update(g, opt, params, m, f)
    params = optax.apply_updates(params, updates)
    held[m] = params
  for key in params:
    np.testing.assert_allclose(state.params[key], params[key],
                               **helpers.REPLAY_TOL)


def test_simulator_push_grad_sq_rejects_what_it_cannot_do():
  tx = dcasgd_optax.fisher_dcasgd(0.1, 2)
  with pytest.raises(TypeError, match="push_grad_sq"):
    Simulator(helpers.loss_fn, tx, push_grad_sq=1)
  with pytest.raises(ValueError, match="push_grad_sq.*has_model_state"):
    Simulator(helpers.bn_loss_fn, tx, push_grad_sq=True,
              has_model_state=True)
  # A batch with no example axis (a scalar index) has no per-example form.
  scalar = lambda p, i: jnp.sum(p["w"]) * i
  sim = Simulator(scalar, tx, push_grad_sq=True)
  state = sim.init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="leading \\(example\\) axis"):
    sim.replay(state, jnp.arange(4.0), schedules.cyclic(2, 4))


def test_without_push_grad_sq_a_fisher_optimizer_fails_loudly():
  tx = dcasgd_optax.fisher_dcasgd(0.1, 2)
  sim = Simulator(helpers.loss_fn, tx)
  state = sim.init(helpers.init_params())
  with pytest.raises(TypeError, match="push_grad_sq=True"):
    sim.replay(state, helpers.make_batches(4), schedules.cyclic(2, 4))


def test_the_curvature_diagnostic_reads_the_fisher_compensation():
  """diagnose_curvature runs first_transform with what the worker pushed:
  the Fisher term's curvature along w - w_m is positive (F >= 0)."""
  fc = dcasgd_optax.fisher_compensation(4, 1.0)
  tx = dcasgd_optax.pull_after_push(optax.chain(fc, optax.sgd(0.05)))
  sim = Simulator(helpers.loss_fn, tx, push_grad_sq=True, first_transform=fc,
                  diagnose_curvature=True)
  _, metrics = sim.replay(sim.init(helpers.init_params()),
                          helpers.make_batches(12), schedules.cyclic(4, 12))
  k = np.asarray(metrics["curvature_ratio"])[4:]  # stale arrivals
  assert np.all(np.isfinite(k)) and np.all(k != 0)
