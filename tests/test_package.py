"""The released package: the sdist and the wheel build and pass ``twine
check``, and the wheel, installed into a fresh virtual environment outside
the checkout, runs the README's quickstart (a simulator replay) and builds
the shipped C++ kernel from the installed source."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tomllib
import zipfile

import pytest

import dcasgd_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, **kw):
  proc = subprocess.run(args, capture_output=True, text=True, check=False,
                        **kw)
  assert proc.returncode == 0, (
      f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n"
      f"{proc.stderr[-5000:]}")
  return proc


def test_version_is_written_once():
  meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" not in meta["project"]
  assert "version" in meta["project"]["dynamic"]
  assert meta["tool"]["setuptools"]["dynamic"]["version"] == {
      "attr": "dcasgd_optax.__version__"}
  assert re.fullmatch(r"\d+\.\d+\.\d+", dcasgd_optax.__version__)
  cff = (ROOT / "CITATION.cff").read_text()
  assert f"\nversion: {dcasgd_optax.__version__}\n" in cff


def test_license_is_apache_2_and_in_the_metadata():
  meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert meta["project"]["license"] == "Apache-2.0"
  assert meta["project"]["license-files"] == ["LICENSE"]
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  # PEP 639's license expression needs setuptools >= 77.
  (floor,) = [r for r in meta["build-system"]["requires"]
              if r.startswith("setuptools")]
  assert floor == "setuptools>=77"


def test_core_dependencies_are_what_the_library_imports():
  """A core dependency the library never imports belongs to an extra."""
  meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
  core = {re.split(r"[<>=!~ \[]", d)[0] for d in meta["project"]
          ["dependencies"]}
  imported = set()
  for path in (ROOT / "dcasgd_optax").rglob("*.py"):
    if "ray" in path.relative_to(ROOT).parts or path.name == "checkpoint.py":
      continue  # the extras' modules
    for m in re.finditer(r"^\s*(?:import|from) ([a-z_]+)",
                         path.read_text(), re.MULTILINE):
      imported.add(m.group(1))
  assert core == {"jax", "optax", "numpy"}
  assert core <= imported


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
  dist = tmp_path / "dist"
  _run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir",
       str(dist), str(ROOT))
  (wheel,) = dist.glob("*.whl")
  (sdist,) = dist.glob("*.tar.gz")
  _run(sys.executable, "-m", "twine", "check", "--strict", str(wheel),
       str(sdist))
  names = zipfile.ZipFile(wheel).namelist()
  assert "dcasgd_optax/_src/cpu_kernel.cc" in names
  assert "dcasgd_optax/py.typed" in names
  assert any(n.endswith("licenses/LICENSE") for n in names)
  assert not any(n.startswith(("experiments/", "tests/")) for n in names)

  venv = tmp_path / "venv"
  _run(sys.executable, "-m", "venv", str(venv))
  python = venv / "bin" / "python"
  _run(str(python), "-m", "pip", "install", "--quiet", str(wheel))

  # The README's first Python block (the quickstart: a simulator replay),
  # then the fused update on CPU, which must build the kernel from the
  # installed package's source into an empty cache.
  readme = (ROOT / "README.md").read_text()
  quickstart = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
  work = tmp_path / "outside"
  work.mkdir()
  (work / "check.py").write_text(quickstart + '''
import pathlib, warnings
import numpy as np
warnings.simplefilter("error")  # a kernel that fails to build warns
assert "site-packages" in dcasgd_optax.__file__, dcasgd_optax.__file__
assert np.isfinite(metrics["loss"]).all() and metrics["loss"].shape == (512,)
tx = dcasgd_optax.dcasgd(0.1, num_workers=2, momentum=0.9)
p = {"w": jnp.ones(1000)}
s = tx.init(p)
u, s = jax.jit(lambda g, s, p: tx.update(g, s, p, worker=1))(p, s, p)
from dcasgd_optax._src import _cpu_kernel, _kernel_build
assert _kernel_build.SOURCE.is_file() and "site-packages" in str(
    _kernel_build.SOURCE)
assert _cpu_kernel.enabled()  # built by the update above, from that source
cache = pathlib.Path(_kernel_build.os.environ["DCASGD_OPTAX_CACHE_DIR"])
built = list(cache.glob("*.so"))
assert len(built) == 1, built
assert dcasgd_optax.build_cpu_kernel() == built[0]  # the public way, cached
print("OK", dcasgd_optax.__version__)
'''.replace("import pathlib", "import jax, pathlib"))
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "DCASGD_OPTAX_CPU_KERNEL")}
  env.update(DCASGD_OPTAX_CACHE_DIR=str(tmp_path / "kernel-cache"),
             JAX_PLATFORMS="cpu")
  out = _run(str(python), "check.py", cwd=work, env=env)
  assert f"OK {dcasgd_optax.__version__}" in out.stdout
  # The library only: experiments/ is a folder of the checkout.
  proc = subprocess.run([str(python), "-c", "import experiments"], cwd=work,
                        env=env, capture_output=True, check=False)
  assert proc.returncode != 0
