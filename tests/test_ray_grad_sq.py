"""dcasgd_optax.ray's push of ``grad_sq`` (``push_grad_sq=True``), no Ray.

The shards are called directly and the worker's jitted gradient is called
as a function: the shard passes each push's ``grad_sq`` to ``tx.update``
(against a NumPy transcription of fisher_dcasgd), split over shards like
the gradient; it travels the same in the call (``_wire``), through a
shared-memory channel (``_shm``) and in the wire dtype; a bad one is
rejected and a non-finite one skipped like a gradient; the worker computes
it against a one-example-at-a-time loop. The real runs are in
test_ray_train.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("ray")
pytest.importorskip("orbax.checkpoint")

import dcasgd_optax  # pylint: disable=g-import-not-at-top
from dcasgd_optax.ray import _shm  # pylint: disable=g-import-not-at-top
from dcasgd_optax.ray import _wire  # pylint: disable=g-import-not-at-top
from dcasgd_optax.ray._layout import make_layout  # pylint: disable=g-import-not-at-top
from dcasgd_optax.ray._server import ParameterServer  # pylint: disable=g-import-not-at-top
from dcasgd_optax.ray._worker import _make_grad  # pylint: disable=g-import-not-at-top

PARAMS = {
    "w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
    "b": np.ones(4, np.float32),
}


def _fisher(lr=0.1, lam=0.5):
  return dcasgd_optax.fisher_dcasgd(lr, 2, lambda_=lam, adaptive=False)


def _random(rng, positive=False):
  """A params-shaped float32 tree (leaves in (b, w) order)."""
  tree = jax.tree.map(
      lambda p: rng.normal(size=p.shape).astype(np.float32), PARAMS
  )
  return jax.tree.map(np.abs, tree) if positive else tree


def test_a_shard_passes_grad_sq_to_tx_like_numpy_and_two_shards_split_it():
  lr, lam = 0.1, 0.5
  one = ParameterServer(_fisher(lr, lam), PARAMS, 2, push_grad_sq=True)
  two = [
      ParameterServer(
          _fisher(lr, lam), PARAMS, 2, shard=k, num_shards=2, push_grad_sq=True
      )
      for k in (0, 1)
  ]
  layout = make_layout(PARAMS, 2)
  assert not layout.is_whole(layout.pieces[1][-1])  # 'w' is cut in two.
  w = jax.tree.map(np.copy, PARAMS)
  backups = [w, w]
  for server in (one, *two):
    for m in (0, 1):
      server.pull(m)
  rng = np.random.default_rng(0)
  for m in [0, 1, 1, 0, 1]:
    g, f = _random(rng), _random(rng, positive=True)
    seq = one.progress()[1][m] + 1
    info, pulled = one.apply(
        m, seq, jax.tree.leaves(g), grad_sq=jax.tree.leaves(f)
    )
    assert info.status == "applied"
    # fisher_dcasgd, constant lambda: the term is lam * F * (w - backup).
    w = jax.tree.map(
        lambda w, g, f, b: w - lr * (g + lam * f * (w - b)), w, g, f, backups[m]
    )
    backups[m] = w
    chex.assert_trees_all_close(
        pulled.params, jax.tree.leaves(w), rtol=1e-6, atol=1e-7
    )
    got = [
        s.apply(m, seq, gp, grad_sq=fp)[1]
        for s, gp, fp in zip(two, layout.split(g), layout.split(f))
    ]
    chex.assert_trees_all_close(
        layout.join([p.params for p in got]), w, rtol=1e-6, atol=1e-7
    )


def _push_three_ways(wire_dtype):
  """The same pushes to three shards: ``apply``, ``push`` (in the call) and
  ``push_shared`` (a channel); returns the three and what each sent back."""
  tx = _fisher()
  servers = [
      ParameterServer(tx, PARAMS, 2, wire_dtype=wire_dtype, push_grad_sq=True)
      for _ in range(3)
  ]
  direct, by_call, shared = servers
  specs = direct.piece_specs
  assert direct.push_specs == specs + specs  # Gradient, then grad_sq.
  paths = shared.open_channel(1, 0, None)
  channel = _shm.Channel.attach(0, paths, specs, shared.push_specs)
  for s in servers:
    s.pull(1)
  rng = np.random.default_rng(1)
  rows = []
  for seq in range(4):
    g = [x.astype(d) for x, (_, d) in zip(jax.tree.leaves(_random(rng)), specs)]
    f = [
        x.astype(d)
        for x, (_, d) in zip(
            jax.tree.leaves(_random(rng, positive=True)), specs
        )
    ]
    if seq == 2:  # A finite gradient, a grad_sq that is not: skipped.
      f[1] = f[1].copy()
      f[1][0, 1] = np.inf
    head = (1, seq, 0, True, (0.0, 0.0))
    info, pulled = direct.apply(1, seq, g, grad_sq=f)
    (info_call, _), *parts = by_call.push(
        head, *_wire.pack(g + f, by_call.push_specs)
    )
    channel.grads.write(g + f)
    info_shared, _ = shared.push_shared(head)
    assert channel.bell.wait(0) is not None
    replies = [
        pulled.params,
        _wire.unpack(parts, specs),
        [np.array(p) for p in channel.params.pieces],
    ]
    rows.append(([info.status, info_call.status, info_shared.status], replies))
  channel.close()
  return servers, rows


@pytest.mark.skipif(not _shm.available(), reason="no writable /dev/shm")
@pytest.mark.parametrize("wire_dtype", [None, jnp.bfloat16])
def test_grad_sq_travels_alike_in_the_call_and_in_shared_memory(wire_dtype):
  servers, rows = _push_three_ways(wire_dtype)
  want = np.dtype(wire_dtype or np.float32)
  assert all(d == want for _, d in servers[0].push_specs)
  statuses = [r[0] for r in rows]
  assert statuses == [["applied"] * 3] * 2 + [["skipped"] * 3] + [
      ["applied"] * 3
  ]
  for _, replies in rows:  # Each push sent the same params back three ways.
    chex.assert_trees_all_equal(replies[0], replies[1])
    chex.assert_trees_all_equal(replies[0], replies[2])
  # The skip kept the params; the other pushes moved them.
  chex.assert_trees_all_equal(rows[2][1][0], rows[1][1][0])
  assert not np.array_equal(rows[3][1][0][1], rows[2][1][0][1])
  results = [s.result() for s in servers]
  chex.assert_trees_all_equal(results[0], results[1])
  chex.assert_trees_all_equal(results[0], results[2])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(results))
  for s in servers:
    assert s.trace()["skipped"].tolist() == [False, False, True, False]
    s.close()


def _bad_grad_sq_pushes():
  good = [np.ones(4, np.float32), np.ones((2, 3), np.float32)]
  return {
      "missing": (True, dict(), "pushed no `grad_sq`"),
      "to a shard that takes none": (
          False,
          dict(grad_sq=good),
          "pushed a `grad_sq`, but this shard "
          r"takes none \(push_grad_sq=False\)",
      ),
      "missing piece": (
          True,
          dict(grad_sq=good[:1]),
          "a `grad_sq` that is not a list of this shard's 2",
      ),
      "wrong shape": (
          True,
          dict(grad_sq=[good[0], np.ones((3, 2), np.float32)]),
          r"sent `grad_sq` piece 1 \(of params\['w'\]\)",
      ),
      "wrong dtype": (
          True,
          dict(grad_sq=[good[0].astype(np.float64), good[1]]),
          r"`grad_sq` piece 0 \(of params\['b'\]\).*float64",
      ),
  }


@pytest.mark.parametrize("case", list(_bad_grad_sq_pushes()))
def test_a_bad_grad_sq_is_rejected_and_changes_nothing(case):
  push_grad_sq, kwargs, match = _bad_grad_sq_pushes()[case]
  tx = _fisher() if push_grad_sq else dcasgd_optax.dcasgd(0.1, 2)
  server = ParameterServer(tx, PARAMS, 2, push_grad_sq=push_grad_sq)
  good = [np.ones(4, np.float32), np.ones((2, 3), np.float32)]
  before = jax.tree.map(np.copy, server.result()), server.progress()
  with pytest.raises(ValueError, match=match):
    server.apply(0, 0, good, **kwargs)
  chex.assert_trees_all_equal((server.result(), server.progress()), before)


def test_a_push_in_the_call_without_grad_sq_is_rejected():
  server = ParameterServer(_fisher(), PARAMS, 2, push_grad_sq=True)
  good = [np.ones(4, np.float32), np.ones((2, 3), np.float32)]
  with pytest.raises(ValueError, match="worker 0 sent a malformed gradient"):
    server.push(
        (0, 0, 0, True, (0.0, 0.0)), *_wire.pack(good, server.piece_specs)
    )


def test_a_shard_checks_that_tx_reads_grad_sq_exactly_when_pushed():
  dc = optax.chain(dcasgd_optax.delay_compensation(2, 0.5), optax.sgd(0.1))
  for tx in (optax.sgd(0.1), dc):  # Both ignore grad_sq.
    with pytest.raises(ValueError, match="does not read `grad_sq`"):
      ParameterServer(tx, PARAMS, 2, push_grad_sq=True)
  with pytest.raises(ValueError, match="pass `push_grad_sq=True`"):
    ParameterServer(_fisher(), PARAMS, 2)
  with pytest.raises(TypeError, match="`push_grad_sq` must be a bool"):
    ParameterServer(_fisher(), PARAMS, 2, push_grad_sq=1)
  # fisher_compensation inside a chain reads it.
  chain = optax.chain(dcasgd_optax.fisher_compensation(2), optax.sgd(0.1))
  ParameterServer(chain, PARAMS, 2, push_grad_sq=True)


def _loss_fn(params, batch):
  x, y = batch
  r = x @ params["w"] + params["b"][None, :3] - y
  return 0.5 * jnp.mean(jnp.sum(r * r, axis=1))


def _per_example_squares(params, batch):
  """``mean_i grad(loss)(params, example i) ** 2``, one example at a time."""
  x, y = batch
  grads = [
      jax.grad(_loss_fn)(params, (x[i : i + 1], y[i : i + 1]))
      for i in range(len(x))
  ]
  return jax.tree.map(lambda *g: np.mean(np.square(np.stack(g)), 0), *grads)


@pytest.mark.parametrize("wire_dtype", [None, jnp.bfloat16])
def test_a_worker_pushes_its_per_example_squares_split_like_the_gradient(
    wire_dtype,
):
  params = jax.tree.map(jnp.asarray, PARAMS)
  layout = make_layout(params, 2)
  rng = np.random.default_rng(2)
  batch = (
      rng.normal(size=(5, 2)).astype(np.float32),
      rng.normal(size=(5, 3)).astype(np.float32),
  )
  grad = _make_grad(_loss_fn, layout, wire_dtype, push_grad_sq=True)
  loss, finite, pieces = grad(layout.split(params), batch)
  assert bool(finite)
  want_g = jax.grad(_loss_fn)(params, batch)
  want_f = _per_example_squares(params, batch)
  wire = (
      (lambda x: x)
      if wire_dtype is None
      else (lambda x: np.asarray(x).astype(wire_dtype))
  )
  for k, (gs, fs) in enumerate(zip(layout.split(want_g), layout.split(want_f))):
    assert len(pieces[k]) == 2 * len(gs)  # The gradient's, then grad_sq's.
    assert {p.dtype for p in pieces[k]} == {np.dtype(wire_dtype or np.float32)}
    chex.assert_trees_all_close(
        pieces[k],
        [wire(x) for x in gs + fs],
        rtol=1e-5 if wire_dtype is None else 1e-2,
    )
  np.testing.assert_allclose(loss, _loss_fn(params, batch), rtol=1e-6)
  # One huge input at w = 0: the batch's gradient stays finite, the square
  # of an example's does not; the worker flags the push as not finite.
  zero_w = {"w": jnp.zeros_like(params["w"]), "b": params["b"]}
  x = batch[0].copy()
  x[1, 0] = 1e20
  g = jax.grad(_loss_fn)(zero_w, (x, batch[1]))
  assert all(np.isfinite(v).all() for v in jax.tree.leaves(g))
  _, finite, _ = grad(layout.split(zero_w), (x, batch[1]))
  assert not bool(finite)
  _, finite, _ = _make_grad(_loss_fn, layout, wire_dtype)(
      layout.split(zero_w), (x, batch[1])
  )
  assert bool(finite)  # The gradient alone is finite.
  # Without the option: only the gradient's pieces.
  _, _, pieces = _make_grad(_loss_fn, layout, wire_dtype)(
      layout.split(params), batch
  )
  assert [len(p) for p in pieces] == [len(p) for p in layout.pieces]
