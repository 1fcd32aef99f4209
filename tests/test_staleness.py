"""scale_by_inverse_staleness: u / max(tau, 1) under jit, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dcasgd_optax


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
      np.testing.assert_allclose(np.asarray(got[name], np.float32), want, rtol=rtol)


def test_missing_staleness_is_a_type_error_naming_it():
  tx = dcasgd_optax.scale_by_inverse_staleness()
  with pytest.raises(TypeError, match="`staleness`"):
    tx.update({"w": jnp.ones(2)}, tx.init(None))


def test_negative_concrete_staleness_is_rejected():
  tx = dcasgd_optax.scale_by_inverse_staleness()
  with pytest.raises(ValueError, match="staleness"):
    tx.update({"w": jnp.ones(2)}, tx.init(None), staleness=-1)
