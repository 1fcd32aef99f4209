"""A shared-memory channel between a worker and a shard on the same node.

On one node, the cheapest way Ray moves a message between two actors still
copies it several times (serializing, the call's transport, deserializing):
benchmarks/ray_throughput.md measures a 400 kB round trip at over twice the
cost of an empty call. A worker and a shard on the same node therefore share
two buffers instead, each a file in ``/dev/shm`` mapped by both processes:

* the *gradient buffer*: the worker writes its gradient's pieces there
  (followed by its ``grad_sq``'s pieces, with ``push_grad_sq=True``), then
  calls the shard's ``push_shared`` with only the small header;
* the *params buffer*: the shard copies the gradient's pieces out of the
  gradient buffer (:meth:`Channel.read_grads`), checks and applies that
  copy, and writes its pieces of the new params there; the worker reads
  them in place for its next gradient.

The actor call orders every access, so no lock is needed: the worker writes
the gradient buffer only while no push of its to that shard is in flight,
and the shard writes the params buffer only inside a push, while the worker
waits for the reply. The shard still does not trust the order: it works on
its own copy of the gradient, so a buffer written during a push cannot get
a non-finite gradient past its check. Each side maps the buffer it only
reads read-only.

Everything under ``/dev/shm`` is shared by the host's users, so every file
is created or opened without following links, and checked to be of its type
(a regular file, a named pipe), this user's and closed to the others; the
worker also checks each buffer's size before mapping it.

The reply itself comes through the channel too: a *doorbell*, a named pipe
on which the shard writes one byte (:data:`TICKET` if it granted one) once
the params buffer is written, at the end of a push that was applied or
skipped (a stale one rings nothing). The worker
waits on it instead of on Ray's reply, which crosses more processes and
threads (about half a millisecond more per update on one machine); Ray's
reply still tells it of a push that raised or of a shard that died (it
looks every :data:`POLL_S` seconds while it waits).

A channel belongs to one incarnation of a worker (one ``epoch``): a
restarted worker opens a new one. The shard creates the three files, the
buffers with their whole size reserved (``posix_fallocate``, so a full
``/dev/shm`` is an error at opening, never a crash at writing), and the
worker unlinks them as soon as it has opened them: from then on they are in
no directory, and the memory is released when the last of the two processes
closes it or dies. The shard unlinks them too when it closes the channel (a
worker that died before opening them).
"""

from __future__ import annotations

from collections.abc import Sequence
import errno
import math
import mmap
import os
import select
import stat
from typing import Any
import uuid

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


def _unlink(path: str) -> None:
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass


def available() -> bool:
  """Whether this host has a ``/dev/shm`` this process can write to."""
  return os.path.isdir(DIRECTORY) and os.access(DIRECTORY, os.W_OK)


def _open(path: str, flags: int, kind: int, what: str) -> int:
  """Opens ``path`` without following a link; checks its type and owner.

  The file must be of type ``kind`` (``stat.S_IFREG`` or ``stat.S_IFIFO``),
  owned by this process's user and closed to every other user: ``/dev/shm``
  is shared by every user of the host, so a file planted there under a
  channel's name (or a link to another file) is refused, never used.

  Raises:
    OSError: if it cannot be opened, or is not such a file (``EPERM``).
  """
  fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
  try:
    st = os.fstat(fd)
    problem = None
    if stat.S_IFMT(st.st_mode) != kind:
      problem = f"is not a {what}"
    elif st.st_uid != os.getuid():
      problem = f"is owned by uid {st.st_uid}, not this user's {os.getuid()}"
    elif st.st_mode & 0o077:
      problem = f"has mode {stat.S_IMODE(st.st_mode):o}: other users reach it"
    if problem:
      raise OSError(errno.EPERM, f"{path} {problem}; not used", path)
  except BaseException:
    os.close(fd)
    raise
  return fd


class Buffer:
  """A file in :data:`DIRECTORY` mapped into this process, as NumPy pieces.

  Args:
    path: the file.
    specs: ``(shape, dtype)`` of each piece it holds, in order.
    create: create the file (it must not exist) and reserve its memory;
      else open an existing one, which must hold exactly the specs' size.
    writable: map it for writing; else read-only (the side that only
      reads: its pieces are then read-only arrays).

  The file is opened without following links and must be a regular file
  of this user's, closed to others (see :func:`_open`); a file created here
  is removed again if anything after its creation fails.

  Raises:
    OSError: if it cannot be created (e.g. ``/dev/shm`` is full), opened or
      mapped, or is not such a file, or has another size.
  """

  def __init__(self, path: str, specs: Specs, create: bool,
               writable: bool = True):
    offsets, size = _offsets(specs)
    if create:
      flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    else:
      flags = os.O_RDWR if writable else os.O_RDONLY
    fd = _open(path, flags, stat.S_IFREG, "regular file")
    try:
      if create:
        os.posix_fallocate(fd, 0, size)
      elif os.fstat(fd).st_size != size:
        raise OSError(errno.EINVAL,
                      f"{path} holds {os.fstat(fd).st_size} bytes, not "
                      f"{size}", path)
      access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
      self._map = mmap.mmap(fd, size, access=access)
    except BaseException:
      if create:
        _unlink(path)
      raise
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
    _unlink(self.path)

  def close(self) -> None:
    """Unlinks the file and drops this process's mapping."""
    self.unlink()
    self.pieces = []
    try:
      self._map.close()
    except BufferError:  # Views still exist: the GC unmaps it with them.
      pass


# The doorbell's byte: bit 0, the shard granted a ticket.
TICKET = 1
# How often a waiting worker looks at Ray's reply (a push that raised).
POLL_S = 0.01


class Bell:
  """A named pipe in :data:`DIRECTORY`, open for reading and writing.

  Opened with ``O_RDWR | O_NONBLOCK``, without following links (and checked
  like a buffer, see :func:`_open`): opening never waits for the other end,
  and a ring never blocks (a full pipe, whose reader died, drops it).
  """

  def __init__(self, path: str, create: bool):
    if create:
      os.mkfifo(path, 0o600)
    self.path = path
    try:
      self.fd = _open(path, os.O_RDWR | os.O_NONBLOCK, stat.S_IFIFO,
                      "named pipe")
    except OSError:
      if create:
        _unlink(path)
      raise
    self._poll = select.poll()
    self._poll.register(self.fd, select.POLLIN)

  def ring(self, code: int) -> None:
    try:
      os.write(self.fd, bytes([code]))
    except BlockingIOError:  # Nobody has read the last 64 kB of rings.
      pass

  def wait(self, timeout: float) -> int | None:
    """The next byte rung, or ``None`` after ``timeout`` seconds.

    Uses ``poll``, which takes any file descriptor (``select`` refuses one
    of 1024 or more: a process with many files open).
    """
    if not self._poll.poll(max(0, math.ceil(timeout * 1000))):
      return None
    try:
      return os.read(self.fd, 1)[0]
    except BlockingIOError:
      return None

  def unlink(self) -> None:
    """Removes the pipe (the open end stays); fine if it is gone already."""
    _unlink(self.path)

  def close(self) -> None:
    self.unlink()
    if self.fd >= 0:
      self._poll.unregister(self.fd)
      os.close(self.fd)
      self.fd = -1


class Channel:
  """One worker incarnation's two buffers and doorbell with one shard.

  Attributes:
    epoch: the worker's incarnation.
    grads: the gradient buffer (the worker writes, the shard reads).
    params: the params buffer (the shard writes, the worker reads).
    bell: the doorbell (the shard rings, the worker waits).
  """

  def __init__(self, epoch: int, grads: Buffer, params: Buffer, bell: Bell):
    self.epoch, self.grads, self.params, self.bell = epoch, grads, params, bell
    self._copies: list[np.ndarray] | None = None

  def read_grads(self) -> list[np.ndarray]:
    """The shard's own copy of the gradient buffer, taken now.

    The worker can still write the buffer (a bug, or a process that is not
    the worker it says it is): everything the shard does with a gradient
    (the finiteness check, the update) reads this copy, so it sees one
    gradient, never a mix. The copy is overwritten by the next call.
    """
    if self._copies is None:
      self._copies = [np.empty(p.shape, p.dtype) for p in self.grads.pieces]
    for dst, src in zip(self._copies, self.grads.pieces, strict=True):
      np.copyto(dst, src, casting="no")
    return self._copies

  @classmethod
  def create(cls, epoch: int, specs: Specs, name: str,
             grads_specs: Specs | None = None) -> Channel:
    """The shard's side: creates the three files, named after ``name``.

    ``specs`` are the params buffer's pieces, ``grads_specs`` the gradient
    buffer's (``None``: the same; a push that carries ``grad_sq`` too has
    twice as many). The shard maps the gradient buffer read-only (it reads
    it only through :meth:`read_grads`) and the params buffer for writing.
    """
    grads_specs = specs if grads_specs is None else grads_specs
    stem = os.path.join(DIRECTORY, f"dcasgd-optax-{name}-{uuid.uuid4().hex}")
    made: list[Any] = []
    try:
      made.append(Buffer(stem + "-grads", grads_specs, create=True,
                         writable=False))
      made.append(Buffer(stem + "-params", specs, create=True))
      made.append(Bell(stem + "-bell", create=True))
    except OSError:
      for x in made:
        x.close()
      raise
    return cls(epoch, *made)

  @classmethod
  def attach(cls, epoch: int, paths: Sequence[str], specs: Specs,
             grads_specs: Specs | None = None) -> Channel:
    """The worker's side: opens the three files, then unlinks them.

    ``specs`` and ``grads_specs`` as for :meth:`create`. The worker maps the
    params buffer read-only. Each file must be what the shard created: of
    the right type and size, this user's and no one else's, and not a link
    (else ``OSError``, and the worker pushes in the calls).
    """
    grads_specs = specs if grads_specs is None else grads_specs
    made: list[Any] = []
    try:
      made.append(Buffer(paths[0], grads_specs, create=False))
      made.append(Buffer(paths[1], specs, create=False, writable=False))
      made.append(Bell(paths[2], create=False))
    except OSError:
      for x in made:
        x.close()
      raise
    for x in made:
      x.unlink()
    return cls(epoch, *made)

  @property
  def paths(self) -> tuple[str, str, str]:
    return self.grads.path, self.params.path, self.bell.path

  def close(self) -> None:
    self.grads.close()
    self.params.close()
    self.bell.close()
