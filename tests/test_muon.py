"""Muon (optax.contrib.muon) as the optimizer after the compensation.

optax 0.2.8 (both the JAX 0.10 and the JAX 0.12 environments) ships
``optax.contrib.muon``; older optax may not, so the test is skipped there.
The reference compensates in NumPy (g + lambda * g * g * (w - backup[m]),
the backup refreshed after each push) and hands the result to a plain muon.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax

import helpers

muon = getattr(getattr(optax, "contrib", None), "muon", None)
pytestmark = pytest.mark.skipif(
    muon is None, reason="optax.contrib.muon is not in this optax")


def test_compensation_composes_with_muon_as_the_inner_optimizer():
  num_workers, lam, lr = 3, 0.5, 0.02
  params = {"kernel": jnp.arange(12.0).reshape(3, 4) / 12,  # muon's matrix
            "bias": jnp.ones(4)}  # muon's AdamW fallback
  tx = dcasgd_optax.pull_after_push(optax.chain(
      dcasgd_optax.delay_compensation(num_workers, lam), muon(lr)))
  plain = muon(lr)
  step = jax.jit(helpers.update_step(tx))
  state, plain_state = tx.init(params), plain.init(params)
  w = params
  backups = [jax.tree.map(np.asarray, params)] * num_workers
  for k, m in enumerate([0, 1, 2, 2, 0, 1]):
    g = helpers.grads_like(params, k)
    g_dc = jax.tree.map(
        lambda gi, wi, bi: np.asarray(gi) + lam * np.asarray(gi) ** 2
        * (np.asarray(wi) - bi), g, w, backups[m])
    updates, plain_state = plain.update(
        jax.tree.map(jnp.asarray, g_dc), plain_state, w)
    w = optax.apply_updates(w, updates)
    backups[m] = jax.tree.map(np.asarray, w)
    params, state = step(params, state, g, m)
    for key in w:
      np.testing.assert_allclose(params[key], w[key], rtol=1e-5, atol=1e-6)
  for m in range(num_workers):
    held = dcasgd_optax.worker_params(state, m)
    for key in w:
      np.testing.assert_allclose(held[key], backups[m][key], rtol=1e-5,
                                 atol=1e-6)
  # The compensation did act: with lambda_ = 0 the run ends elsewhere.
  off = dcasgd_optax.pull_after_push(optax.chain(
      dcasgd_optax.delay_compensation(num_workers, 0.0), muon(lr)))
  step_off = jax.jit(helpers.update_step(off))
  p_off, s_off = {"kernel": jnp.arange(12.0).reshape(3, 4) / 12,
                  "bias": jnp.ones(4)}, None
  s_off = off.init(p_off)
  for k, m in enumerate([0, 1, 2, 2, 0, 1]):
    p_off, s_off = step_off(p_off, s_off, helpers.grads_like(p_off, k), m)
  assert np.max(np.abs(p_off["kernel"] - params["kernel"])) > 1e-4
