"""The library against an independent NumPy parameter server, and exact identities.

The reference (tests/_reference.py) is written from the paper alone. Every
comparison runs the library under ``jit`` over random pytrees, random worker
orders and random gradients (float32 in the library, float64 in the
reference).
"""

from __future__ import annotations

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dcasgd_optax
import _reference  # tests/_reference.py (pytest puts tests/ on sys.path)

SETTINGS = hypothesis.settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)

# Pytree layouts: (number of leaves, how to arrange a list of leaves).
LAYOUTS = (
    (1, lambda ls: {"w": ls[0]}),
    (3, lambda ls: {"dense": {"kernel": ls[0], "bias": ls[1]}, "scale": ls[2]}),
    (4, lambda ls: [ls[0], (ls[1], {"z": ls[2]}), ls[3]]),
)
SHAPES = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


@st.composite
def pytree_specs(draw):
  """A (layout, leaf shapes) pair describing a random params pytree."""
  layout = draw(st.sampled_from(range(len(LAYOUTS))))
  n, _ = LAYOUTS[layout]
  shapes = draw(st.lists(SHAPES, min_size=n, max_size=n))
  return layout, shapes


def build(spec, leaves):
  return LAYOUTS[spec[0]][1](list(leaves))


def random_tree(rng, spec):
  """A float32 NumPy pytree; the reference sees its leaves in flatten order."""
  return build(
      spec, [rng.standard_normal(shape).astype(np.float32) for shape in spec[1]]
  )


def leaves_np(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_close_to_reference(lib_tree, ref_leaves, what):
  for got, want in zip(leaves_np(lib_tree), ref_leaves, strict=True):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=what)


def assert_bitwise_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes(), (x, y)


@st.composite
def user_pull_runs(draw):
  num_workers = draw(st.integers(1, 4))
  events = draw(
      st.lists(
          st.tuples(
              st.sampled_from(["pull", "push", "push"]),
              st.integers(0, num_workers - 1),
          ),
          min_size=1,
          max_size=16,
      )
  )
  return num_workers, events


@SETTINGS
@hypothesis.given(
    spec=pytree_specs(),
    run=user_pull_runs(),
    adaptive=st.booleans(),
    lambda_=st.sampled_from([0.0, 0.04, 0.5, 2.0]),
    decay=st.sampled_from([0.0, 0.5, 0.95]),
    eps=st.sampled_from([1e-7, 1e-3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_delay_compensation_with_user_pulls_matches_reference_server(
    spec, run, adaptive, lambda_, decay, eps, seed
):
  num_workers, events = run
  lr = 0.05
  rng = np.random.default_rng(seed)
  w0 = random_tree(rng, spec)
  ref = _reference.ParameterServer(
      leaves_np(w0), num_workers, lambda_, adaptive=adaptive, decay=decay, eps=eps,
      learning_rate=lr,
  )
  tx = optax.chain(
      dcasgd_optax.delay_compensation(
          num_workers, lambda_, adaptive=adaptive, decay=decay, eps=eps
      ),
      optax.sgd(lr),
  )
  push = jax.jit(lambda g, s, p, m: tx.update(g, s, p, worker=m))
  pull = jax.jit(dcasgd_optax.record_pull)
  params = jax.tree.map(jnp.asarray, w0)
  state = tx.init(params)
  for i, (kind, m) in enumerate(events):
    if kind == "pull":
      ref.pull(m)
      state = pull(state, params, m)
    else:
      g = random_tree(rng, spec)
      want = ref.push(leaves_np(g), m)
      updates, state = push(g, state, params, m)
      assert_close_to_reference(updates, want, f"updates at event {i}")
      params = optax.apply_updates(params, updates)
    assert_close_to_reference(params, ref.w, f"params after event {i}")
  for m in range(num_workers):
    held = dcasgd_optax.worker_params(state[0], m)
    assert_close_to_reference(held, ref.backup[m], f"backup of worker {m}")
  if adaptive:
    assert_close_to_reference(state[0].mean_square, ref.mean_square, "ms")


@st.composite
def sgd_configs(draw, weight_decay=True):
  momentum = draw(st.sampled_from([None, 0.5, 0.9]))
  nesterov = momentum is not None and draw(st.booleans())
  return dict(
      momentum=momentum,
      nesterov=nesterov,
      weight_decay=draw(st.sampled_from([0.0, 1e-2])) if weight_decay else 0.0,
  )


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
  ref = _reference.ParameterServer(
      leaves_np(w0), num_workers, lambda_, adaptive=adaptive, learning_rate=lr,
      **sgd,
  )
  tx = dcasgd_optax.dcasgd(
      lr, num_workers, lambda_=lambda_, adaptive=adaptive, **sgd
  )

  @jax.jit
  def step(params, state, g, m):
    updates, state = tx.update(g, state, params, worker=m)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.asarray, w0)
  state = tx.init(params)
  for i, m in enumerate(order):
    g = random_tree(rng, spec)
    ref.push(leaves_np(g), m)
    ref.pull(m)
    params, state = step(params, state, g, m)
    assert_close_to_reference(params, ref.w, f"params after push {i}")
  for m in range(num_workers):
    held = dcasgd_optax.worker_params(state, m)
    assert_close_to_reference(held, ref.backup[m], f"backup of worker {m}")


def test_reference_server_compensates_a_stale_gradient_by_hand():
  """Pins the reference itself to the paper's formula on a hand-worked case."""
  ref = _reference.ParameterServer([np.array([1.0, 2.0])], 2, 0.5, learning_rate=0.1)
  ref.pull(1)  # worker 1 holds [1, 2]
  ref.push([np.array([1.0, 1.0])], 0)  # w -> [0.9, 1.9]
  step = ref.push([np.array([2.0, 1.0])], 1)  # stale by one push
  # g + 0.5 * g * g * (w - backup[1]) = [2 + 0.5*4*(-0.1), 1 + 0.5*1*(-0.1)]
  np.testing.assert_allclose(step[0], -0.1 * np.array([1.8, 0.95]))


# Gradients for the identities: any finite float32, including -0.0 and tiny
# values, kept small enough that g * g stays finite.
def grad_arrays(shape):
  return hnp.arrays(
      np.float32, shape, elements=st.floats(-1e3, 1e3, width=32)
  )


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
  dc = dcasgd_optax.dcasgd(0.1, num_workers, lambda_=0.0, adaptive=adaptive, **sgd)
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
    num_workers=st.integers(1, 4),
    adaptive=st.booleans(),
    events=st.lists(
        st.tuples(st.sampled_from(["pull", "push"]), st.integers(0, 3)),
        min_size=1,
        max_size=8,
    ),
    seed=st.integers(0, 2**31 - 1),
)
def test_zero_lambda_delay_compensation_passes_gradients_through_bitwise(
    num_workers, adaptive, events, seed
):
  """With user-driven pulls too: chain(dc(lambda_=0), sgd) is sgd, bit for bit."""
  rng = np.random.default_rng(seed)
  tx = optax.chain(
      dcasgd_optax.delay_compensation(num_workers, 0.0, adaptive=adaptive),
      optax.sgd(0.1, momentum=0.9),
  )
  plain = optax.sgd(0.1, momentum=0.9)
  params = {"a": jnp.ones((2, 3)), "b": jnp.zeros(4)}
  state, plain_state = tx.init(params), plain.init(params)
  step = jax.jit(lambda g, s, p, m: tx.update(g, s, p, worker=m))
  plain_step = jax.jit(plain.update)
  for kind, m in events:
    m = m % num_workers
    if kind == "pull":
      state = dcasgd_optax.record_pull(state, params, m)
      continue
    g = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params
    )
    updates, state = step(g, state, params, m)
    plain_updates, plain_state = plain_step(g, plain_state, params)
    assert_bitwise_equal(updates, plain_updates)
    params = optax.apply_updates(params, updates)


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
  """num_workers=1: backup == w at every push, so the compensation term is zero."""
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
