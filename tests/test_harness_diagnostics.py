"""Diagnostics: each arrival's gradient and applied direction against the
fresh gradient, checked against a one-arrival-at-a-time loop."""

import operator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax
from dcasgd_optax.harness import Simulator
from dcasgd_optax.harness import SyncSimulator
from dcasgd_optax.harness import schedules

from helpers import STRATEGIES
from helpers import W
from helpers import bn_loss_fn
from helpers import init_params
from helpers import loss_fn
from helpers import make_batches
from helpers import random_order

A = 16
KEYS = ("stale_cosine", "applied_cosine", "stale_error", "applied_error")


def dc_chain(lambda_, num_workers=W):
  """DC-ASGD-a with SGD, its compensation step returned too."""
  dc = dcasgd_optax.delay_compensation(num_workers, lambda_, adaptive=True)
  return dc, dcasgd_optax.pull_after_push(optax.chain(dc, optax.sgd(0.2)))


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(
      np.float64)


def compare(x, fresh):
  cosine = x @ fresh / (np.linalg.norm(x) * np.linalg.norm(fresh))
  return cosine, np.linalg.norm(x - fresh) / np.linalg.norm(fresh)


def reference(lambda_, params, batches, arrivals, every):
  """A Python loop that takes the fresh gradient itself, and runs its own
  copy of the compensation step, in step with the optimizer, for ``d``."""
  dc, tx = dc_chain(lambda_)
  opt_state, dc_state = tx.init(params), dc.init(params)
  out = {k: np.full(len(arrivals), np.nan) for k in KEYS}
  for k, m in enumerate(np.asarray(arrivals).tolist()):
    held = dcasgd_optax.worker_params(opt_state, m)
    g = jax.grad(loss_fn)(held, batches[k])
    d, dc_state = dc.update(g, dc_state, params, worker=m)
    if k % every == 0:  # server step before the update is k
      fresh = flat(jax.grad(loss_fn)(params, batches[k]))
      out["stale_cosine"][k], out["stale_error"][k] = compare(flat(g), fresh)
      out["applied_cosine"][k], out["applied_error"][k] = compare(flat(d),
                                                                  fresh)
    updates, opt_state = tx.update(g, opt_state, params, worker=m)
    params = optax.apply_updates(params, updates)
    dc_state = dcasgd_optax.record_pull(dc_state, params, m)
  return out


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("every", [1, 3])
def test_diagnostics_match_a_loop_that_takes_the_fresh_gradient(
    every, strategy):
  arrivals, batches = random_order(W, A, seed=1), make_batches(A)
  dc, tx = dc_chain(2.0)
  sim = Simulator(loss_fn, tx, diagnostics_every=every, first_transform=dc,
                  strategy=strategy)
  _, record = sim.replay(sim.init(init_params()), batches, arrivals)
  want = reference(2.0, init_params(), batches, arrivals, every)
  for key in KEYS:
    assert record[key].dtype == jnp.float32
    np.testing.assert_allclose(record[key], want[key], rtol=1e-4, atol=1e-5,
                               err_msg=key)
  sampled = np.arange(A) % every == 0
  assert np.all(np.isnan(np.asarray(record["stale_cosine"])[~sampled]))
  # DC-ASGD-a does change the gradient here: applied differs from stale.
  assert not np.allclose(record["applied_error"][sampled],
                         record["stale_error"][sampled])


def test_one_worker_has_every_cosine_one():
  dc, tx = dc_chain(2.0, num_workers=1)
  sim = Simulator(loss_fn, tx, diagnostics=True, first_transform=dc)
  _, record = sim.replay(sim.init(init_params()), make_batches(8),
                         np.zeros(8, np.int32))
  np.testing.assert_allclose(record["stale_cosine"], 1.0, atol=1e-6)
  np.testing.assert_allclose(record["applied_cosine"], 1.0, atol=1e-6)
  np.testing.assert_allclose(record["stale_error"], 0.0, atol=1e-6)
  np.testing.assert_allclose(record["applied_error"], 0.0, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: dc_chain(0.0),
    lambda: (None, optax.sgd(0.2, momentum=0.5)),  # plain ASGD, no backups
], ids=["lambda_zero", "plain_optimizer"])
def test_without_compensation_applied_equals_stale(make):
  dc, tx = make()
  sim = Simulator(loss_fn, tx, W, diagnostics=True, first_transform=dc)
  _, record = sim.replay(sim.init(init_params()), make_batches(A),
                         schedules.cyclic(W, A))
  np.testing.assert_array_equal(record["applied_cosine"],
                                record["stale_cosine"])
  np.testing.assert_array_equal(record["applied_error"],
                                record["stale_error"])
  assert np.all(np.asarray(record["stale_cosine"])[W:] < 1.0)  # stale


def test_without_diagnostics_the_record_has_no_diagnostic_keys():
  sim = Simulator(loss_fn, optax.sgd(0.1), W)
  _, record = sim.replay(sim.init(init_params()), make_batches(4),
                         schedules.cyclic(W, 4))
  assert not set(KEYS) & set(record)


def test_sync_gradients_are_fresh_by_construction():
  sim = SyncSimulator(loss_fn, optax.sgd(0.1), W, diagnostics_every=2)
  _, record = sim.replay(sim.init(init_params()), make_batches(3 * W))
  sampled = np.repeat([True, False, True], W)
  np.testing.assert_array_equal(np.asarray(record["stale_cosine"])[sampled], 1)
  np.testing.assert_array_equal(np.asarray(record["stale_error"])[sampled], 0)
  assert np.all(np.isnan(np.asarray(record["stale_cosine"])[~sampled]))
  assert np.all(np.isnan(record["applied_cosine"]))


@pytest.mark.parametrize("cls", [Simulator, SyncSimulator])
def test_diagnostics_with_model_state_raise_at_construction(cls):
  with pytest.raises(ValueError, match="diagnostics.*has_model_state"):
    cls(bn_loss_fn, optax.sgd(0.1), W, has_model_state=True,
        diagnostics=True)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(diagnostics_every=0), ValueError, "diagnostics_every"),
    (dict(diagnostics="yes"), TypeError, "diagnostics"),
    (dict(diagnostics=True, first_transform="dc"), TypeError,
     "first_transform"),
])
def test_bad_diagnostic_arguments_raise(kwargs, error, match):
  with pytest.raises(error, match=match):
    Simulator(loss_fn, optax.sgd(0.1), W, **kwargs)


@pytest.mark.parametrize("first,match", [
    (None, "need `first_transform`"),
    (optax.scale_by_adam(), "not found"),
])
def test_missing_applied_direction_raises_before_running(first, match):
  _, tx = dc_chain(2.0)
  sim = Simulator(loss_fn, tx, diagnostics=True, first_transform=first)
  state = sim.init(init_params())
  with pytest.raises(ValueError, match=match):
    sim.replay(state, make_batches(4), schedules.cyclic(W, 4))
  assert not state.params["w1"].is_deleted()


# The library's full optimizers, each with the compensation that starts its
# chain built by hand (as a user of the chain would pass it).
SHIPPED = {
    "dcasgd": (lambda: dcasgd_optax.dcasgd(0.2, W, lambda_=4.0),
               lambda: dcasgd_optax.delay_compensation(W, 4.0, adaptive=True)),
    "gap_aware_asgd": (lambda: dcasgd_optax.gap_aware_asgd(0.2, W),
                      lambda: dcasgd_optax.gap_aware(W, 0.2)),
    "dana_dcasgd": (lambda: dcasgd_optax.dana_dcasgd(0.2, W, lambda_=4.0),
                lambda: dcasgd_optax.delay_compensation(W, 4.0,
                                                        adaptive=True)),
    "delayed_nesterov_dcasgd": (
        lambda: dcasgd_optax.delayed_nesterov_dcasgd(0.2, W, lambda_=4.0),
        lambda: dcasgd_optax.delay_compensation(W, 4.0, adaptive=True)),
    "secant_dcasgd": (
        lambda: dcasgd_optax.secant_dcasgd(0.2, W, lambda_=1.0),
        lambda: dcasgd_optax.secant_compensation(W, 1.0)),
    "delayed_nesterov_secant_dcasgd": (
        lambda: dcasgd_optax.delayed_nesterov_secant_dcasgd(
            0.2, W, lambda_=1.0),
        lambda: dcasgd_optax.secant_compensation(W, 1.0)),
}


@pytest.mark.parametrize("make, first", SHIPPED.values(), ids=SHIPPED)
def test_every_shipped_optimizer_needs_no_first_transform(make, first):
  """Diagnostics of a full optimizer with no extra argument equal those
  with its compensation passed by hand, and the compensation acts."""
  arrivals, batches = random_order(W, A, seed=2), make_batches(A)
  runs = []
  for kwargs in ({}, {"first_transform": first()}):
    sim = Simulator(loss_fn, make(), diagnostics_every=2, strategy="compiled",
                    **kwargs)
    runs.append(sim.replay(sim.init(init_params()), batches, arrivals)[1])
  got, want = runs
  for key in KEYS:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  stale = np.asarray(got["stale_error"])[W::2]
  assert not np.allclose(np.asarray(got["applied_error"])[W::2], stale)


def test_sampling_follows_the_server_step_across_replays():
  """Replaying in pieces (as train.py does once per epoch) samples the same
  arrivals, with the same figures, as one replay: ``every`` counts server
  steps, not arrivals of the call."""
  arrivals, batches = random_order(W, A, seed=3), make_batches(A)
  dc, tx = dc_chain(2.0)
  sim = Simulator(loss_fn, tx, diagnostics_every=3, first_transform=dc,
                  strategy="compiled")
  _, whole = sim.replay(sim.init(init_params()), batches, arrivals)
  state, pieces = sim.init(init_params()), []
  for lo in range(0, A, 4):  # 4 arrivals a call, one program
    hi = lo + 4
    state, record = sim.replay(
        state, jax.tree.map(operator.itemgetter(slice(lo, hi)), batches),
        arrivals[lo:hi])
    pieces.append(record)
  for key in KEYS:
    joined = np.concatenate([np.asarray(r[key]) for r in pieces])
    np.testing.assert_allclose(joined, whole[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  assert np.array_equal(np.isnan(whole["stale_cosine"]), np.arange(A) % 3 != 0)
