"""dcasgd_optax.ray._checkpoint: who may read the server's checkpoints."""

from __future__ import annotations

import stat

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")
pytest.importorskip("ray")

from dcasgd_optax.ray import _checkpoint  # pylint: disable=g-import-not-at-top


def saved_state(directory):
  manager = _checkpoint.open_manager(str(directory))
  state = _checkpoint.ServerState(
      params={"w": np.arange(3, dtype=np.float32)}, opt_state=(),
      step=np.int64(4), last_seq=np.zeros(2, np.int64),
      pulled_step=np.zeros(2, np.int64))
  _checkpoint.save(manager, state)
  manager.wait_until_finished()
  manager.close()


def mode(path):
  return stat.S_IMODE(path.stat().st_mode)


def test_checkpoint_directories_are_private_to_their_owner(tmp_path):
  directory = tmp_path / "runs" / "ckpt"
  saved_state(directory)
  assert mode(directory) == 0o700  # created here
  assert mode(directory / "4") == 0o700  # every step directory


def test_an_existing_directory_keeps_its_mode_but_steps_are_private(tmp_path):
  directory = tmp_path / "shared"
  directory.mkdir()
  directory.chmod(0o755)
  saved_state(directory)
  assert mode(directory) == 0o755
  assert mode(directory / "4") == 0o700
