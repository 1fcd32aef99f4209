"""dcasgd_optax.extend.checkpoint: round trips, host copies, resume, bad
input."""

import importlib
import os
import stat
import sys
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax
from dcasgd_optax import harness
from dcasgd_optax.extend.checkpoint import Checkpointer


class ServerLike(NamedTuple):
  """A Ray-server-shaped state: host arrays beside device arrays."""

  params: Any
  opt_state: Any
  step: Any
  last_pull: Any


def _state(scale=1.0):
  return ServerLike(
      params={"w": scale * jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)},
      opt_state=(optax.EmptyState(), {"count": jnp.int32(5)}),
      step=np.int64(7),
      last_pull=np.array([3, 7], np.int64),
  )


def test_round_trip_keeps_values_types_shardings_and_metadata(tmp_path):
  state = _state()
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.restore_latest(state) is None
    assert ckpt.save(7, state, metadata={"epochs": [{"loss": 0.5}]})
  with Checkpointer(tmp_path) as ckpt:  # a new process would see the same
    assert ckpt.latest_step() == 7
    restored = ckpt.restore_latest(_state(scale=0.0))
  assert restored.step == 7 and restored.metadata == {"epochs": [{"loss": 0.5}]}
  chex.assert_trees_all_equal(restored.tree, state, strict=True)
  w = restored.tree.params["w"]
  assert isinstance(w, jax.Array) and w.sharding == state.params["w"].sharding
  assert isinstance(restored.tree.last_pull, np.ndarray)


def test_save_copies_to_host_before_returning(tmp_path):
  state = _state()
  expected = jax.tree.map(np.array, state)
  with Checkpointer(tmp_path, asynchronous=True) as ckpt:
    ckpt.save(1, state)
    state.last_pull[:] = -1  # the caller reuses its buffers at once
    jax.tree.map(lambda x: x.delete(), state.params)  # or donates them
    ckpt.wait_until_finished()
    chex.assert_trees_all_equal(
        ckpt.restore_latest(expected).tree, expected, strict=True
    )


def test_keeps_the_most_recent_and_skips_a_step_already_saved(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=2, asynchronous=False) as ckpt:
    for step in (1, 2, 3):
      assert ckpt.save(step, _state(scale=step))
    assert not ckpt.save(3, _state(scale=-1.0))
    restored = ckpt.restore_latest(_state())
  assert sorted(os.listdir(tmp_path)) == ["2", "3"]
  chex.assert_trees_all_equal(restored.tree, _state(scale=3.0), strict=True)


def test_checkpoint_directories_are_private_to_their_owner(tmp_path):
  """A checkpoint holds the whole model: 0o700 for what the save creates."""
  created = tmp_path / "runs" / "ckpt"
  existing = tmp_path / "shared"
  existing.mkdir(mode=0o755)
  existing.chmod(0o755)
  for directory in (created, existing):
    with Checkpointer(directory, asynchronous=False) as ckpt:
      ckpt.save(4, _state())
  mode = lambda path: stat.S_IMODE(path.stat().st_mode)
  assert mode(created) == 0o700
  assert mode(created / "4") == mode(existing / "4") == 0o700
  assert mode(existing) == 0o755  # a directory it did not create keeps its mode


def test_a_simulator_state_resumes_exactly(tmp_path):
  targets = jnp.linspace(0.5, 1.5, 12)
  loss_fn = lambda p, i: jnp.sum((p["w"] - targets[i]) ** 2)
  sim = harness.Simulator(loss_fn, dcasgd_optax.dcasgd(0.1, 3), 3)
  arrivals = harness.schedules.cyclic(3, 12)
  fresh = lambda: sim.init({"w": jnp.zeros(2)})
  whole, _ = sim.replay(fresh(), jnp.arange(12), arrivals)
  half, _ = sim.replay(fresh(), jnp.arange(6), arrivals[:6])
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(6, half)
  with Checkpointer(tmp_path) as ckpt:
    resumed = ckpt.restore_latest(fresh()).tree
  resumed, _ = sim.replay(resumed, jnp.arange(6, 12), arrivals[6:])
  chex.assert_trees_all_equal(resumed, whole, strict=True)


@pytest.mark.parametrize(
    "like,message",
    [
        ({"w": jnp.zeros(3)}, r"leaves only in `like`: \[\"\['w'\]\"\]"),
        (
            _state()._replace(last_pull=np.zeros(3, np.int64)),
            r"leaf .last_pull with \(shape, dtype\) \(\(2,\), 'int64'\), but "
            r"`like` has \(\(3,\), 'int64'\)",
        ),
        (_state()._replace(step=np.int32(7)), r"leaf .step .*'int32'"),
    ],
)
def test_restoring_into_another_shape_names_the_leaf(tmp_path, like, message):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _state())
    ckpt.wait_until_finished()
    with pytest.raises(ValueError, match=message):
      ckpt.restore_latest(like)


def test_bad_arguments_fail_before_anything_is_written(tmp_path):
  with pytest.raises(ValueError, match="`max_to_keep` must be an int >= 1"):
    Checkpointer(tmp_path / "a", max_to_keep=0)
  with Checkpointer(tmp_path / "b", asynchronous=False) as ckpt:
    ckpt.save(5, _state())
    with pytest.raises(ValueError, match="latest saved step 5, got 4"):
      ckpt.save(4, _state())
    with pytest.raises(ValueError, match="`step` must be an int >= 0"):
      ckpt.save(6.0, _state())
    with pytest.raises(ValueError, match="`tree` must have at least one"):
      ckpt.save(6, ())
    assert ckpt.latest_step() == 5


def test_import_error_names_the_extra(monkeypatch):
  monkeypatch.delitem(sys.modules, "dcasgd_optax.extend.checkpoint")
  monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
  with pytest.raises(ImportError, match=r"dcasgd-optax\[experiments\]"):
    importlib.import_module("dcasgd_optax.extend.checkpoint")


def test_the_old_module_is_a_deprecated_alias(monkeypatch):
  """``dcasgd_optax.checkpoint`` warns for one release, same classes."""
  monkeypatch.delitem(sys.modules, "dcasgd_optax.checkpoint", raising=False)
  with pytest.warns(DeprecationWarning, match="dcasgd_optax.extend.checkpoint"):
    old = importlib.import_module("dcasgd_optax.checkpoint")
  assert old.Checkpointer is Checkpointer
