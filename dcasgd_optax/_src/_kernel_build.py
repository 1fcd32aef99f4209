"""Compiles ``cpu_kernel.cc`` once per user and machine, and loads it safely.

A shared object runs code in the process that loads it, so the kernel is
loaded only from a cache that no one else can write:

* the cache is ``$DCASGD_OPTAX_CACHE_DIR``, else ``~/.cache/dcasgd_optax``,
  created with mode 0700. It is used only if no component of its path is a
  symbolic link (each is opened without following links) and it is owned by
  the user with no group or other write bit. Otherwise the kernel is built
  into a private temporary directory, with a warning, and not kept;
* the ``.so`` is opened without following links and checked (a regular file
  the user owns, no group or other write bit); the checked open file is the
  one loaded (through ``/proc/self/fd``, else from a private copy). A
  cached file that fails the check is rebuilt over;
* a build takes a lock on the cache (``fcntl.flock``), so processes that
  start together compile once; it removes temporary files that builds
  killed before finishing left behind, compiles in a private temporary
  directory and renames the result into place;
* the file name is a hash of the source, the jaxlib version, the compiler,
  the flags and the CPU (model and feature flags). Where the CPU cannot be
  identified the kernel is built without ``-march=native``, so no natively
  tuned build is reused on a machine it was not built for.

:func:`build_cpu_kernel` (``python -m dcasgd_optax.build_kernel``) builds it
ahead of time.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import pathlib
import shutil
import stat
import struct
import subprocess
import tempfile
import warnings

import jax
import jaxlib

try:
  import fcntl  # pylint: disable=g-import-not-at-top
except ImportError:  # Windows: no lock (and no kernel, for want of O_NOFOLLOW).
  fcntl = None  # type: ignore[assignment]

SOURCE = pathlib.Path(__file__).with_name("cpu_kernel.cc")
CACHE_DIR = "DCASGD_OPTAX_CACHE_DIR"
_FLAGS = ("-O3", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")
_NATIVE = ("-march=native",)  # Only for an identified CPU; dropped if refused.
_LOCK = ".lock"
_PREFIX = "cpu_kernel-"
CPUINFO = "/proc/cpuinfo"


class UnsafeCacheError(OSError):
  """The cache directory is not private to the user."""


def build_cpu_kernel(cache_dir: str | os.PathLike | None = None
                     ) -> pathlib.Path:
  """Compiles the CPU kernel of :func:`dcasgd` into its cache, ahead of time.

  The first ``dcasgd`` update on CPU does this itself (a few seconds); call
  it beforehand (or run ``python -m dcasgd_optax.build_kernel``) on a
  machine image, before starting many processes, or to see a build error.
  A kernel already cached is only checked. The cache must be private (see
  the README); the kernel is built for this machine's CPU.

  Args:
    cache_dir: the cache directory; by default ``$DCASGD_OPTAX_CACHE_DIR``,
      else ``~/.cache/dcasgd_optax``.

  Returns:
    The path of the compiled kernel.

  Raises:
    UnsafeCacheError: (an ``OSError``) if the cache directory is a symbolic
      link, has one in its path, is not owned by the user, or others can
      write it.
    RuntimeError: if no C++ compiler is found or the build fails.

  Examples:
    >>> import dcasgd_optax
    >>> dcasgd_optax.build_cpu_kernel().name.startswith("cpu_kernel-")
    True
  """
  cache = pathlib.Path(cache_dir) if cache_dir is not None else cache_path()
  name = file_name()
  dir_fd = private_dir(cache, create=True)
  try:
    fd = _cached(dir_fd, name)
    try:
      if not hasattr(_dlopen(fd, cache / name), "DcasgdSgdUpdate"):
        raise RuntimeError(f"{cache / name} lacks the kernel's symbol")
    finally:
      os.close(fd)
  finally:
    os.close(dir_fd)
  return cache / name


def load() -> ctypes.CDLL:
  """The kernel, from the cache, else built in a private temporary directory.

  Raises:
    OSError, RuntimeError, subprocess.SubprocessError: the build or the
      load failed.
  """
  name = file_name()
  try:
    dir_fd = private_dir(cache_path(), create=True)
  except OSError as e:
    warnings.warn(
        f"dcasgd_optax: not using the CPU kernel's cache ({e}); building the "
        f"kernel in a private temporary directory instead, again in every "
        f"process. Set ${CACHE_DIR} to a directory of yours that no one else "
        f"can write.", RuntimeWarning, stacklevel=3,
    )
    with tempfile.TemporaryDirectory(prefix="dcasgd_optax-") as tmp:
      dir_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
      return _load_from(dir_fd, name, pathlib.Path(tmp))
  return _load_from(dir_fd, name, cache_path())


def _load_from(dir_fd: int, name: str, where: pathlib.Path) -> ctypes.CDLL:
  """Loads ``name`` from ``dir_fd`` (building it if missing); closes dir_fd."""
  try:
    fd = _cached(dir_fd, name)
  finally:
    os.close(dir_fd)
  try:
    return _dlopen(fd, where / name)
  finally:
    os.close(fd)


def cache_path() -> pathlib.Path:
  """``$DCASGD_OPTAX_CACHE_DIR``, else ``~/.cache/dcasgd_optax``."""
  return pathlib.Path(
      os.environ.get(CACHE_DIR)
      or pathlib.Path.home() / ".cache" / "dcasgd_optax"
  )


def file_name() -> str:
  """The kernel's file name: a hash of everything the build depends on."""
  cpu = cpu_id()
  key = hashlib.sha256(b"\0".join([
      SOURCE.read_bytes(), jaxlib.__version__.encode(),
      compiler().encode(), " ".join(flags(cpu)).encode(),
      (cpu or "unidentified CPU").encode(),
  ])).hexdigest()[:20]
  return f"{_PREFIX}{key}.so"


def flags(cpu: str | None = None) -> tuple[str, ...]:
  """The compiler flags: natively tuned only for an identified CPU."""
  return _FLAGS + (_NATIVE if cpu else ())


def cpu_id() -> str | None:
  """The CPU's model and feature flags (Linux), or None if unknown."""
  try:
    info = pathlib.Path(CPUINFO).read_text(errors="replace")
  except OSError:
    return None
  wanted = ("model name", "flags", "Features", "CPU implementer",
            "CPU part", "CPU architecture", "vendor_id", "cpu family")
  lines = sorted({ln for ln in info.splitlines() if ln.startswith(wanted)})
  if not any(ln.startswith(("flags", "Features")) for ln in lines):
    return None  # No feature list: cannot tell what -march=native assumed.
  return "\n".join(lines)


def compiler() -> str:
  """``$CXX``, else the first C++ compiler on the PATH."""
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    found = name and shutil.which(name)
    if found:
      return found
  raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")


def private_dir(path: pathlib.Path, create: bool = False) -> int:
  """An open descriptor of ``path``, checked to be the user's alone.

  Each component of the absolute path is opened relative to the one before
  without following symbolic links, so what is checked is what is used.

  Raises:
    UnsafeCacheError: a component is a symbolic link, or the directory is
      not owned by the user or is writable by its group or others.
  """
  path = pathlib.Path(os.path.abspath(path))
  if create:
    os.makedirs(path, mode=0o700, exist_ok=True)
  fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
  try:
    for part in path.parts[1:]:
      try:
        child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                        dir_fd=fd)
      except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
          raise UnsafeCacheError(
              f"{path}: {part!r} is a symbolic link or not a directory"
          ) from None
        raise
      os.close(fd)
      fd = child
    info = os.fstat(fd)
    if info.st_uid != os.geteuid():
      raise UnsafeCacheError(f"{path} is not owned by you")
    if info.st_mode & 0o022:
      raise UnsafeCacheError(
          f"{path} is writable by its group or others "
          f"(mode {stat.S_IMODE(info.st_mode):o}; want 700)"
      )
  except BaseException:
    os.close(fd)
    raise
  return fd


def checked_file(dir_fd: int, name: str) -> int | None:
  """``name`` in ``dir_fd``, opened without following links, or None.

  None if it is missing or is not a regular file of the user's that no one
  else can write (a symbolic link, another's file, a group-writable one).
  """
  try:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC, dir_fd=dir_fd)
  except OSError as e:
    if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
      return None
    raise
  info = os.fstat(fd)
  if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid()
      or info.st_mode & 0o022):
    os.close(fd)
    return None
  return fd


def _cached(dir_fd: int, name: str) -> int:
  """The checked kernel in ``dir_fd``, built (under the lock) if missing."""
  fd = checked_file(dir_fd, name)
  if fd is not None:
    return fd
  with _locked(dir_fd):
    fd = checked_file(dir_fd, name)  # Another process may have built it.
    if fd is None:
      _remove_stale(dir_fd)
      _build_into(dir_fd, name)
      fd = checked_file(dir_fd, name)
  if fd is None:
    raise OSError(f"the kernel built as {name} failed its checks")
  return fd


@contextlib.contextmanager
def _locked(dir_fd: int):
  """Holds the cache's lock: one build at a time, across processes."""
  fd = os.open(_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
               0o600, dir_fd=dir_fd)
  try:
    if fcntl is not None:
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # Releases the lock.


def _remove_stale(dir_fd: int) -> None:
  """Removes temporary files of builds that did not finish (lock held)."""
  for entry in os.listdir(dir_fd):
    if entry.startswith(_PREFIX) and entry.endswith(".tmp"):
      with contextlib.suppress(FileNotFoundError):
        os.unlink(entry, dir_fd=dir_fd)


def _build_into(dir_fd: int, name: str) -> None:
  """Compiles in a private temporary directory, then renames into place."""
  partial = f"{name}.{os.getpid()}.tmp"
  with tempfile.TemporaryDirectory(prefix="dcasgd_optax-") as tmp:
    built = os.path.join(tmp, "cpu_kernel.so")
    _compile(compiler(), built)
    src = os.open(built, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    dst = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                  | os.O_NOFOLLOW | os.O_CLOEXEC, 0o700, dir_fd=dir_fd)
    try:
      with os.fdopen(src, "rb", closefd=False) as r, \
          os.fdopen(dst, "wb", closefd=False) as w:
        shutil.copyfileobj(r, w)
      os.fsync(dst)
    finally:
      os.close(src)
      os.close(dst)
  try:
    os.replace(partial, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(partial, dir_fd=dir_fd)


def _compile(cxx: str, output: str) -> None:
  """Compiles SOURCE to ``output``, natively tuned if the compiler can."""
  include = ("-isystem", jax.ffi.include_dir())
  cpu = cpu_id()
  tries = [flags(cpu), _FLAGS] if cpu else [flags(cpu)]
  errors = ""
  for these in tries:
    done = subprocess.run(
        [cxx, *these, *include, str(SOURCE), "-o", output],
        capture_output=True, timeout=600, check=False,
    )
    if done.returncode == 0:
      return
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    errors = lines[-1] if lines else f"exit status {done.returncode}"
  raise RuntimeError(f"{cxx} failed: {errors}")


_DLOPENED: set[str] = set()


def _dlopen(fd: int, path: pathlib.Path) -> ctypes.CDLL:
  """Loads the open file ``fd`` (the checked one, not whatever its name is).

  Through ``/proc/self/fd``: the dynamic loader returns the library first
  loaded under a name, so a descriptor number used before is duplicated to
  a new one. Without ``/proc``, from a copy in a private directory.

  Raises:
    OSError: naming ``path`` (the file's name, for messages only).
  """
  try:
    _check_extents(fd)
    return _dlopen_checked(fd)
  except OSError as e:
    raise OSError(f"{path}: {e} (delete it to rebuild)") from e


def _dlopen_checked(fd: int) -> ctypes.CDLL:
  """:func:`_dlopen` once the file's extents are checked."""
  if not os.path.isdir("/proc/self/fd"):
    with tempfile.TemporaryDirectory(prefix="dcasgd_optax-") as tmp:
      copy = os.path.join(tmp, "cpu_kernel.so")
      with os.fdopen(os.dup(fd), "rb") as r, open(copy, "wb") as w:
        os.lseek(r.fileno(), 0, os.SEEK_SET)
        shutil.copyfileobj(r, w)
      return ctypes.CDLL(copy)
  extra = []
  try:
    while f"/proc/self/fd/{fd}" in _DLOPENED:
      fd = os.dup(fd)
      extra.append(fd)
    path = f"/proc/self/fd/{fd}"
    library = ctypes.CDLL(path)
    _DLOPENED.add(path)
    return library
  finally:
    for dup in extra:
      os.close(dup)


def _check_extents(fd: int) -> None:
  """Raises OSError if an ELF file ends before its headers or segments do.

  The dynamic loader maps segments without checking that the file holds
  them, and touching a page past the end of a truncated file kills the
  process (SIGBUS). Files in another format are left to the loader.
  """
  size = os.fstat(fd).st_size
  head = os.pread(fd, 64, 0)
  if head[:4] != b"\x7fELF" or len(head) < 52:
    return
  wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
  if wide:
    phoff, shoff = struct.unpack_from(order + "QQ", head, 32)
    phsize, phnum, shsize, shnum = struct.unpack_from(order + "4H", head, 54)
  else:
    phoff, shoff = struct.unpack_from(order + "II", head, 28)
    phsize, phnum, shsize, shnum = struct.unpack_from(order + "4H", head, 42)
  extents = [(phoff, phsize * phnum), (shoff, shsize * shnum)]
  table = os.pread(fd, phsize * phnum, phoff)
  for k in range(phnum if len(table) == phsize * phnum else 0):
    if wide:
      offset, = struct.unpack_from(order + "Q", table, k * phsize + 8)
      length, = struct.unpack_from(order + "Q", table, k * phsize + 32)
    else:
      offset, = struct.unpack_from(order + "I", table, k * phsize + 4)
      length, = struct.unpack_from(order + "I", table, k * phsize + 16)
    extents.append((offset, length))
  if any(offset + length > size for offset, length in extents):
    raise OSError(f"truncated ({size} bytes)")
