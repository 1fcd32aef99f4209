"""The exact Taylor compensation and the curvature diagnostic, against a
NumPy loop on a quadratic and a plain JAX loop (full Hessian) on a tiny net."""

import os
import subprocess
import sys
import textwrap

import jax
from jax.flatten_util import ravel_pytree
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
DIM = 3
_RNG = np.random.default_rng(0)
_Q = _RNG.normal(size=(8, DIM, DIM))
# Per-batch quadratics L_b(w) = 1/2 (w - c_b)' H_b (w - c_b), H_b SPD.
HS = np.einsum("bij,bkj->bik", _Q, _Q) / DIM + 0.2 * np.eye(DIM)
CS = _RNG.normal(size=(8, DIM))


def quadratic_loss(params, b):
  e = params["w"] - jnp.asarray(CS, jnp.float32)[b]
  return 0.5 * e @ (jnp.asarray(HS, jnp.float32)[b] @ e)


def numpy_loop(lambda_, arrivals, batches, lr, momentum, num_workers):
  """One arrival at a time: g at the worker's model, plus lambda H (w - w_m),
  then SGD with heavy-ball momentum (optax's trace: v = g + mu v)."""
  w = np.zeros(DIM)
  held = np.zeros((num_workers, DIM))
  v = np.zeros(DIM)
  for m, b in zip(arrivals, batches):
    g = HS[b] @ (held[m] - CS[b])
    g = g + lambda_ * HS[b] @ (w - held[m])
    v = g + momentum * v
    w = w - lr * v
    held[m] = w
  return w


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("lambda_, momentum", [(1.0, 0.0), (0.5, 0.9)])
def test_exact_compensation_matches_a_numpy_loop_on_a_quadratic(
    lambda_, momentum, strategy):
  arrivals = random_order(W, A, seed=2)
  batches = np.random.default_rng(3).integers(0, 8, A)
  tx = optax.sgd(0.3, momentum=momentum or None)
  sim = Simulator(quadratic_loss, tx, W, exact_compensation=lambda_,
                  strategy=strategy)
  state, _ = sim.replay(sim.init({"w": jnp.zeros(DIM)}), batches, arrivals)
  want = numpy_loop(lambda_, arrivals, batches, 0.3, momentum, W)
  np.testing.assert_allclose(state.params["w"], want, rtol=1e-5, atol=1e-6)


def test_exact_compensation_on_a_quadratic_is_sequential_sgd():
  """g(w_m) + H (w - w_m) = g(w) exactly: delayed workers replay sequential
  SGD on the arrivals' batches; plain ASGD does not."""
  arrivals = schedules.cyclic(W, A)
  batches = np.random.default_rng(3).integers(0, 8, A)
  w0 = {"w": jnp.zeros(DIM)}
  seq = Simulator(quadratic_loss, optax.sgd(0.3), 1)
  want, _ = seq.replay(seq.init(w0), batches, np.zeros(A, np.int32))
  runs = {}
  for lambda_ in (1.0, 0.0):
    sim = Simulator(quadratic_loss, optax.sgd(0.3), W,
                    exact_compensation=lambda_)
    runs[lambda_], _ = sim.replay(sim.init(w0), batches, arrivals)
  np.testing.assert_allclose(runs[1.0].params["w"], want.params["w"],
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(runs[0.0].params["w"], want.params["w"], atol=1e-3)


def test_zero_exact_compensation_is_plain_asgd_bitwise():
  arrivals, batches = random_order(W, A, seed=1), make_batches(A)
  out = []
  for kwargs in ({}, {"exact_compensation": 0.0}):
    sim = Simulator(loss_fn, optax.sgd(0.2), W, **kwargs)
    out.append(sim.replay(sim.init(init_params()), batches, arrivals)[0])
  jax.tree.map(np.testing.assert_array_equal, out[0].params, out[1].params)


def _hessian_loop(lambda_exact, lambda_dc, arrivals, batches):
  """A plain JAX loop over arrivals with the full Hessian of the flattened
  tiny net: exact compensation (``lambda_exact``, or None) into SGD, or
  DC-ASGD-a (``lambda_dc``) and the curvature ratio of its term."""
  flat0, unravel = ravel_pytree(init_params())
  flat_loss = lambda x, b: loss_fn(unravel(x), b)
  grad, hess = jax.jit(jax.grad(flat_loss)), jax.jit(jax.hessian(flat_loss))
  dc = dcasgd_optax.delay_compensation(W, lambda_dc or 0.0, adaptive=True)
  dc_state = dc.init(flat0)
  w, held = flat0, [flat0] * W
  ratios = []
  for k, m in enumerate(np.asarray(arrivals).tolist()):
    b = batches[k]
    g, h, delta = grad(held[m], b), hess(held[m], b), w - held[m]
    if lambda_exact is not None:
      d = g + lambda_exact * h @ delta
    else:
      d, dc_state = dc.update(g, dc_state, w, worker=m)
    ratios.append(float(delta @ (d - g) / (delta @ h @ delta)))
    w = w - 0.2 * d
    held[m] = w
    dc_state = dcasgd_optax.record_pull(dc_state, w, m)
  return unravel(w), np.array(ratios)


@pytest.mark.parametrize("strategy", [
    "compiled", pytest.param("host_chunks", marks=pytest.mark.slow)])
def test_exact_compensation_matches_a_full_hessian_loop_on_a_net(strategy):
  arrivals, batches = random_order(W, A, seed=1), make_batches(A)
  sim = Simulator(loss_fn, optax.sgd(0.2), W, exact_compensation=0.7,
                  strategy=strategy, diagnose_curvature=True)
  state, metrics = sim.replay(sim.init(init_params()), batches, arrivals)
  want, ratios = _hessian_loop(0.7, None, arrivals, batches)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      x, y, rtol=2e-5, atol=2e-5), state.params, want)
  fresh = np.asarray(metrics["staleness"]) == 0
  k = np.asarray(metrics["curvature_ratio"])
  assert np.all(np.isnan(k[fresh]))  # delta = 0: no direction to measure
  np.testing.assert_allclose(k[~fresh], 0.7, rtol=1e-4)
  np.testing.assert_allclose(k[~fresh], ratios[~fresh], rtol=1e-4)


@pytest.mark.parametrize("every", [3, pytest.param(1, marks=pytest.mark.slow)])
def test_curvature_ratio_of_dcasgd_matches_a_full_hessian_loop(every):
  arrivals, batches = random_order(W, A, seed=1), make_batches(A)
  dc = dcasgd_optax.delay_compensation(W, 2.0, adaptive=True)
  tx = dcasgd_optax.pull_after_push(optax.chain(dc, optax.sgd(0.2)))
  sim = Simulator(loss_fn, tx, diagnose_curvature=True, first_transform=dc,
                  diagnostics_every=every)
  state, metrics = sim.replay(sim.init(init_params()), batches, arrivals)
  want, ratios = _hessian_loop(None, 2.0, arrivals, batches)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      x, y, rtol=2e-5, atol=2e-5), state.params, want)
  k = np.asarray(metrics["curvature_ratio"])
  assert k.dtype == np.float32
  measured = (np.arange(A) % every == 0) & ~np.isnan(ratios)
  np.testing.assert_allclose(k[measured], ratios[measured], rtol=2e-3,
                             atol=1e-6)
  assert np.all(np.isnan(k[np.arange(A) % every != 0]))
  assert "stale_cosine" in metrics  # beside the cosines


@pytest.mark.slow
def test_exact_compensation_runs_in_replay_many_as_in_replay():
  arrivals, batches = random_order(W, A, seed=1), make_batches(A)
  sim = Simulator(loss_fn, optax.sgd(0.2), W, exact_compensation=1.0,
                  diagnose_curvature=True)
  starts = [init_params(), jax.tree.map(lambda x: 0.5 * x, init_params())]
  states, record = sim.replay_many(
      sim.init_many(jax.tree.map(lambda *x: jnp.stack(x), *starts)),
      jnp.stack([batches, batches]), arrivals)
  for i, start in enumerate(starts):
    state, alone = sim.replay(sim.init(start), batches, arrivals)
    jax.tree.map(lambda x, y, i=i: np.testing.assert_allclose(
        x[i], y, rtol=1e-5, atol=1e-6), states.params, state.params)
    np.testing.assert_allclose(record["curvature_ratio"][i],
                               alone["curvature_ratio"], rtol=1e-5)


def test_sync_simulator_reports_no_curvature():
  dc = dcasgd_optax.delay_compensation(W, 0.04)
  tx = dcasgd_optax.pull_after_push(optax.chain(dc, optax.sgd(0.2)))
  sim = SyncSimulator(loss_fn, tx, diagnose_curvature=True,
                      first_transform=dc)
  _, metrics = sim.replay(sim.init(init_params()), make_batches(2 * W))
  assert np.all(np.isnan(metrics["curvature_ratio"]))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(exact_compensation=-1.0), ValueError, "exact_compensation"),
    (dict(exact_compensation=True), TypeError, "exact_compensation"),
    (dict(exact_compensation="1"), TypeError, "exact_compensation"),
    (dict(diagnose_curvature=1), TypeError, "diagnose_curvature"),
    # Plain ASGD: no compensation, no curvature estimate to measure.
    (dict(diagnose_curvature=True), ValueError, "diagnose_curvature"),
])
def test_bad_options_raise_when_built(kwargs, error, match):
  with pytest.raises(error, match=match):
    Simulator(loss_fn, optax.sgd(0.1), W, **kwargs)


def test_exact_compensation_refuses_a_model_state():
  with pytest.raises(ValueError, match="exact_compensation.*has_model_state"):
    Simulator(bn_loss_fn, optax.sgd(0.1), W, has_model_state=True,
              exact_compensation=1.0)


def test_curvature_of_a_transformation_without_an_estimate_raises_first():
  """A first transformation that does not read the backups (here Adam's
  scaling) has no curvature estimate: refused before any update."""
  first = optax.scale_by_adam()
  sim = Simulator(loss_fn, optax.chain(first, optax.sgd(0.1)), W,
                  diagnose_curvature=True, first_transform=first)
  state = sim.init(init_params())
  with pytest.raises(ValueError, match="diagnose_curvature.*ScaleByAdamState"):
    sim.replay(state, make_batches(4), [0, 1, 2, 3])
  assert int(state.step) == 0


_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np, optax
    import dcasgd_optax
    from dcasgd_optax.harness import Simulator
    assert len(jax.devices()) == 4
    XS = jax.random.normal(jax.random.key(0), (64, 3))
    loss_fn = lambda p, i: jnp.mean(jnp.tanh(XS[i] @ p["w1"]) @ p["w2"] ** 2)
    params = {"w1": jnp.full((3, 5), 0.3), "w2": jnp.linspace(-1.0, 1.0, 5)}
    # 8 workers: diagnostics with first_transform need the backups' rows a
    # multiple of the device count (padding rows change their shape).
    arrivals = np.random.default_rng(1).integers(0, 8, 30)
    batches = jnp.asarray(np.random.default_rng(0).integers(0, 64, (30, 8)))
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
      dc = dcasgd_optax.delay_compensation(8, 0.0)
      tx = dcasgd_optax.pull_after_push(optax.chain(dc, optax.sgd(0.1)))
      sim = Simulator(loss_fn, tx, devices=devices, exact_compensation=0.8,
                      first_transform=dc, diagnose_curvature=True)
      state, m = sim.replay(sim.init(params), batches, arrivals)
      out.append((state.params, m["curvature_ratio"]))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6), *out)
    print("OK")
""")


@pytest.mark.slow
def test_exact_compensation_on_four_devices_agrees_with_one():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.strip().endswith("OK")
