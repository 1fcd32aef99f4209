"""The CPU kernel is built once, and only a private, checked build is loaded.

Most tests here stand a tiny shared object in for the kernel (a C++ file
compiled in a fraction of a second) through a fake ``$CXX``, so no test
compiles the kernel itself; every cache is a ``tmp_path``. Loading happens
in subprocesses: the dynamic loader keeps what it loaded for the life of a
process, and a planted library's constructor must not run in this one.
"""

from __future__ import annotations

# pylint: disable=protected-access
import os
import pathlib
import stat
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dcasgd_optax
from dcasgd_optax import build_kernel
from dcasgd_optax._src import _kernel_build

SWITCH = "DCASGD_OPTAX_CPU_KERNEL"
CACHE = "DCASGD_OPTAX_CACHE_DIR"
ROOT = pathlib.Path(__file__).resolve().parents[1]

# The stand-in kernel: `which` says which build was loaded; a planted one
# also writes a marker file when loaded (its constructor runs on dlopen).
STAND_IN = """
#include <stdio.h>
extern "C" int which(void) { return %(which)d; }
extern "C" void* %(symbol)s(void) { return 0; }
%(constructor)s
"""
CONSTRUCTOR = """
__attribute__((constructor)) static void planted(void) {
  FILE* f = fopen("%s", "w");
  if (f) fclose(f);
}
"""


def real_compiler():
  try:
    return _kernel_build.compiler()
  except RuntimeError:
    pytest.skip("no C++ compiler")


def stand_in(tmp_path, name, *, which, marker=None, symbol="DcasgdSgdUpdate"):
  """Compiles a stand-in kernel to ``tmp_path / name``; returns its path."""
  source = tmp_path / f"{name}.cc"
  source.write_text(STAND_IN % dict(
      which=which, symbol=symbol,
      constructor=CONSTRUCTOR % marker if marker else ""))
  out = tmp_path / name
  subprocess.run([real_compiler(), "-shared", "-fPIC", str(source), "-o",
                  str(out)], check=True)
  return out


def fake_cxx(tmp_path, *, sleep=0):
  """A ``$CXX`` that logs each call, waits, and builds a stand-in (which=2)."""
  source = tmp_path / "fresh.cc"
  source.write_text(STAND_IN % dict(which=2, symbol="DcasgdSgdUpdate",
                                    constructor=""))
  log = tmp_path / "cxx.log"
  script = tmp_path / "fake-c++"
  script.write_text(textwrap.dedent(f"""\
      #!/bin/sh
      echo "$@" >> {log}
      sleep {sleep}
      while [ $# -gt 0 ]; do
        if [ "$1" = -o ]; then out="$2"; fi
        shift
      done
      exec {real_compiler()} -shared -fPIC {source} -o "$out"
      """))
  script.chmod(0o700)
  return script, log


def env_for(cache, cxx=None, **extra):
  env = dict(os.environ, **{CACHE: str(cache)}, **extra)
  env.pop(SWITCH, None)
  if cxx is None:
    env.pop("CXX", None)
  else:
    env["CXX"] = str(cxx)
  return env


def name_in(env, monkeypatch):
  """The kernel's file name a process with environment ``env`` looks for."""
  for var in ("CXX", "PATH"):
    if var in env:
      monkeypatch.setenv(var, env[var])
    else:
      monkeypatch.delenv(var, raising=False)
  return _kernel_build.file_name()


def private(path):
  path.mkdir(mode=0o700, parents=True, exist_ok=True)
  path.chmod(0o700)
  return path


# --- the cache directory ----------------------------------------------------


def test_the_cache_is_created_private(tmp_path):
  cache = tmp_path / "a" / "cache"
  os.close(_kernel_build.private_dir(cache, create=True))
  assert stat.S_IMODE(cache.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_a_cache_others_can_write_is_refused(tmp_path, mode):
  cache = private(tmp_path / "cache")
  cache.chmod(mode)
  with pytest.raises(_kernel_build.UnsafeCacheError, match="writable"):
    _kernel_build.private_dir(cache)


@pytest.mark.parametrize("where", ["cache", "parent"])
def test_a_symlinked_cache_is_refused(tmp_path, where):
  real = private(tmp_path / "real" / "cache")
  if where == "cache":
    (tmp_path / "link").symlink_to(real)
    cache = tmp_path / "link"
  else:
    (tmp_path / "link").symlink_to(real.parent)
    cache = tmp_path / "link" / "cache"
  with pytest.raises(_kernel_build.UnsafeCacheError, match="symbolic link"):
    _kernel_build.private_dir(cache)


def test_a_cache_owned_by_another_user_is_refused(tmp_path):
  if os.geteuid() != 0:
    pytest.skip("only root can give a directory away")
  cache = private(tmp_path / "cache")
  os.chown(cache, 65534, 65534)
  with pytest.raises(_kernel_build.UnsafeCacheError, match="not owned"):
    _kernel_build.private_dir(cache)


# --- the cached file --------------------------------------------------------


def planted_in_private_cache(tmp_path, how):
  """A cache dir of the user's holding an unacceptable kernel file."""
  cache = private(tmp_path / "cache")
  name = "cpu_kernel-x.so"
  planted = stand_in(tmp_path, "planted.so", which=1)
  target = cache / name
  if how == "symlink":
    target.symlink_to(planted)
  elif how == "group_writable":
    target.write_bytes(planted.read_bytes())
    target.chmod(0o770)
  elif how == "other_owner":
    if os.geteuid() != 0:
      pytest.skip("only root can give a file away")
    target.write_bytes(planted.read_bytes())
    os.chown(target, 65534, 65534)
  elif how == "fifo":
    os.mkfifo(target, 0o600)
  return cache, name


@pytest.mark.parametrize(
    "how", ["symlink", "group_writable", "other_owner", "fifo"])
def test_a_cached_file_that_fails_its_checks_is_rebuilt(
    tmp_path, monkeypatch, how):
  cache, name = planted_in_private_cache(tmp_path, how)
  dir_fd = _kernel_build.private_dir(cache)
  assert _kernel_build.checked_file(dir_fd, name) is None
  fresh = stand_in(tmp_path, "fresh.so", which=2)
  monkeypatch.setattr(_kernel_build, "_compile",
                      lambda cxx, out: pathlib.Path(out).write_bytes(
                          fresh.read_bytes()))
  fd = _kernel_build._cached(dir_fd, name)
  try:
    assert os.read(fd, 1 << 20) == fresh.read_bytes()
    assert not (cache / name).is_symlink()
  finally:
    os.close(fd)
    os.close(dir_fd)


def test_a_private_regular_file_is_accepted(tmp_path):
  cache = private(tmp_path / "cache")
  (cache / "k.so").write_bytes(b"x")
  (cache / "k.so").chmod(0o700)
  dir_fd = _kernel_build.private_dir(cache)
  fd = _kernel_build.checked_file(dir_fd, "k.so")
  assert fd is not None
  os.close(fd)
  os.close(dir_fd)


# --- the CPU identity -------------------------------------------------------

CPUINFO = "model name\t: Some CPU\nflags\t\t: fpu sse2 avx2\n"


@pytest.mark.parametrize("info", [None, "processor\t: 0\n"],
                         ids=["no_cpuinfo", "no_flags"])
def test_an_unidentified_cpu_gets_no_native_build(tmp_path, monkeypatch, info):
  path = tmp_path / "cpuinfo"
  if info is not None:
    path.write_text(info)
  monkeypatch.setattr(_kernel_build, "CPUINFO", str(path))
  assert _kernel_build.cpu_id() is None
  script, log = fake_cxx(tmp_path)
  monkeypatch.setenv("CXX", str(script))
  _kernel_build._compile(str(script), str(tmp_path / "out.so"))
  assert "-march=native" not in log.read_text()


def test_the_file_name_depends_on_the_cpu(tmp_path, monkeypatch):
  names = []
  for info in (CPUINFO, CPUINFO.replace("avx2", "avx512f"), None):
    path = tmp_path / f"cpuinfo{len(names)}"
    if info is not None:
      path.write_text(info)
    monkeypatch.setattr(_kernel_build, "CPUINFO", str(path))
    names.append(_kernel_build.file_name())
  assert len(set(names)) == 3, names
  monkeypatch.setattr(_kernel_build, "CPUINFO", str(tmp_path / "cpuinfo0"))
  assert "-march=native" in _kernel_build.flags(_kernel_build.cpu_id())


# --- loading: a planted library never runs ---------------------------------

LOAD = """
import warnings
from dcasgd_optax._src import _kernel_build
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  library = _kernel_build.load()
print(library.which(), sum("not using the CPU kernel's cache" in str(w.message)
                           for w in caught))
"""


@pytest.mark.parametrize("how", [
    "group_writable",  # Symbolic links are refused above; end to end, slow:
    pytest.param("symlinked_dir", marks=pytest.mark.slow),
    pytest.param("symlinked_parent", marks=pytest.mark.slow),
])
def test_a_planted_kernel_in_an_unsafe_cache_never_runs(
    tmp_path, monkeypatch, how):
  """The planted .so sits under the kernel's own name where it is looked for."""
  script, _ = fake_cxx(tmp_path)
  real = private(tmp_path / "real" / "cache")
  cache = {
      "group_writable": real,
      "symlinked_dir": tmp_path / "link",
      "symlinked_parent": tmp_path / "link" / "cache",
  }[how]
  if how == "group_writable":
    real.chmod(0o775)
  elif how == "symlinked_dir":
    cache.symlink_to(real)
  else:
    (tmp_path / "link").symlink_to(real.parent)
  env = env_for(cache, script)
  name = name_in(env, monkeypatch)
  marker = tmp_path / "MARKER"
  planted = stand_in(tmp_path, "planted.so", which=1, marker=marker)
  (real / name).write_bytes(planted.read_bytes())
  (real / name).chmod(0o755)
  done = subprocess.run([sys.executable, "-c", LOAD], env=env, cwd=ROOT,
                        capture_output=True, text=True, check=True)
  assert done.stdout.split() == ["2", "1"], done  # The fresh build, warned.
  assert not marker.exists()
  assert (real / name).read_bytes() == planted.read_bytes()  # Not written.


# --- concurrent first use ---------------------------------------------------


def test_processes_that_start_together_compile_once(tmp_path):
  script, log = fake_cxx(tmp_path, sleep=3)
  cache = private(tmp_path / "cache")
  stale = cache / "cpu_kernel-0123.so.999.tmp"  # Left by a killed build.
  stale.write_bytes(b"half")
  env = env_for(cache, script)
  command = [sys.executable, "-m", "dcasgd_optax.build_kernel"]
  builders = [subprocess.Popen(command, env=env, cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for _ in range(2)]
  outs = [b.communicate(timeout=300) for b in builders]
  assert [b.returncode for b in builders] == [0, 0], outs
  paths = {out.strip() for out, _ in outs}
  assert len(paths) == 1, outs
  assert len(log.read_text().splitlines()) == 1  # One compile.
  assert sorted(p.name for p in cache.iterdir()) == sorted(
      [".lock", pathlib.Path(paths.pop()).name])  # The stale file is gone.


def test_the_build_command_reports_an_unsafe_cache(tmp_path, capsys):
  cache = private(tmp_path / "cache")
  cache.chmod(0o777)
  assert build_kernel.main([str(cache)]) == 1
  assert "writable by its group or others" in capsys.readouterr().err
  assert not list(cache.iterdir())


# --- any failure: one warning, XLA's loop, the same numbers -----------------

FALLBACK = """
import sys, warnings
import jax, jax.numpy as jnp, numpy as np, dcasgd_optax
tx = dcasgd_optax.dcasgd(0.1, 2, momentum=0.9)
params = {"w": jnp.linspace(-1.0, 1.0, 100_000)}
grads = {"w": jnp.sin(params["w"])}
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  for _ in range(2):  # Two traces: one warning, no raise.
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, worker=jnp.int32(1)))
    text = update.lower(grads, tx.init(params), params).as_text()
    updates, _ = update(grads, tx.init(params), params)
np.save(sys.argv[1], np.asarray(updates["w"]))
print(sum("CPU kernel" in str(w.message) for w in caught),
      "dcasgd_optax_sgd_update" in text)
"""


def xla_loop_updates(monkeypatch):
  monkeypatch.setenv(SWITCH, "0")
  tx = dcasgd_optax.dcasgd(0.1, 2, momentum=0.9)
  params = {"w": jnp.linspace(-1.0, 1.0, 100_000)}
  grads = {"w": jnp.sin(params["w"])}
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, worker=jnp.int32(1)))
  return np.asarray(update(grads, tx.init(params), params)[0]["w"])


@pytest.mark.parametrize("how", ["truncated", "foreign", "non_utf8_compiler"])
def test_a_failed_build_or_load_warns_once_and_keeps_xlas_loop(
    tmp_path, monkeypatch, how):
  cache = private(tmp_path / "cache")
  cxx = None
  if how == "non_utf8_compiler":
    cxx = tmp_path / "bad-c++"
    cxx.write_text("#!/bin/sh\nprintf 'erreur \\377\\376 fatale\\n' >&2\n"
                   "exit 1\n")
    cxx.chmod(0o700)
  env = env_for(cache, cxx)
  name = name_in(env, monkeypatch)
  if how == "truncated":
    whole = stand_in(tmp_path, "whole.so", which=2).read_bytes()
    (cache / name).write_bytes(whole[:len(whole) // 3])
  elif how == "foreign":  # A library without the kernel's symbol.
    (cache / name).write_bytes(
        stand_in(tmp_path, "foreign.so", which=2, symbol="other").read_bytes())
  if (cache / name).exists():
    (cache / name).chmod(0o700)
  out = tmp_path / "updates.npy"
  done = subprocess.run([sys.executable, "-c", FALLBACK, str(out)], env=env,
                        cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == ["1", "False"], done
  np.testing.assert_array_equal(np.load(out), xla_loop_updates(monkeypatch))
