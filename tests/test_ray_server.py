"""dcasgd_optax.ray's parameter server, called directly (no Ray started)."""

import importlib
import stat
import sys

import chex
import numpy as np
import optax
import pytest

pytest.importorskip("ray")
pytest.importorskip("orbax.checkpoint")

import dcasgd_optax  # pylint: disable=g-import-not-at-top
import dcasgd_optax.ray as dray  # pylint: disable=g-import-not-at-top


def test_import_error_names_the_extra(monkeypatch):
  monkeypatch.delitem(sys.modules, "dcasgd_optax.ray")
  monkeypatch.setitem(sys.modules, "ray", None)
  with pytest.raises(ImportError, match=r"pip install 'dcasgd-optax\[ray\]'"):
    importlib.import_module("dcasgd_optax.ray")


def test_server_applies_dcasgd_like_a_numpy_reference():
  lr, lam = 0.1, 0.5
  w = np.array([1.0, -2.0, 0.5], np.float32)
  # No pull_after_push: the server itself must record each worker's pull.
  tx = optax.chain(dcasgd_optax.delay_compensation(2, lam), optax.sgd(lr))
  server = dray.ParameterServer(tx, {"w": w}, 2)
  backups = [w.copy(), w.copy()]
  for m in (0, 1):
    server.pull(m)
  rng = np.random.default_rng(0)
  for seq, m in enumerate([0, 1, 1, 0, 1]):
    g = rng.normal(size=3).astype(np.float32)
    info, (step, got) = server.apply(m, seq, {"w": g})
    w = w - lr * (g + lam * g * g * (w - backups[m]))
    backups[m] = w.copy()
    np.testing.assert_allclose(got["w"], w, rtol=1e-6)
  assert step == 5 and info.applied


def test_server_staleness_counts_updates_since_pull():
  tx = optax.chain(dcasgd_optax.scale_by_inverse_staleness(), optax.sgd(1.0))
  server = dray.ParameterServer(tx, {"w": np.zeros(1, np.float32)}, 3)
  got = []
  for m in (0, 1, 2):
    server.pull(m)
  for m in (0, 0, 1, 2, 0):
    info, (_, params) = server.apply(m, server.progress()[1][m] + 1,
                                     {"w": np.ones(1, np.float32)})
    got.append(info.staleness)
  assert got == [0, 0, 2, 3, 2]
  # Staleness-aware scaling saw them: -(1 + 1 + 1/2 + 1/3 + 1/2).
  np.testing.assert_allclose(params["w"], [-(3 + 1 / 3)], rtol=1e-6)


def test_server_ignores_a_duplicate_push():
  params = {"w": np.zeros(2, np.float32)}
  server = dray.ParameterServer(optax.sgd(1.0), params, 2)
  g = {"w": np.ones(2, np.float32)}
  first, _ = server.apply(1, 0, g)
  again, (step, params) = server.apply(1, 0, g)
  assert first.applied and not again.applied
  assert step == 1
  np.testing.assert_array_equal(params["w"], [-1.0, -1.0])


@pytest.mark.parametrize("bad", [-1, 2, 2.0, True])
def test_server_rejects_a_bad_worker_id_and_stays_usable(bad):
  tx = dcasgd_optax.dcasgd(1.0, num_workers=2, lambda_=0.0)
  server = dray.ParameterServer(tx, {"w": np.zeros(2, np.float32)}, 2)
  g = {"w": np.ones(2, np.float32)}
  with pytest.raises((ValueError, TypeError), match="worker"):
    server.apply(bad, 0, g)
  with pytest.raises((ValueError, TypeError), match="worker"):
    server.pull(bad)
  info, (step, params) = server.apply(1, 0, g)  # nothing was consumed
  assert info.applied and step == 1 and info.staleness == 0
  np.testing.assert_array_equal(params["w"], [-1.0, -1.0])
  assert server.progress()[1].tolist() == [-1, 0]


def test_server_rejects_a_tx_built_for_another_worker_count():
  with pytest.raises(ValueError, match="backups for 2 workers"):
    dray.ParameterServer(dcasgd_optax.dcasgd(0.1, 2), {"w": np.zeros(2)}, 4)


def test_server_resumes_from_its_checkpoint(tmp_path):
  tx = dcasgd_optax.dcasgd(0.1, 2)
  params = {"w": np.ones(3, np.float32)}
  grads = [{"w": np.full(3, s, np.float32)} for s in range(5)]
  server = dray.ParameterServer(
      tx, params, 2, checkpoint_dir=tmp_path, checkpoint_every=2
  )
  for seq in range(3):
    server.apply(seq % 2, seq // 2, grads[seq])
  server.close()  # Saves step 3 too.
  resumed = dray.ParameterServer(tx, params, 2, checkpoint_dir=tmp_path,
                                 resume=True)
  step, last_seq = resumed.progress()
  assert step == 3 and list(last_seq) == [1, 0]
  for seq in (3, 4):
    server.apply(seq % 2, seq // 2, grads[seq])
    resumed.apply(seq % 2, seq // 2, grads[seq])
  chex.assert_trees_all_equal(server.result(), resumed.result())
  with pytest.raises(ValueError, match="resume=True"):
    dray.ParameterServer(tx, params, 2, checkpoint_dir=tmp_path)


def test_server_checkpoints_are_private_to_their_owner(tmp_path):
  directory = tmp_path / "runs" / "ckpt"
  server = dray.ParameterServer(optax.sgd(0.1), {"w": np.ones(3, np.float32)},
                                1, checkpoint_dir=directory)
  server.apply(0, 0, {"w": np.ones(3, np.float32)})
  server.close()
  modes = {p.name: stat.S_IMODE(p.stat().st_mode)
           for p in [directory, *directory.iterdir()] if p.is_dir()}
  assert modes == {"ckpt": 0o700, "1": 0o700}
