"""record_pull and worker_params: what they refuse, and a pull costs one slice.

A traced out-of-range worker cannot raise inside ``jit``: ``record_pull`` then
writes nothing. With the state donated, a pull reads the new params and
read-modify-writes one backup, whatever the number of workers (XLA's own
accounting, no timing).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax
from helpers import FEW_WORKERS
from helpers import MANY_WORKERS
from helpers import NUM_WORKERS
from helpers import WIDE_MODEL_BYTES
from helpers import backup_copies
from helpers import builders
from helpers import cost_analysis
from helpers import params_tree
from helpers import snapshot
from helpers import stale_state
from helpers import wide_params


def test_pull_helpers_need_a_delay_compensation_state():
  params = params_tree()
  state = optax.sgd(0.1).init(params)
  with pytest.raises(ValueError, match="no DelayCompensationState"):
    dcasgd_optax.record_pull(state, params, 0)
  with pytest.raises(ValueError, match="no DelayCompensationState"):
    dcasgd_optax.worker_params(state, 0)
  two = dcasgd_optax.delay_compensation(2).init(params)
  with pytest.raises(ValueError, match="exactly one"):
    dcasgd_optax.worker_params((two, two), 0)


@builders
@pytest.mark.parametrize("worker", [NUM_WORKERS, -1])
def test_traced_out_of_range_record_pull_writes_nothing(build, worker):
  tx, params = build(), params_tree()
  state = stale_state(tx, params, first=1)
  before = snapshot(state)
  pulled = jax.tree.map(lambda p: p + 100.0, params)
  new_state = jax.jit(dcasgd_optax.record_pull)(state, pulled, worker)
  chex.assert_trees_all_equal(new_state, before)
  # The same jitted call with a valid id does write (the check can fail).
  written = jax.jit(dcasgd_optax.record_pull)(state, pulled, NUM_WORKERS - 1)
  held = dcasgd_optax.worker_params(written, NUM_WORKERS - 1)
  np.testing.assert_array_equal(held["w"], pulled["w"])


def test_donated_record_pull_alone_writes_one_slice():
  def compile_pull(num_workers):
    state = dcasgd_optax.delay_compensation(num_workers).init(wide_params())
    jitted = jax.jit(dcasgd_optax.record_pull, donate_argnums=0)
    compiled = jitted.lower(state, wide_params(), jnp.int32(0)).compile()
    return compiled, cost_analysis(compiled)["bytes accessed"]

  (_, small_bytes), (large, large_bytes) = map(compile_pull, (FEW_WORKERS, MANY_WORKERS))
  assert abs(large_bytes - small_bytes) < 0.1 * WIDE_MODEL_BYTES
  # Reading the new params, then one slice read-modify-written: about three
  # models' worth, against MANY_WORKERS models for a copy of the backups.
  assert large_bytes < 4 * WIDE_MODEL_BYTES
  assert backup_copies(large, MANY_WORKERS) == []
