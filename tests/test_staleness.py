"""scale_by_inverse_staleness: bad input."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import dcasgd_optax


def test_negative_concrete_staleness_is_rejected():
  tx = dcasgd_optax.scale_by_inverse_staleness()
  with pytest.raises(ValueError, match="staleness"):
    tx.update({"w": jnp.ones(2)}, tx.init(None), staleness=-1)
