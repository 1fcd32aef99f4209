"""A shared-memory channel between a worker and a shard on the same node.

On one node, the cheapest way Ray moves a message between two actors still
copies it several times (serializing, the call's transport, deserializing):
benchmarks/ray_throughput.md measures a 400 kB round trip at over twice the
cost of an empty call. A worker and a shard on the same node therefore share
two buffers instead, each a file in ``/dev/shm`` mapped by both processes:

* the *gradient buffer*: the worker writes its gradient's pieces there, then
  calls the shard's ``push_shared`` with only the small header;
* the *params buffer*: the shard reads the pieces in place, applies them,
  writes its pieces of the new params there and replies with the header;
  the worker reads them in place for its next gradient.

The actor call orders every access, so no lock is needed: the worker writes
the gradient buffer only while no push of its to that shard is in flight,
and the shard writes the params buffer only inside a push, while the worker
waits for the reply.

A channel belongs to one incarnation of a worker (one ``epoch``): a
restarted worker opens a new one. The shard creates the two files with their
whole size reserved (``posix_fallocate``, so a full ``/dev/shm`` is an error
at opening, never a crash at writing) and the worker unlinks them as soon as
it has mapped them: from then on they are in no directory, and the memory
is released when the last of the two processes unmaps it or dies. The shard
unlinks them too when it closes the channel (a worker that died before
mapping them).
"""

from __future__ import annotations

import mmap
import os
import uuid
from typing import Sequence

import numpy as np

# Where the buffers live: a tmpfs (memory) on Linux.
DIRECTORY = "/dev/shm"
# Each piece starts at a multiple of this (a cache line), so that XLA can
# read it in place.
_ALIGN = 64

Specs = Sequence[tuple[tuple[int, ...], np.dtype]]


def _offsets(specs: Specs) -> tuple[list[int], int]:
  """Each piece's byte offset in a buffer, and the buffer's size."""
  offsets, end = [], 0
  for shape, dtype in specs:
    end = -(-end // _ALIGN) * _ALIGN
    offsets.append(end)
    end += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
  return offsets, max(end, 1)


def available() -> bool:
  """Whether this host has a ``/dev/shm`` this process can write to."""
  return os.path.isdir(DIRECTORY) and os.access(DIRECTORY, os.W_OK)


class Buffer:
  """A file in :data:`DIRECTORY` mapped into this process, as NumPy pieces.

  Args:
    path: the file.
    specs: ``(shape, dtype)`` of each piece it holds, in order.
    create: create the file (it must not exist) and reserve its memory;
      else open an existing one.

  Raises:
    OSError: if it cannot be created (e.g. ``/dev/shm`` is full) or opened.
  """

  def __init__(self, path: str, specs: Specs, create: bool):
    offsets, size = _offsets(specs)
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
      if create:
        try:
          os.posix_fallocate(fd, 0, size)
        except OSError:
          os.unlink(path)
          raise
      elif os.fstat(fd).st_size != size:
        raise OSError(f"{path} holds {os.fstat(fd).st_size} bytes, not {size}")
      self._map = mmap.mmap(fd, size)
    finally:
      os.close(fd)
    self.path = path
    self.pieces = [np.ndarray(shape, dtype, buffer=self._map, offset=o)
                   for (shape, dtype), o in zip(specs, offsets)]

  def write(self, pieces: Sequence[np.ndarray]) -> None:
    """Copies ``pieces`` (shaped like the specs) into the buffer."""
    for dst, src in zip(self.pieces, pieces, strict=True):
      np.copyto(dst, src, casting="no")

  def unlink(self) -> None:
    """Removes the file (the mapping stays); fine if it is gone already."""
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      pass

  def close(self) -> None:
    """Unlinks the file and drops this process's mapping."""
    self.unlink()
    self.pieces = []
    try:
      self._map.close()
    except BufferError:  # Views still exist: the GC unmaps it with them.
      pass


class Channel:
  """One worker incarnation's two buffers with one shard.

  Attributes:
    epoch: the worker's incarnation.
    grads: the gradient buffer (the worker writes, the shard reads).
    params: the params buffer (the shard writes, the worker reads).
  """

  def __init__(self, epoch: int, grads: Buffer, params: Buffer):
    self.epoch, self.grads, self.params = epoch, grads, params

  @classmethod
  def create(cls, epoch: int, specs: Specs, name: str) -> "Channel":
    """The shard's side: creates both files, named after ``name``."""
    stem = os.path.join(DIRECTORY, f"dcasgd-optax-{name}-{uuid.uuid4().hex}")
    grads = Buffer(stem + "-grads", specs, create=True)
    try:
      params = Buffer(stem + "-params", specs, create=True)
    except OSError:
      grads.close()
      raise
    return cls(epoch, grads, params)

  @classmethod
  def attach(cls, epoch: int, paths: tuple[str, str], specs: Specs
             ) -> "Channel":
    """The worker's side: maps both files, then unlinks them."""
    grads = Buffer(paths[0], specs, create=False)
    try:
      params = Buffer(paths[1], specs, create=False)
    except OSError:
      grads.close()
      raise
    grads.unlink()
    params.unlink()
    return cls(epoch, grads, params)

  @property
  def paths(self) -> tuple[str, str]:
    return self.grads.path, self.params.path

  def close(self) -> None:
    self.grads.close()
    self.params.close()
