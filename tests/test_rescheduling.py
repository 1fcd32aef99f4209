"""Staleness-aware and scheduled learning rates.

scale_by_pipemare against PipeMare's formula (tests/reference.py,
``pipemare_scale``); learning_rate_schedule against the formulas written
out in NumPy; and every full optimizer the library ships run with
``optax.warmup_cosine_decay_schedule`` as its learning rate against its
NumPy reference server (which calls the schedule at each push).
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax

import helpers
import reference

# --- scale_by_pipemare --------------------------------------------------------


def test_pipemare_matches_its_formula_under_jit():
  num_steps = 4
  tx = optax.chain(dcasgd_optax.scale_by_pipemare(num_steps), optax.sgd(0.5))
  params = {"w": jnp.ones(3)}
  step = jax.jit(lambda g, s, tau: tx.update(g, s, params, staleness=tau))
  state = tx.init(params)
  taus = [0, 7, 3, 1, 15, 7, 2]
  for k, tau in enumerate(taus):
    g = helpers.grads_like(params, k)
    u, state = step(g, state, jnp.int32(tau))
    scale = reference.pipemare_scale(tau, k, num_steps)
    np.testing.assert_allclose(u["w"], -0.5 * scale * np.asarray(g["w"]),
                               rtol=1e-6)


def test_pipemare_starts_at_one_over_tau_and_reaches_the_full_rate():
  tx = dcasgd_optax.scale_by_pipemare(num_steps=2)
  state = tx.init({"w": jnp.zeros(())})
  scales = []
  for _ in range(4):
    u, state = tx.update({"w": jnp.ones(())}, state, staleness=8)
    scales.append(float(u["w"]))
  np.testing.assert_allclose(scales, [1 / 8, 1 / math.sqrt(8), 1, 1],
                             rtol=1e-6)


def test_pipemare_rejects_bad_input_naming_it():
  with pytest.raises(ValueError, match="num_steps"):
    dcasgd_optax.scale_by_pipemare(0)
  with pytest.raises(TypeError, match="num_steps"):
    dcasgd_optax.scale_by_pipemare(2.5)
  tx = dcasgd_optax.scale_by_pipemare(3)
  state = tx.init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match="staleness"):
    tx.update({"w": jnp.ones(2)}, state, staleness=-1)
  with pytest.raises(TypeError, match="staleness"):
    tx.update({"w": jnp.ones(2)}, state)
  # A traced negative staleness cannot raise: the update is NaN, not quiet.
  u, _ = jax.jit(lambda t: tx.update({"w": jnp.ones(2)}, state,
                                     staleness=t))(jnp.int32(-1))
  assert np.all(np.isnan(u["w"]))


# --- learning_rate_schedule ---------------------------------------------------


def _expected(name, lr, num_steps, warmup, t):
  if t < warmup:
    return lr * t / warmup
  if name == "constant":
    return lr
  frac = min((t - warmup) / (num_steps - warmup), 1.0)
  if name == "linear":
    return lr * (1 - frac)
  return lr * 0.5 * (1 + math.cos(math.pi * frac))


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_learning_rate_schedule_matches_its_formula(name, warmup):
  lr = dcasgd_optax.learning_rate_schedule(name, 0.2, 10, warmup_steps=warmup)
  got = [float(lr(t)) for t in range(13)]
  want = [_expected(name, 0.2, 10, warmup, t) for t in range(13)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_learning_rate_schedule_rejects_bad_input_naming_it():
  with pytest.raises(ValueError, match="`name`.*'cosine'.*'warmup_cosine'"):
    dcasgd_optax.learning_rate_schedule("warmup_cosine", 0.1, 10)
  with pytest.raises(ValueError, match="warmup_steps"):
    dcasgd_optax.learning_rate_schedule("cosine", 0.1, 10, warmup_steps=11)
  with pytest.raises(ValueError, match="num_steps"):
    dcasgd_optax.learning_rate_schedule("cosine", 0.1, 0)
  with pytest.raises(ValueError, match="learning_rate"):
    dcasgd_optax.learning_rate_schedule("linear", -0.1, 10)


# --- optax schedules in every full optimizer ----------------------------------

SCHEDULE = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=0.1, warmup_steps=3, decay_steps=10,
    end_value=0.01)


def ref_lr(t):
  return float(SCHEDULE(t))


SPEC = (1, [(2, 3), (3,), ()])  # a three-leaf model
ORDER = [0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 2, 0]


def _replay(tx, ref, seed=0, check_pulls=False):
  rng = np.random.default_rng(seed)
  w0 = helpers.random_tree(rng, SPEC)
  ref = ref(helpers.leaves_np(w0))
  helpers.replay_against_reference(tx, ref, w0, ORDER, rng, SPEC,
                                   check_pulls=check_pulls)


def test_dcasgd_takes_an_optax_schedule():
  _replay(dcasgd_optax.dcasgd(SCHEDULE, 3, lambda_=2.0, momentum=0.9),
          lambda w: reference.ParameterServer(
              w, 3, 2.0, adaptive=True, learning_rate=ref_lr, momentum=0.9))


def test_gap_aware_asgd_takes_an_optax_schedule():
  _replay(dcasgd_optax.gap_aware_asgd(SCHEDULE, 3, momentum=0.9,
                                     step_size=1.0, decay=0.9),
          lambda w: reference.GapAwareServer(
              w, 3, 1.0, decay=0.9, learning_rate=ref_lr, momentum=0.9))


def test_dana_dc_takes_an_optax_schedule():
  _replay(dcasgd_optax.dana_dcasgd(SCHEDULE, 3, momentum=0.9, lambda_=0.5,
                               adaptive=False),
          lambda w: reference.ParameterServer(
              w, 3, 0.5, learning_rate=ref_lr, momentum=0.9,
              look_ahead_horizon=2),
          check_pulls=True)


def test_delayed_nesterov_dcasgd_takes_an_optax_schedule():
  _replay(dcasgd_optax.delayed_nesterov_dcasgd(
              SCHEDULE, 3, momentum=0.9, lambda_=0.5, adaptive=False),
          lambda w: reference.ParameterServer(
              w, 3, 0.5, learning_rate=ref_lr, momentum=0.9,
              delayed_nesterov_period=3))


def test_fisher_dcasgd_takes_an_optax_schedule():
  tx = dcasgd_optax.fisher_dcasgd(SCHEDULE, 3, lambda_=2.0, momentum=0.9)
  rng = np.random.default_rng(0)
  w0 = helpers.random_tree(rng, SPEC)
  ref = reference.FisherServer(helpers.leaves_np(w0), 3, 2.0, adaptive=True,
                               learning_rate=ref_lr, momentum=0.9)

  @jax.jit
  def step(params, state, g, f, m):
    updates, state = tx.update(g, state, params, worker=m, grad_sq=f)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.asarray, w0)
  state = tx.init(params)
  for i, m in enumerate(ORDER):
    g = helpers.random_tree(rng, SPEC)
    f = jax.tree.map(lambda x: 2 * x * x + 0.1, g)
    ref.push_with_fisher(helpers.leaves_np(g), helpers.leaves_np(f), m)
    ref.pull(m)
    params, state = step(params, state, g, f, jnp.int32(m))
    helpers.assert_close_to_reference(params, ref.w, f"params after push {i}")


def test_secant_dcasgd_takes_an_optax_schedule():
  _replay(dcasgd_optax.secant_dcasgd(SCHEDULE, 3, lambda_=1.0, decay=0.9,
                                     momentum=0.9),
          lambda w: reference.SecantServer(
              w, 3, 1.0, decay=0.9, learning_rate=ref_lr, momentum=0.9,
              correction_clip=1.0))


def test_delayed_nesterov_secant_dcasgd_takes_an_optax_schedule():
  _replay(dcasgd_optax.delayed_nesterov_secant_dcasgd(
              SCHEDULE, 3, lambda_=1.0, decay=0.9),
          lambda w: reference.SecantServer(
              w, 3, 1.0, decay=0.9, learning_rate=ref_lr, momentum=0.9,
              delayed_nesterov_period=3, correction_clip=1.0))


def test_the_full_optimizers_are_all_covered():
  """A new full optimizer must get its schedule test here."""
  def first_argument(obj):
    if not inspect.isfunction(obj):
      return None
    return next(iter(inspect.signature(obj).parameters), None)

  full = {name for name in dcasgd_optax.__all__
          if first_argument(getattr(dcasgd_optax, name)) == "learning_rate"}
  tested = {"dcasgd", "gap_aware_asgd", "dana_dcasgd",
            "delayed_nesterov_dcasgd", "fisher_dcasgd", "secant_dcasgd",
            "delayed_nesterov_secant_dcasgd"}
  # Chain pieces take a learning rate too; their schedules are tested in
  # their own files (look_ahead_momentum, look_ahead_adam, delayed_nesterov).
  pieces = {"look_ahead_momentum", "look_ahead_adam", "delayed_nesterov"}
  assert full - pieces == tested
