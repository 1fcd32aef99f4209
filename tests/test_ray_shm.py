"""dcasgd_optax.ray's shared-memory channel (_shm) and the worker's wait on it.

No Ray is started: the files are made in /dev/shm as a shard and a worker
would, and the worker's wait gets a stand-in for Ray's reply.
"""

import os
import types
import uuid

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("orbax.checkpoint")

from dcasgd_optax.ray import _protocol  # pylint: disable=g-import-not-at-top
from dcasgd_optax.ray import _shm  # pylint: disable=g-import-not-at-top
from dcasgd_optax.ray import _worker  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.skipif(not _shm.available(),
                                reason="no writable /dev/shm")
SPECS = [((3,), np.dtype(np.float32)), ((2, 2), np.dtype(np.float64))]


@pytest.fixture
def path():
  """A fresh name in /dev/shm, removed after the test."""
  p = os.path.join(_shm.DIRECTORY, f"dcasgd-optax-test-{uuid.uuid4().hex}")
  yield p
  for q in (p, p + "-link"):
    if os.path.lexists(q):
      os.unlink(q)


def _plain_file(path, size, mode=0o600):
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
  os.ftruncate(fd, size)
  os.fchmod(fd, mode)
  os.close(fd)


def test_the_bell_works_on_a_descriptor_above_1023():
  # select() refuses file descriptors >= 1024; a worker with many files
  # open gets such a doorbell.
  fill = []
  try:
    while not fill or fill[-1] < 1024:
      fill.append(os.open("/dev/null", os.O_RDONLY))
    os.close(fill.pop())  # The next descriptor opened is >= 1024.
    name = os.path.join(_shm.DIRECTORY, f"dcasgd-optax-test-{uuid.uuid4().hex}")
    bell = _shm.Bell(name, create=True)
    assert bell.fd >= 1024
    assert bell.wait(0) is None
    bell.ring(_shm.TICKET)
    assert bell.wait(1.0) == _shm.TICKET and bell.wait(0) is None
    bell.close()
  finally:
    for fd in fill:
      os.close(fd)
  assert not os.path.exists(name)


def test_a_created_buffer_is_removed_if_it_cannot_be_mapped(path, monkeypatch):
  def fail(*args, **kwargs):
    raise OSError("no address space left")
  monkeypatch.setattr(_shm.mmap, "mmap", fail)
  with pytest.raises(OSError, match="no address space"):
    _shm.Buffer(path, SPECS, create=True)
  assert not os.path.lexists(path)


def test_a_buffer_of_another_size_is_refused(path):
  _, size = _shm._offsets(SPECS)  # pylint: disable=protected-access
  _plain_file(path, size + 64)
  with pytest.raises(OSError, match=f"holds {size + 64} bytes, not {size}"):
    _shm.Buffer(path, SPECS, create=False)


def test_a_link_is_never_followed(path):
  _shm.Buffer(path, SPECS, create=True)  # The file the link points to.
  os.symlink(path, path + "-link")
  with pytest.raises(OSError):
    _shm.Buffer(path + "-link", SPECS, create=False)
  os.mkfifo(path + "-fifo", 0o600)
  try:
    os.symlink(path + "-fifo", path + "-link2")
    with pytest.raises(OSError):
      _shm.Bell(path + "-link2", create=False)
  finally:
    for q in (path + "-fifo", path + "-link2"):
      if os.path.lexists(q):
        os.unlink(q)


def test_a_file_of_the_wrong_type_or_open_to_others_is_refused(path):
  _, size = _shm._offsets(SPECS)  # pylint: disable=protected-access
  _plain_file(path, size)
  with pytest.raises(OSError, match="is not a named pipe"):
    _shm.Bell(path, create=False)  # A regular file where a pipe should be.
  os.chmod(path, 0o644)
  with pytest.raises(OSError, match="mode 644: other users"):
    _shm.Buffer(path, SPECS, create=False)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to chown")
def test_a_file_of_another_user_is_refused(path):
  _, size = _shm._offsets(SPECS)  # pylint: disable=protected-access
  _plain_file(path, size)
  os.chown(path, 65534, 65534)
  with pytest.raises(OSError, match="owned by uid 65534"):
    _shm.Buffer(path, SPECS, create=False)


def test_each_side_maps_read_only_the_buffer_it_only_reads():
  shard = _shm.Channel.create(0, SPECS, "test")
  worker = _shm.Channel.attach(0, shard.paths, SPECS)
  try:
    assert not any(p.flags.writeable for p in shard.grads.pieces)
    assert not any(p.flags.writeable for p in worker.params.pieces)
    worker.grads.write([np.arange(3, dtype=np.float32), np.eye(2)])
    copy = shard.read_grads()
    worker.grads.write([np.full(3, np.nan, np.float32), np.zeros((2, 2))])
    # The shard's copy is its own: later writes to the buffer do not reach it.
    np.testing.assert_array_equal(copy[0], [0, 1, 2])
    np.testing.assert_array_equal(copy[1], np.eye(2))
    assert all(c.flags.writeable and c.base is None for c in copy)
  finally:
    worker.close()
    shard.close()


def _fake_ray(reply):
  """Stands in for ``ray`` in _worker: the push's reply is ready at once."""
  return types.SimpleNamespace(wait=lambda refs, timeout: (refs, []),
                               get=lambda ref: reply)


@pytest.mark.parametrize("rung", [None, 0, _shm.TICKET])
@pytest.mark.parametrize("status", ["applied", "skipped", "stale"])
def test_the_worker_trusts_the_doorbell_not_the_reply_alone(
    rung, status, monkeypatch):
  info = _protocol.ApplyInfo(status, 3, 0, 0.0, 0.0)
  monkeypatch.setattr(_worker, "ray", _fake_ray((info, True)))
  channel = _shm.Channel.create(0, SPECS, "test")
  try:
    if rung is not None:
      channel.bell.ring(rung)
    wait = lambda: _worker.GradientWorker._wait_bell(channel, "ref")  # pylint: disable=protected-access
    if rung is not None:
      assert wait() == (False, rung == _shm.TICKET)
    elif status == "stale":  # A stale push rings nothing.
      assert wait() == (True, False)
    else:  # Processed, but the params buffer was never said to be written.
      with pytest.raises(RuntimeError, match="never rang"):
        wait()
  finally:
    channel.close()
