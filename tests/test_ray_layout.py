"""How dcasgd_optax.ray splits params and optax state over server shards."""

import math

import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("ray")
pytest.importorskip("orbax.checkpoint")

import dcasgd_optax  # pylint: disable=g-import-not-at-top
import dcasgd_optax.ray  # pylint: disable=g-import-not-at-top,unused-import
from dcasgd_optax.ray._layout import make_layout  # pylint: disable=g-import-not-at-top


def _params(sizes):
  return {f"p{i:02d}": np.arange(float(n)).reshape(n) if n % 2 else
          np.arange(float(n)).reshape(2, n // 2) for i, n in enumerate(sizes)}


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    sizes=st.lists(st.integers(1, 400), min_size=1, max_size=8),
    num_shards=st.integers(1, 6),
)
def test_every_element_is_held_once_and_shards_are_balanced(sizes, num_shards):
  hypothesis.assume(num_shards <= sum(sizes))
  layout = make_layout(_params(sizes), num_shards)
  covered = [np.zeros(n, int) for n in sizes]
  for pieces in layout.pieces:
    assert len({p.leaf for p in pieces}) == len(pieces)  # <= 1 piece a leaf
    for p in pieces:
      covered[p.leaf][p.start:p.stop] += 1
  assert all((c == 1).all() for c in covered)
  loads = [layout.shard_size(k) for k in range(num_shards)]
  cap = math.ceil(sum(sizes) / num_shards)
  assert min(loads) >= 1 and max(loads) <= cap + int(0.05 * cap)
  # Leaves are cut only to fill shards: each cut ends one shard's share.
  assert sum(map(len, layout.pieces)) <= len(sizes) + num_shards - 1


def test_small_leaves_stay_whole_and_keep_their_shape():
  params = {"w": jnp.zeros((30, 10)), "b": jnp.zeros(10), "c": jnp.zeros(())}
  layout = make_layout(params, 2)
  specs = [[(layout.piece_shape(p), p.stop - p.start) for p in s]
           for s in layout.pieces]
  # 311 elements, 156 a shard: w is cut, b and c stay whole.
  assert sorted(map(sorted, specs)) == [[((), 1), ((10,), 10), ((144,), 144)],
                                        [((156,), 156)]]


def test_split_then_join_is_the_identity_with_numpy_and_under_jit():
  params = {"a": np.arange(35.0, dtype=np.float32).reshape(5, 7),
            "b": np.arange(3, dtype=np.int32), "c": np.float32(2.5)}
  for num_shards in (1, 2, 3, 5):
    layout = make_layout(params, num_shards)
    pieces = layout.split(params)
    assert [len(p) for p in pieces] == [len(s) for s in layout.pieces]
    chex.assert_trees_all_equal(layout.join(pieces), params)
    jitted = jax.jit(lambda t, layout=layout: layout.join(layout.split(t)))
    chex.assert_trees_all_equal(jitted(params),
                                jax.tree.map(jnp.asarray, params))


@pytest.mark.parametrize("name,tx", [
    ("dcasgd-a with momentum", dcasgd_optax.dcasgd(0.1, 3, momentum=0.9)),
    ("adam after delay compensation", optax.chain(
        dcasgd_optax.delay_compensation(3, 0.04), optax.adam(1e-3))),
    ("staleness-aware sgd", optax.chain(
        dcasgd_optax.scale_by_inverse_staleness(), optax.sgd(0.1))),
    ("injected hyperparameters", optax.inject_hyperparams(optax.sgd)(
        learning_rate=0.1, momentum=0.9)),
])
def test_shards_optax_states_join_into_the_full_state(name, tx):
  del name
  params = {"w": jnp.linspace(-1, 1, 24).reshape(4, 6), "b": jnp.ones(5)}
  tx = optax.with_extra_args_support(tx)
  grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
  full = tx.init(params)
  full = tx.update(grads, full, params, worker=1, staleness=2)[1]
  for num_shards in (2, 3):
    layout = make_layout(params, num_shards)
    states = []
    for k, (g, p) in enumerate(zip(layout.split(grads),
                                   layout.split(params))):
      g, p = layout.shard_tree(k, g), layout.shard_tree(k, p)
      states.append(tx.update(g, tx.init(p), p, worker=1, staleness=2)[1])
    chex.assert_trees_all_close(layout.join_states(tx.init, states), full,
                                rtol=1e-6)


@pytest.mark.parametrize("num_shards,error", [
    (0, ValueError), (12, ValueError), (True, TypeError), (2.0, TypeError),
])
def test_bad_num_shards_is_rejected(num_shards, error):
  with pytest.raises(error, match="`num_shards`"):
    make_layout({"w": jnp.zeros(11)}, num_shards)
