"""What several test files share: pytrees, optimizer states, comparisons.

Tree comparisons use chex (``chex.assert_trees_all_close`` and
``chex.assert_trees_all_equal``); what is here is what chex does not do. Only
the public API of ``dcasgd_optax`` is used: the DelayCompensationState is
found by walking an optimizer state for instances of the public class.
"""

from __future__ import annotations

import re

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax

NUM_WORKERS = 3

# --- pytrees ----------------------------------------------------------------


def shifted(params, by):
  return jax.tree.map(lambda p: (p + by).astype(p.dtype), params)


def grads_like(params, seed):
  key = jax.random.key(seed)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef,
      [
          jax.random.normal(k, p.shape).astype(p.dtype)
          for k, p in zip(keys, leaves)
      ],
  )


def params_tree():
  """A two-leaf model, small enough for every bad-input case."""
  return {"w": jnp.arange(4.0).reshape(2, 2), "b": jnp.array([1.0, -1.0])}


# --- optimizer states -------------------------------------------------------


def _is_dc_state(x):
  return isinstance(x, dcasgd_optax.DelayCompensationState)


def find_dc_states(opt_state):
  """Every DelayCompensationState nested in ``opt_state``, in tree order."""
  return [
      s
      for s in jax.tree.leaves(opt_state, is_leaf=_is_dc_state)
      if _is_dc_state(s)
  ]


def dc_state(opt_state):
  """The one DelayCompensationState nested in ``opt_state``."""
  (state,) = find_dc_states(opt_state)
  return state


def update_step(tx):
  """The step a user jits: one update of params by ``tx`` from ``worker``."""

  def step(params, state, grads, worker):
    updates, state = tx.update(grads, state, params, worker=worker)
    return optax.apply_updates(params, updates), state

  return step


def stale_state(tx, params, first=0):
  """A state where worker m holds an older model: params - 0.1 * (m + first)."""
  state = tx.init(params)
  for m in range(NUM_WORKERS):
    state = dcasgd_optax.record_pull(
        state, shifted(params, -0.1 * (m + first)), m
    )
  return state


# Ways to build a transformation holding backups for NUM_WORKERS workers.
BUILDERS = {
    "delay_compensation": lambda: dcasgd_optax.delay_compensation(
        NUM_WORKERS, 0.5
    ),
    "delay_compensation_a": lambda: dcasgd_optax.delay_compensation(
        NUM_WORKERS, 2.0, adaptive=True
    ),
    "dcasgd": lambda: dcasgd_optax.dcasgd(0.1, NUM_WORKERS, momentum=0.9),
    "pull_after_push": lambda: dcasgd_optax.pull_after_push(
        optax.chain(
            dcasgd_optax.delay_compensation(NUM_WORKERS), optax.adam(0.1)
        )
    ),
}
builders = pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS)

# --- comparisons ------------------------------------------


def snapshot(tree):
  """Host copies of the leaves, to compare a donated tree with afterwards."""
  return jax.tree.map(np.array, tree)


def assert_bitwise_equal(a, b):
  """Same dtypes, shapes and bytes: tells -0.0 from 0.0, unlike ==."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes(), (x, y)


def assert_same_updates_bitwise(tx, want_tx, params, num_steps=4):
  """``tx`` and ``want_tx`` turn the same gradients into the same updates."""
  state, want_state = tx.init(params), want_tx.init(params)
  for seed in range(num_steps):
    g = grads_like(params, seed)
    got, state = tx.update(g, state)
    want, want_state = want_tx.update(g, want_state)
    assert_bitwise_equal(got, want)


def leaves_np(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_close_to_reference(lib_tree, ref_leaves, what):
  """A library pytree (float32) against the reference's float64 leaves."""
  for got, want in zip(leaves_np(lib_tree), ref_leaves, strict=True):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=what)


def replay_against_reference(
    tx, ref, w0, order, rng, spec, *, check_pulls=False
):
  """Workers push random gradients in ``order``, each pulling right after.

  ``tx`` (pulling after push, under ``jit``) and the reference server ``ref``
  see the same gradients; params must agree after every push, and with
  ``check_pulls`` so must what the pushing worker now holds. Returns the
  library's final (params, opt_state).
  """
  step = jax.jit(update_step(tx))
  params = jax.tree.map(jnp.asarray, w0)
  state = tx.init(params)
  for i, m in enumerate(order):
    g = random_tree(rng, spec)
    ref.push(leaves_np(g), m)
    ref.pull(m)
    params, state = step(params, state, g, jnp.int32(m))
    assert_close_to_reference(params, ref.w, f"params after push {i}")
    if check_pulls:
      assert_close_to_reference(
          dcasgd_optax.worker_params(state, m), ref.backup[m], f"pull {i}"
      )
  return params, state


# --- hypothesis: random pytrees and SGD settings -----------------------------

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


def random_tree(rng, spec):
  """A float32 NumPy pytree; the reference sees its leaves in flatten order."""
  leaves = [rng.standard_normal(shape).astype(np.float32) for shape in spec[1]]
  return LAYOUTS[spec[0]][1](leaves)


@st.composite
def sgd_configs(draw, weight_decay=True):
  momentum = draw(st.sampled_from([None, 0.5, 0.9]))
  nesterov = momentum is not None and draw(st.booleans())
  return dict(
      momentum=momentum,
      nesterov=nesterov,
      weight_decay=draw(st.sampled_from([0.0, 1e-2])) if weight_decay else 0.0,
  )


def grad_arrays(shape):
  """Any finite float32, including -0.0 and tiny values, kept small enough
  that g * g stays finite."""
  return hnp.arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, width=32))


# --- XLA's own accounting of a compiled step ---------------------------------

# Two worker counts: what a step reads, writes or allocates must not grow
# from the first to the second.
FEW_WORKERS, MANY_WORKERS = 2, 16


def wide_params():
  """A model large enough that a copy of it shows in XLA's byte counts."""
  return {"kernel": jnp.zeros((128, 256)), "bias": jnp.zeros(256)}


WIDE_MODEL_BYTES = sum(x.nbytes for x in jax.tree.leaves(wide_params()))


def cost_analysis(compiled):
  """The compiled program's cost dict (JAX versions return it or [it])."""
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def backup_copies(compiled, num_workers):
  """HLO `copy` instructions whose result has a leading num_workers axis."""
  pattern = re.compile(rf"= \w+\[{num_workers},[^\]]*\]\S* copy\(")
  return [
      line for line in compiled.as_text().splitlines() if pattern.search(line)
  ]


# --- a small regression problem for the harness -------------------------------

W = 4  # workers
A = 24  # arrivals
XS = jax.random.normal(jax.random.key(0), (64, 3))
YS = jnp.sin(XS @ jnp.array([1.0, -2.0, 0.5]))
STRATEGIES = ("compiled", "host_chunks")
REPLAY_TOL = dict(rtol=2e-5, atol=2e-5)  # float32 replays against Python loops


def loss_fn(params, idx):
  """A tiny tanh network on closed-over data; ``idx`` picks the batch."""
  h = jnp.tanh(XS[idx] @ params["w1"] + params["b1"][None])
  return jnp.mean((h @ params["w2"] - YS[idx]) ** 2)


def bn_loss_fn(params, model_state, idx):
  """The network with a batch-norm layer: train-mode stats, EMA of the mean."""
  z = XS[idx] @ params["w1"]
  mean, var = jnp.mean(z, axis=0), jnp.var(z, axis=0)
  z = (z - mean[None]) / jnp.sqrt(var[None] + 1e-5)
  h = jnp.tanh(z + params["b1"][None])
  loss = jnp.mean((h @ params["w2"] - YS[idx]) ** 2)
  new_state = {
      "mean": 0.9 * model_state["mean"] + 0.1 * mean,
      "count": model_state["count"] + 1,
  }
  return loss, new_state


def init_params():
  k1, k2 = jax.random.split(jax.random.key(1))
  return {
      "w1": 0.5 * jax.random.normal(k1, (3, 5)),
      "b1": jnp.zeros((5,)),
      "w2": 0.5 * jax.random.normal(k2, (5,)),
  }


def init_model_state():
  return {"mean": jnp.zeros((5,)), "count": jnp.zeros((), jnp.int32)}


def make_batches(num, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (num, 8)))


def random_order(num_workers, num, seed):
  rng = np.random.default_rng(seed)
  return rng.integers(0, num_workers, num).astype(np.int32)
