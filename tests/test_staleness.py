"""scale_by_staleness (and its alias scale_by_inverse_staleness) under jit,
and bad input."""

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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_divides_by_the_staleness_under_jit_keeping_the_dtype(dtype):
  tx = dcasgd_optax.scale_by_inverse_staleness()
  updates = {"a": jnp.array([1.0, -3.0], dtype), "b": jnp.array(6.0, dtype)}
  step = jax.jit(lambda u, tau: tx.update(u, tx.init(None), staleness=tau)[0])
  rtol = 1e-2 if dtype == jnp.bfloat16 else 1e-6
  for tau in range(6):  # traced: one compiled step for every staleness
    got = step(updates, jnp.int32(tau))
    for name, u in updates.items():
      assert got[name].dtype == u.dtype
      want = np.asarray(u, np.float32) / max(tau, 1)  # a fresh gradient stays
      np.testing.assert_allclose(
          np.asarray(got[name], np.float32), want, rtol=rtol
      )


def test_missing_staleness_is_a_type_error_naming_it():
  tx = dcasgd_optax.scale_by_inverse_staleness()
  with pytest.raises(TypeError, match="`staleness`"):
    tx.update({"w": jnp.ones(2)}, tx.init(None))


def test_negative_concrete_staleness_is_rejected():
  tx = dcasgd_optax.scale_by_inverse_staleness()
  with pytest.raises(ValueError, match="staleness"):
    tx.update({"w": jnp.ones(2)}, tx.init(None), staleness=-1)


@pytest.mark.parametrize("rule", ["inverse", "sqrt", "delay_adaptive"])
def test_traced_negative_staleness_gives_nan_updates(rule):
  tx = dcasgd_optax.scale_by_staleness(rule, num_workers=4)
  step = jax.jit(lambda tau: tx.update({"w": jnp.ones(3)}, tx.init(None),
                                       staleness=tau)[0])
  assert np.isnan(step(jnp.int32(-1))["w"]).all()
  assert np.isfinite(step(jnp.int32(0))["w"]).all()


# --- scale_by_staleness: every rule against its formula ----------------------

RULES = ("inverse", "sqrt", "delay_adaptive")


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_scales_by_its_formula_under_jit(rule):
  n = 4
  tx = dcasgd_optax.scale_by_staleness(rule, num_workers=n)
  updates = {"a": jnp.array([1.0, -3.0]), "b": jnp.array(6.0)}
  step = jax.jit(lambda u, tau: tx.update(u, tx.init(None), staleness=tau)[0])
  for tau in (0, 1, 3, 4, 7, 30):
    got = step(updates, jnp.int32(tau))
    scale = reference.staleness_scale(rule, tau, n)
    for name, u in updates.items():
      np.testing.assert_allclose(got[name], np.asarray(u) * scale, rtol=1e-6)


@hypothesis.settings(helpers.SETTINGS, max_examples=6)
@hypothesis.given(
    spec=helpers.pytree_specs(),
    rule=st.sampled_from(RULES),
    num_workers=st.integers(1, 8),
    staleness=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    seed=st.integers(0, 2**31 - 1),
)
def test_sgd_with_each_rule_matches_reference_over_random_pytrees(
    spec, rule, num_workers, staleness, seed
):
  """Chained before SGD, every leaf moves by -lr * scale(tau) * g."""
  lr = 0.1
  rng = np.random.default_rng(seed)
  tx = optax.chain(
      dcasgd_optax.scale_by_staleness(rule, num_workers=num_workers),
      optax.sgd(lr),
  )
  w = helpers.random_tree(rng, spec)
  state = tx.init(w)
  step = jax.jit(lambda g, s, tau: tx.update(g, s, staleness=tau))
  want = helpers.leaves_np(w)
  for tau in staleness:
    g = helpers.random_tree(rng, spec)
    updates, state = step(g, state, jnp.int32(tau))
    w = optax.apply_updates(w, updates)
    scale = reference.staleness_scale(rule, tau, num_workers)
    want = [x - lr * scale * gi for x, gi in zip(want, helpers.leaves_np(g))]
    helpers.assert_close_to_reference(w, want, f"staleness {tau}")


def test_inverse_alias_gives_identical_results():
  alias = dcasgd_optax.scale_by_inverse_staleness()
  rule = dcasgd_optax.scale_by_staleness("inverse")
  updates = {"w": jnp.linspace(-1.0, 1.0, 5)}
  for tau in range(5):
    a, _ = alias.update(updates, alias.init(None), staleness=tau)
    b, _ = rule.update(updates, rule.init(None), staleness=tau)
    assert a["w"].tobytes() == b["w"].tobytes()
  assert (
      dcasgd_optax.ScaleByInverseStalenessState
      is dcasgd_optax.ScaleByStalenessState
  )


def test_delay_adaptive_keeps_the_full_step_up_to_n_workers():
  tx = dcasgd_optax.scale_by_staleness("delay_adaptive", num_workers=8)
  u = {"w": jnp.ones(1)}
  scales = [float(tx.update(u, tx.init(None), staleness=t)[0]["w"][0])
            for t in (0, 8, 16)]
  np.testing.assert_allclose(scales, [1.0, 1.0, 0.5])


def test_unknown_rule_lists_the_valid_ones():
  with pytest.raises(
      ValueError, match="`rule` must be one of 'inverse', 'sqrt'"
  ):
    dcasgd_optax.scale_by_staleness("linear")


def test_delay_adaptive_needs_num_workers():
  with pytest.raises(ValueError, match="`num_workers` is required"):
    dcasgd_optax.scale_by_staleness("delay_adaptive")
  with pytest.raises(ValueError, match="`num_workers`"):
    dcasgd_optax.scale_by_staleness("delay_adaptive", num_workers=0)
