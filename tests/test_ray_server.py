"""dcasgd_optax.ray's parameter-server shard, called directly (no Ray started).

Against NumPy references; and every bad push (unknown worker, duplicate or
out-of-order seq, wrong structure, shape or dtype, a stale incarnation, a
non-finite gradient) leaves the state exactly as it was.
"""

import importlib
import os
import pathlib
import stat
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("ray")
pytest.importorskip("orbax.checkpoint")

import dcasgd_optax  # pylint: disable=g-import-not-at-top
import dcasgd_optax.ray  # pylint: disable=g-import-not-at-top,unused-import
from dcasgd_optax.ray import _shm  # pylint: disable=g-import-not-at-top
from dcasgd_optax.ray._layout import make_layout  # pylint: disable=g-import-not-at-top
from dcasgd_optax.ray._server import ParameterServer  # pylint: disable=g-import-not-at-top


def test_import_error_names_the_extra(monkeypatch):
  monkeypatch.delitem(sys.modules, "dcasgd_optax.ray")
  monkeypatch.setitem(sys.modules, "ray", None)
  with pytest.raises(ImportError, match=r"pip install 'dcasgd-optax\[ray\]'"):
    importlib.import_module("dcasgd_optax.ray")


def _f32(*values):
  return np.array(values, np.float32)


def test_server_applies_dcasgd_like_a_numpy_reference():
  lr, lam = 0.1, 0.5
  w = _f32(1.0, -2.0, 0.5)
  # No pull_after_push: the server itself must record each worker's pull.
  tx = optax.chain(dcasgd_optax.delay_compensation(2, lam), optax.sgd(lr))
  server = ParameterServer(tx, {"w": w}, 2)
  backups = [w.copy(), w.copy()]
  for m in (0, 1):
    server.pull(m)
  rng = np.random.default_rng(0)
  for seq, m in enumerate([0, 1, 1, 0, 1]):
    g = rng.normal(size=3).astype(np.float32)
    info, pulled = server.apply(m, server.progress()[1][m] + 1, [g])
    w = w - lr * (g + lam * g * g * (w - backups[m]))
    backups[m] = w.copy()
    np.testing.assert_allclose(pulled.params[0], w, rtol=1e-6)
    assert info.status == "applied" and pulled.step == seq + 1


def test_two_shards_hold_the_halves_of_one_servers_update():
  tx = dcasgd_optax.dcasgd(0.1, 2, momentum=0.9)
  params = {"a": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(4)}
  one = ParameterServer(tx, params, 2)
  two = [ParameterServer(tx, params, 2, shard=k, num_shards=2)
         for k in (0, 1)]
  layout = make_layout(params, 2)
  rng = np.random.default_rng(1)
  for seq, m in enumerate([0, 1, 1, 0]):
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32),
                         params)
    seq = one.progress()[1][m] + 1
    _, want = one.apply(m, seq, jax.tree.leaves(grads))
    got = [s.apply(m, seq, pieces)[1] for s, pieces in
           zip(two, layout.split(grads))]
    chex.assert_trees_all_close(layout.join([p.params for p in got]),
                                jax.tree.unflatten(layout.treedef,
                                                   want.params), rtol=1e-6)
  init = optax.with_extra_args_support(tx).init
  joined = layout.join_states(init, [s.result()[2] for s in two])
  chex.assert_trees_all_close(joined, one.result()[2], rtol=1e-6)


def test_server_staleness_counts_updates_since_pull():
  tx = optax.chain(dcasgd_optax.scale_by_inverse_staleness(), optax.sgd(1.0))
  server = ParameterServer(tx, {"w": np.zeros(1, np.float32)}, 3)
  got = []
  for m in (0, 1, 2):
    server.pull(m)
  for m in (0, 0, 1, 2, 0):
    info, pulled = server.apply(m, server.progress()[1][m] + 1, [_f32(1.0)])
    got.append(info.staleness)
  assert got == [0, 0, 2, 3, 2]
  # Staleness-aware scaling saw them: -(1 + 1 + 1/2 + 1/3 + 1/2).
  np.testing.assert_allclose(pulled.params[0], [-(3 + 1 / 3)], rtol=1e-6)
  np.testing.assert_array_equal(server.trace()["staleness"], got)


def _server():
  tx = dcasgd_optax.dcasgd(0.1, 2, momentum=0.9)
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(2)}
  server = ParameterServer(tx, params, 2)
  server.apply(1, 0, [_f32(1, 2), np.ones((2, 3), np.float32)])
  return server


def _state(server):
  admission = server._admission  # pylint: disable=protected-access
  tickets = (admission.admitted, admission.granted.copy())
  return jax.tree.map(np.copy, server.result()), server.progress(), tickets


def _bad_pushes():
  good = [_f32(1, 2), np.ones((2, 3), np.float32)]
  return {
      "unknown worker": ((2, 0, good), {}, "does not know that worker"),
      "negative worker": ((-1, 0, good), {}, "does not know that worker"),
      "bool worker": ((True, 0, good), {}, "`worker` must be an int"),
      "duplicate": (
          (1, 0, good), {}, r"worker 1 sent gradient seq=0.*duplicate"),
      "out of order": (
          (1, 2, good), {}, r"seq=2.*expected is 1 \(out of order"),
      "float seq": ((0, 0.0, good), {}, r"worker 0 sent `seq`=0.0, not an int"),
      "negative epoch": (
          (0, 0, good), dict(epoch=-1), "`epoch` must be an int"),
      "finite not a bool": ((0, 0, good), dict(finite="yes"),
                            "worker 0 sent `finite`='yes', not a bool"),
      # The first shard records meta; a bad one would break its trace at the
      # end of the run, after the update was applied and a ticket granted.
      "meta not a pair": ((0, 0, good), dict(meta=1.5), "worker 0 sent `meta`"),
      "meta of strings": ((0, 0, good), dict(meta=("a", 1.0)), "`meta`"),
      "negative compute time": ((0, 0, good), dict(meta=(1.0, -2.0)),
                                "compute time of -2.0 s"),
      "dict, not list": ((0, 0, {"w": good[1], "b": good[0]}), {},
                         "worker 0 sent a gradient that is not a list"),
      "missing piece": ((0, 0, good[:1]), {}, "not a list of this shard's 2"),
      "wrong shape": ((0, 0, [good[0], np.ones((3, 2), np.float32)]), {},
                      r"worker 0 sent piece 1 \(of params\['w'\]\)"),
      "wrong dtype": ((0, 0, [good[0].astype(np.float64), good[1]]), {},
                      r"piece 0 \(of params\['b'\]\).*float64"),
      "not an array": ((0, 0, [[1.0, 2.0], good[1]]), {}, "piece 0"),
  }


@pytest.mark.parametrize("case", list(_bad_pushes()))
def test_a_bad_push_is_rejected_naming_the_worker_and_changes_nothing(case):
  server = _server()
  before = _state(server)  # Tickets included: none granted for a bad push.
  args, kwargs, match = _bad_pushes()[case]
  with pytest.raises((ValueError, TypeError), match=match):
    server.apply(*args, **kwargs)
  chex.assert_trees_all_equal(_state(server), before)
  # Still usable: the next good push is applied.
  info, _ = server.apply(0, 0, [_f32(1, 2), np.ones((2, 3), np.float32)])
  assert info.status == "applied" and info.step == 2


def test_a_bad_worker_id_fails_pull_grant_and_attach_too():
  server = _server()
  for method in (server.pull, server.grant, lambda w: server.attach(w, 1)):
    with pytest.raises(ValueError, match="does not know"):
      method(5)


@pytest.mark.parametrize("where", ["in the gradient", "flagged by the worker"])
def test_a_non_finite_gradient_is_skipped_and_corrupts_nothing(where):
  server = _server()
  (step, params, opt_state), _, _ = _state(server)
  good = [_f32(1, 2), np.ones((2, 3), np.float32)]
  grads = [_f32(1, np.nan), np.full((2, 3), np.inf, np.float32)]
  flagged = where == "flagged by the worker"
  if flagged:  # The worker saw a NaN in another shard's piece.
    grads = good
  info, pulled = server.apply(0, 0, grads, finite=not flagged)
  assert info.status == "skipped" and info.step == step + 1
  # The params sent back are the unchanged ones (the pull after a skip).
  chex.assert_trees_all_equal(pulled.params, params)
  new_step, new_params, new_state = server.result()
  assert new_step == step + 1
  chex.assert_trees_all_equal(new_params, params)
  # Nothing changed but worker 0's pull: its backup is the (same) params.
  tree = jax.tree.unflatten(jax.tree.structure({"b": 0, "w": 0}), params)
  want = dcasgd_optax.record_pull(jax.tree.map(jnp.asarray, opt_state), tree, 0)
  chex.assert_trees_all_equal(new_state, jax.tree.map(np.asarray, want))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(new_state))
  assert server.trace()["skipped"].tolist() == [False, True]
  # The next good push is applied as if the skipped one had been a pull: as
  # on a server that got the pull and the good push only.
  reference = _server()
  reference.pull(0)
  _, want = reference.apply(0, 0, good)
  info, pulled = server.apply(0, 1, good)
  assert info.status == "applied" and info.step == step + 2
  chex.assert_trees_all_equal(pulled.params, want.params)
  chex.assert_trees_all_equal(pulled.params, server.result()[1])  # Sent back.
  chex.assert_trees_all_equal(server.result()[1:], reference.result()[1:])


def test_a_push_from_before_a_restart_is_ignored():
  server = _server()
  assert server.attach(1, epoch=1) == 0  # Worker 1 restarted.
  before = _state(server)
  info, pulled = server.apply(1, 1, [_f32(1, 2), np.ones((2, 3), np.float32)],
                              epoch=0)
  assert info.status == "stale" and not pulled.ticket
  chex.assert_trees_all_equal(_state(server), before)
  info, _ = server.apply(1, 1, [_f32(1, 2), np.ones((2, 3), np.float32)],
                         epoch=1)
  assert info.status == "applied"


def test_a_bad_push_from_a_newer_incarnation_does_not_attach_it():
  server = _server()
  grads = [_f32(1, 2), np.ones((2, 3), np.float32)]
  with pytest.raises(ValueError, match="out of order"):
    server.apply(1, 5, grads, epoch=1)
  info, _ = server.apply(1, 1, grads, epoch=0)  # Not stale: none attached.
  assert info.status == "applied"


def test_tickets_stop_at_the_limit_and_stay_with_their_gradient():
  server = ParameterServer(optax.sgd(1.0), {"w": np.zeros(2)}, 2)
  server.set_limit(3)
  g = [np.ones(2, np.float32)]
  assert server.grant(0) and server.grant(0)  # One ticket, asked twice.
  assert server.grant(1)
  _, pulled = server.apply(0, 0, g)
  assert pulled.ticket  # The third and last.
  _, pulled = server.apply(1, 0, g)
  assert not pulled.ticket and not server.grant(1)
  assert server.grant(0)  # Worker 0 still holds the third.
  server.apply(0, 1, g)
  assert not server.grant(0) and server.progress()[0] == 3


def test_wire_dtype_rounds_what_travels_and_what_the_backups_hold():
  tx = optax.chain(dcasgd_optax.delay_compensation(1, 0.0), optax.sgd(1.0))
  w = _f32(1.0 + 2**-10, 3.0)  # Not a bfloat16 number.
  server = ParameterServer(tx, {"w": w}, 1, wire_dtype=jnp.bfloat16)
  pulled = server.pull(0)
  assert pulled.params[0].dtype == jnp.bfloat16
  np.testing.assert_array_equal(pulled.params[0].astype(np.float32), [1, 3])
  with pytest.raises(ValueError, match="float32"):
    server.apply(0, 0, [_f32(1, 1)])  # Must come in bfloat16.
  g = np.array([0.5, 0.5], jnp.bfloat16)
  _, pulled = server.apply(0, 0, [g])
  _, params, opt_state = server.result()
  np.testing.assert_array_equal(params[0], w - 0.5)
  np.testing.assert_array_equal(opt_state[0].backups["w"][0],
                                (w - 0.5).astype(jnp.bfloat16))


def test_num_workers_is_read_from_tx_and_checked_against_it():
  server = ParameterServer(dcasgd_optax.dcasgd(0.1, 3), {"w": np.zeros(2)})
  assert server.progress()[1].shape == (3,)
  with pytest.raises(ValueError, match="backups for 2 workers"):
    ParameterServer(dcasgd_optax.dcasgd(0.1, 2), {"w": np.zeros(2)}, 4)
  with pytest.raises(ValueError, match="`num_workers` is None"):
    ParameterServer(optax.sgd(0.1), {"w": np.zeros(2)})


def test_shards_resume_from_their_checkpoints(tmp_path):
  tx = dcasgd_optax.dcasgd(0.1, 2, momentum=0.5)
  params = {"w": np.ones(5, np.float32), "b": np.zeros(2, np.float32)}
  layout = make_layout(params, 2)
  make = lambda k: ParameterServer(tx, params, 2, shard=k, num_shards=2,
                                        checkpoint_dir=str(tmp_path))
  grads = [layout.split({"w": np.full(5, s, np.float32),
                         "b": np.full(2, -s, np.float32)}) for s in range(5)]
  live = [make(0), make(1)]
  for seq in range(3):
    for k, server in enumerate(live):
      server.apply(seq % 2, seq // 2, grads[seq][k])
  assert [s.save() for s in live] == [3, 3]
  for s in live:
    s.close()
  resumed = [make(0), make(1)]
  assert [s.checkpoint_steps() for s in resumed] == [[3], [3]]
  for s in resumed:
    s.restore(3)
    assert s.progress()[0] == 3 and s.progress()[1].tolist() == [1, 0]
  for seq in (3, 4):
    for k in (0, 1):
      live[k].apply(seq % 2, seq // 2, grads[seq][k])
      resumed[k].apply(seq % 2, seq // 2, grads[seq][k])
  chex.assert_trees_all_equal([s.result() for s in live],
                              [s.result() for s in resumed])


@pytest.mark.parametrize("num_shards", [1, 2])
def test_workers_pull_the_look_ahead_of_dana_dc(num_shards):
  tx = dcasgd_optax.dana_dcasgd(0.5, num_workers=2, momentum=0.5)
  params = {"w": jnp.linspace(-1.0, 1.0, 5), "b": jnp.ones(2)}
  layout = make_layout(params, num_shards)
  shards = [ParameterServer(tx, params, 2, shard=k, num_shards=num_shards)
            for k in range(num_shards)]
  state, want = tx.init(params), params
  rng = np.random.default_rng(2)
  for seq, m in enumerate([0, 1, 1, 0]):
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32),
                         params)
    seq = shards[0].progress()[1][m] + 1
    updates, state = tx.update(grads, state, want, worker=m)
    want = optax.apply_updates(want, updates)
    pulled, state = dcasgd_optax.pull(state, want, m)  # The look-ahead.
    got = [s.apply(m, seq, pieces)[1].params for s, pieces in
           zip(shards, layout.split(grads))]
    chex.assert_trees_all_close(layout.join(got), pulled, rtol=1e-6)
    assert not np.allclose(layout.join(got)["w"], want["w"])  # Not the params.


def test_a_mid_sized_push_travels_in_chunks_and_bad_chunks_are_rejected():
  # 60,002 float32 parameters: 240 kB, sent as the bytes of the pieces, in
  # order, in chunks of at most 96 kB (each small enough to go inline).
  params = {"w": np.zeros((200, 300), np.float32), "b": np.ones(2, np.float32)}
  server = ParameterServer(optax.sgd(1.0), params, 1)
  grads = [np.full(2, 0.5, np.float32), np.full((200, 300), 2.0, np.float32)]
  data = b"".join(g.tobytes() for g in grads)
  chunks = [data[i:i + 96_000] for i in range(0, len(data), 96_000)]
  assert len(chunks) == 3
  head = (0, 0, 0, True, (0.0, 0.0))
  before = _state(server)
  for bad, match in [(chunks[:2], "2 parts, not 3"),
                     ([chunks[0], chunks[1], chunks[2][:-4]], "bytes"),
                     ([np.frombuffer(c, np.uint8) for c in chunks],
                      "not bytes")]:
    with pytest.raises(ValueError, match=f"worker 0 sent a malformed.*{match}"):
      server.push(head, *bad)
  with pytest.raises(TypeError, match="head"):
    server.push((0, 0, 0), *chunks)
  chex.assert_trees_all_equal(_state(server), before)
  (info, ticket), *reply = server.push(head, *chunks)
  assert info.status == "applied" and info.step == 1 and ticket
  assert len(reply) == 3 and all(isinstance(c, bytes) for c in reply)
  new = [params["b"] - grads[0], params["w"] - grads[1]]  # SGD, lr 1.
  assert b"".join(reply) == b"".join(p.tobytes() for p in new)


def test_checkpoint_directories_are_private_to_their_owner(tmp_path):
  directory = tmp_path / "runs" / "ckpt"
  params = {"w": np.ones(3, np.float32), "b": np.zeros(2, np.float32)}
  for k in range(2):
    server = ParameterServer(optax.sgd(0.1), params, 1, shard=k,
                                  num_shards=2, checkpoint_dir=str(directory))
    server.save()
    server.close()
  # Owner only: the run's directory, each shard's, each step's.
  for path in ["", "shard-0-of-2", "shard-0-of-2/0", "shard-1-of-2",
               "shard-1-of-2/0"]:
    assert stat.S_IMODE((directory / path).stat().st_mode) == 0o700, path


@pytest.mark.skipif(not _shm.available(), reason="no writable /dev/shm")
def test_a_push_through_shared_memory_equals_one_in_the_call():
  # The worker side of the channel is _shm.Channel.attach, as in a worker.
  tx = dcasgd_optax.dcasgd(0.1, 2, momentum=0.9)
  params = {"w": np.linspace(-1, 1, 300, dtype=np.float32).reshape(3, 100),
            "b": np.ones(7, np.float32)}
  by_call, shared = (ParameterServer(tx, params, 2) for _ in range(2))
  paths = shared.open_channel(1, 0, None)
  assert all(p.startswith(_shm.DIRECTORY) and os.path.exists(p)
             for p in paths)
  channel = _shm.Channel.attach(0, paths, shared.piece_specs)
  # Unlinked once both sides map them: nothing left if either dies.
  assert not any(map(os.path.exists, paths))
  assert shared.open_channel(0, 0, "another node") is None
  rng = np.random.default_rng(0)
  for seq in range(4):
    grads = [rng.normal(size=s).astype(np.float32)
             for s, _ in shared.piece_specs]
    _, want = by_call.apply(1, seq, grads)
    channel.grads.write(grads)
    info, ticket = shared.push_shared((1, seq, 0, True, (0.0, 0.0)))
    assert info.status == "applied" and ticket and info.step == seq + 1
    assert channel.bell.wait(0) == _shm.TICKET  # Rung once, then silent.
    assert channel.bell.wait(0) is None
    chex.assert_trees_all_equal(channel.params.pieces, want.params)
  chex.assert_trees_all_equal(_state(shared), _state(by_call))
  # Worker 0 has no channel; worker 1's earlier incarnation is stale.
  with pytest.raises(ValueError, match="worker 0 pushed through a shared"):
    shared.push_shared((0, 0, 0, True, (0.0, 0.0)))
  assert shared.attach(1, 1) == 3
  info, ticket = shared.push_shared((1, 4, 0, True, (0.0, 0.0)))
  assert info.status == "stale" and not ticket
  assert channel.bell.wait(0) is None  # A stale push rings nothing.
  chex.assert_trees_all_equal(_state(shared), _state(by_call))
  # A new incarnation gets a new channel; the old one is closed.
  paths = shared.open_channel(1, 1, None)
  assert all(map(os.path.exists, paths))
  shared.close()  # Unlinks the files the worker did not map.
  assert not any(map(os.path.exists, paths))
  with pytest.raises(FileNotFoundError):
    _shm.Channel.attach(1, paths, shared.piece_specs)
  channel.close()


def test_while_a_limit_is_set_a_push_needs_its_ticket():
  server = ParameterServer(optax.sgd(1.0), {"w": np.zeros(2)}, 2)
  g = [np.ones(2, np.float32)]
  server.set_limit(3)
  for worker in (1, 0):
    before = _state(server)
    with pytest.raises(ValueError, match=f"worker {worker} pushed gradient "
                       "seq=0, for which this shard granted no ticket"):
      server.apply(worker, 0, g)
    chex.assert_trees_all_equal(_state(server), before)
    assert server.grant(worker)
    info, pulled = server.apply(worker, 0, g)
    assert info.status == "applied"
  assert not pulled.ticket  # Worker 1 holds the third ticket: the last.
  with pytest.raises(ValueError, match="worker 0 pushed gradient seq=1"):
    server.apply(0, 1, g)
  server.apply(1, 1, g)
  assert server.progress()[0] == 3 and not server.grant(0)
  for bad, error in [("3", TypeError), (True, TypeError), (2.0, TypeError),
                     (-1, ValueError)]:
    with pytest.raises(error, match="`limit` must be an int >= 0 or None"):
      server.set_limit(bad)
  server.set_limit(None)  # No limit: pushes are taken without tickets.
  assert server.apply(0, 1, g)[0].status == "applied"


def _channel_pair(tx, params, worker=1, epoch=0):
  server = ParameterServer(tx, params, 2)
  paths = server.open_channel(worker, epoch, None)
  return server, _shm.Channel.attach(epoch, paths, server.piece_specs)


@pytest.mark.skipif(not _shm.available(), reason="no writable /dev/shm")
@pytest.mark.parametrize("written", ["nan", "finite"])
def test_a_gradient_buffer_written_during_a_push_does_not_reach_the_update(
    written):
  # The worker (or whoever can write the buffer) writes it again while the
  # shard processes the push: the shard checks and applies its own copy.
  params = {"w": np.zeros(3, np.float32)}
  server, channel = _channel_pair(optax.sgd(1.0), params)
  pushed = _f32(1, 2, 3) if written == "nan" else _f32(1, np.nan, 3)
  late = _f32(np.nan, 0, 0) if written == "nan" else _f32(5, 5, 5)
  apply = server._apply  # pylint: disable=protected-access

  def apply_after_a_write(*args):
    channel.grads.write([late])
    return apply(*args)

  server._apply = apply_after_a_write  # pylint: disable=protected-access
  channel.grads.write([pushed])
  info, _ = server.push_shared((1, 0, 0, True, (0.0, 0.0)))
  if written == "nan":  # The finite gradient pushed is applied.
    assert info.status == "applied"
    np.testing.assert_array_equal(channel.params.pieces[0], -pushed)
  else:  # The NaN pushed is skipped, whatever came after.
    assert info.status == "skipped"
    np.testing.assert_array_equal(channel.params.pieces[0], np.zeros(3))
  np.testing.assert_array_equal(server.result()[1][0],
                                channel.params.pieces[0])
  channel.close()
  server.close()


@pytest.mark.skipif(not _shm.available(), reason="no writable /dev/shm")
def test_a_live_channel_is_never_cut_off():
  params = {"w": np.zeros(3, np.float32)}
  server, channel = _channel_pair(optax.sgd(1.0), params, epoch=2)
  with pytest.raises(ValueError, match="incarnation 2 has a shared-memory "
                     "channel open already"):
    server.open_channel(1, 2, None)
  assert server.open_channel(1, 1, None) is None  # An earlier incarnation.
  server.close_channel(1, 1)  # Not its channel: nothing closed.
  # A push from an incarnation without a channel does not use the live one.
  channel.grads.write([_f32(1, 1, 1)])
  with pytest.raises(ValueError, match="none is open for its incarnation 3"):
    server.push_shared((1, 0, 3, True, (0.0, 0.0)))
  assert server.progress()[0] == 0
  # The live channel still works.
  info, _ = server.push_shared((1, 0, 2, True, (0.0, 0.0)))
  assert info.status == "applied" and channel.bell.wait(0) == _shm.TICKET
  np.testing.assert_array_equal(channel.params.pieces[0], -np.ones(3))
  server.close_channel(1, 2)
  with pytest.raises(ValueError, match="none is open for its incarnation 2"):
    server.push_shared((1, 1, 2, True, (0.0, 0.0)))
  channel.close()
  server.close()


@pytest.mark.parametrize("kind", ["group-writable", "a link"])
def test_a_checkpoint_directory_others_can_write_is_refused(tmp_path, kind):
  directory = tmp_path / "ckpt"
  directory.mkdir(mode=0o700)
  if kind == "group-writable":
    directory.chmod(0o770)
    match = "mode 770: other users can write to it"
  else:
    os.symlink(directory, tmp_path / "link")
    directory = tmp_path / "link"
    match = "is a symbolic link"
  with pytest.raises(PermissionError, match=f"`checkpoint_dir`.*{match}"):
    ParameterServer(optax.sgd(0.1), {"w": np.zeros(2)}, 1,
                    checkpoint_dir=str(directory))


def test_inconsistent_restored_counters_are_refused(tmp_path):
  make = lambda: ParameterServer(optax.sgd(0.1), {"w": np.zeros(2)}, 2,
                                 checkpoint_dir=str(tmp_path))
  server = make()
  for seq in range(2):
    server.apply(0, seq, [_f32(1, 1)])
  server._state.last_seq[1] = 4  # pylint: disable=protected-access
  server.save()
  server.close()
  resumed = make()
  before = _state(resumed)
  with pytest.raises(ValueError, match="step 2 .* inconsistent: its workers' "
                     r"gradient counts \[2, 5\] do not add up"):
    resumed.restore(2)
  chex.assert_trees_all_equal(_state(resumed), before)
  resumed.close()


def test_exactly_once_needs_every_worker_to_have_records():
  from ray_helpers import check_exactly_once  # pylint: disable=g-import-not-at-top
  check_exactly_once({"worker": [1, 0, 1], "seq": [0, 0, 1]}, 2)
  with pytest.raises(AssertionError, match="worker 1 has no records"):
    check_exactly_once({"worker": [0, 0], "seq": [0, 1]}, 2)
  with pytest.raises(AssertionError):
    check_exactly_once({"worker": [0, 1, 0], "seq": [0, 0, 0]}, 2)


def test_connect_names_a_changed_ray_internal_and_pins_the_tested_ray(
    monkeypatch):
  from packaging.specifiers import SpecifierSet  # pylint: disable=g-import-not-at-top
  import ray  # pylint: disable=g-import-not-at-top
  from ray._private import services  # pylint: disable=g-import-not-at-top

  from dcasgd_optax.ray import _cluster  # pylint: disable=g-import-not-at-top
  pyproject = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
  assert f'"ray[default]{_cluster.TESTED_RAY}"' in pyproject
  assert ray.__version__ in SpecifierSet(_cluster.TESTED_RAY)
  assert _cluster.resolve("127.0.0.1:6379")[0].endswith(":6379")
  monkeypatch.delattr(services, "canonicalize_bootstrap_address")
  with pytest.raises(RuntimeError, match=r"canonicalize_bootstrap_address.*"
                     r"Ray's internals changed.*tested with ray>=2\.52"):
    _cluster.resolve("127.0.0.1:6379")


def test_the_public_surface_is_what_a_user_calls():
  public = {n for n, v in vars(dcasgd_optax.ray).items()
            if not n.startswith("_") and not isinstance(v, types.ModuleType)}
  assert public == set(dcasgd_optax.ray.__all__) == {
      "train", "TrainResult", "UpdateRecords", "connect"}
