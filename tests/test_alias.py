"""dcasgd and pull_after_push: the reference server, identities, bad input.

``dcasgd`` with pull-after-push against the NumPy reference server
(tests/reference.py, written from the paper alone), and the identities that
must hold bit for bit: lambda_=0 is plain ASGD, one worker is sequential SGD.
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

from helpers import NUM_WORKERS
from helpers import SETTINGS
from helpers import assert_bitwise_equal
from helpers import assert_close_to_reference
from helpers import grad_arrays
from helpers import leaves_np
from helpers import pytree_specs
from helpers import random_tree
from helpers import replay_against_reference
from helpers import sgd_configs
import reference  # tests/reference.py (pytest puts tests/ on sys.path)


@SETTINGS
@hypothesis.given(
    spec=pytree_specs(),
    num_workers=st.integers(1, 4),
    data=st.data(),
    adaptive=st.booleans(),
    lambda_=st.sampled_from([0.04, 0.5, 2.0]),
    sgd=sgd_configs(),
    scheduled=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_dcasgd_matches_reference_server_with_pull_after_push(
    spec, num_workers, data, adaptive, lambda_, sgd, scheduled, seed
):
  order = data.draw(
      st.lists(st.integers(0, num_workers - 1), min_size=1, max_size=16),
      label="worker order",
  )
  lr = (lambda t: 0.05 / (1.0 + 0.5 * t)) if scheduled else 0.05
  rng = np.random.default_rng(seed)
  w0 = random_tree(rng, spec)
  ref = reference.ParameterServer(
      leaves_np(w0),
      num_workers,
      lambda_,
      adaptive=adaptive,
      learning_rate=lr,
      **sgd,
  )
  tx = dcasgd_optax.dcasgd(
      lr, num_workers, lambda_=lambda_, adaptive=adaptive, **sgd
  )

  _, state = replay_against_reference(tx, ref, w0, order, rng, spec)
  for m in range(num_workers):
    held = dcasgd_optax.worker_params(state, m)
    assert_close_to_reference(held, ref.backup[m], f"backup of worker {m}")


@SETTINGS
@hypothesis.given(
    num_workers=st.integers(1, 4),
    adaptive=st.booleans(),
    sgd=sgd_configs(weight_decay=False),
    data=st.data(),
)
def test_zero_lambda_is_plain_asgd(num_workers, adaptive, sgd, data):
  """lambda_=0: dcasgd's updates are bitwise those of optax.sgd alone."""
  sgd = {k: v for k, v in sgd.items() if k != "weight_decay"}
  steps = data.draw(
      st.lists(
          st.tuples(st.integers(0, num_workers - 1), grad_arrays((3,))),
          min_size=1,
          max_size=6,
      )
  )
  dc = dcasgd_optax.dcasgd(
      0.1, num_workers, lambda_=0.0, adaptive=adaptive, **sgd
  )
  plain = optax.sgd(0.1, **sgd)
  dc_step = jax.jit(lambda g, s, p, m: dc.update(g, s, p, worker=m))
  plain_step = jax.jit(plain.update)
  params = {"w": jnp.array([0.5, -1.0, 2.0])}
  dc_state, plain_state = dc.init(params), plain.init(params)
  for m, g in steps:
    g = {"w": jnp.asarray(g)}
    dc_updates, dc_state = dc_step(g, dc_state, params, m)
    plain_updates, plain_state = plain_step(g, plain_state, params)
    assert_bitwise_equal(dc_updates, plain_updates)
    params = optax.apply_updates(params, plain_updates)


@SETTINGS
@hypothesis.given(
    adaptive=st.booleans(),
    lambda_=st.sampled_from([0.04, 1.0, 2.0, 100.0]),
    sgd=sgd_configs(),
    grads=st.lists(grad_arrays((2, 2)), min_size=1, max_size=6),
)
def test_single_worker_with_pull_after_push_is_sequential_sgd(
    adaptive, lambda_, sgd, grads
):
  """num_workers=1: backup == w at every push, so the compensation is zero."""
  dc = dcasgd_optax.dcasgd(0.1, 1, lambda_=lambda_, adaptive=adaptive, **sgd)
  plain = optax.chain(
      optax.add_decayed_weights(sgd["weight_decay"]),
      optax.sgd(0.1, momentum=sgd["momentum"], nesterov=sgd["nesterov"]),
  )

  def stepper(tx, **kw):
    @jax.jit
    def step(params, state, g):
      updates, state = tx.update(g, state, params, **kw)
      return optax.apply_updates(params, updates), state

    return step

  dc_step, plain_step = stepper(dc, worker=0), stepper(plain)
  dc_params = plain_params = {"w": jnp.array([[1.0, -2.0], [0.0, 3.0]])}
  dc_state, plain_state = dc.init(dc_params), plain.init(plain_params)
  for g in grads:
    g = {"w": jnp.asarray(g)}
    dc_params, dc_state = dc_step(dc_params, dc_state, g)
    plain_params, plain_state = plain_step(plain_params, plain_state, g)
    np.testing.assert_array_equal(dc_params["w"], plain_params["w"])
    np.testing.assert_array_equal(
        dcasgd_optax.worker_params(dc_state, 0)["w"], dc_params["w"]
    )


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.5), "momentum"),
        (dict(weight_decay=-1e-4), "weight_decay"),
        (dict(learning_rate=-0.1), "learning_rate"),
    ],
)
def test_dcasgd_rejects_bad_sgd_arguments(kwargs, name):
  kwargs = {"learning_rate": 0.1, **kwargs}
  with pytest.raises(ValueError, match=f"`{name}`"):
    dcasgd_optax.dcasgd(num_workers=2, **kwargs)


def test_nesterov_without_momentum_is_rejected():
  with pytest.raises(ValueError, match="nesterov"):
    dcasgd_optax.dcasgd(0.1, NUM_WORKERS, nesterov=True)


def test_pull_after_push_without_delay_compensation_fails_at_init():
  tx = dcasgd_optax.pull_after_push(optax.sgd(0.1))
  with pytest.raises(ValueError, match="delay_compensation"):
    tx.init({"w": jnp.zeros(2)})


@pytest.mark.parametrize(
    "old, new",
    [("gap_aware_sgd", "gap_aware_asgd"), ("dana_dc", "dana_dcasgd")],
)
def test_old_names_are_deprecated_aliases(old, new):
  """One naming scheme (every full optimizer's name ends in ``asgd``); the
  old names still work for one release, with a DeprecationWarning, and are
  not part of the public API."""
  with pytest.warns(DeprecationWarning, match=f"dcasgd_optax.{new}"):
    fn = getattr(dcasgd_optax, old)
  assert fn is getattr(dcasgd_optax, new)
  assert old not in dcasgd_optax.__all__ and new in dcasgd_optax.__all__
  with pytest.raises(AttributeError, match="no_such_name"):
    _ = dcasgd_optax.no_such_name
