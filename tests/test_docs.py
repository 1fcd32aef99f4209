"""The documentation runs: every docstring example, every README snippet, and
the public API is exactly what ``__all__`` says."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re
import types
import warnings

import pytest

import dcasgd_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def all_module_names() -> list[str]:
  """Every module of the package, private ones included, found without
  importing the leaf modules (so a missing extra cannot break collection)."""
  names = ["dcasgd_optax"]
  for info in pkgutil.walk_packages(
      dcasgd_optax.__path__, "dcasgd_optax.", onerror=lambda _: None
  ):
    names.append(info.name)
  return sorted(names)


# Deprecated aliases kept for one release: importing them warns (what
# tests/test_checkpoint.py checks); here they are imported like the rest.
DEPRECATED_MODULES = frozenset({"dcasgd_optax.checkpoint"})


def import_or_skip(name: str) -> types.ModuleType:
  try:
    with warnings.catch_warnings():
      if name in DEPRECATED_MODULES:
        warnings.simplefilter("ignore", DeprecationWarning)
      return importlib.import_module(name)
  except ModuleNotFoundError as e:
    if e.name and e.name.split(".")[0] == "dcasgd_optax":
      raise
    pytest.skip(f"{name} needs the optional dependency {e.name!r}")


@pytest.mark.parametrize("name", all_module_names())
def test_docstring_examples_run(name):
  module = import_or_skip(name)
  result = doctest.testmod(
      module, optionflags=OPTIONFLAGS, verbose=False, report=True
  )
  assert result.failed == 0, f"{result.failed} doctest failure(s) in {name}"


def test_every_public_function_has_a_runnable_example():
  finder = doctest.DocTestFinder(recurse=False)
  for name in dcasgd_optax.__all__:
    obj = getattr(dcasgd_optax, name)
    if inspect.isfunction(obj):
      examples = sum(len(t.examples) for t in finder.find(obj, name))
      assert examples > 0, f"dcasgd_optax.{name} has no doctest example"


def test_doctests_are_found_in_the_core_modules():
  """Guards the doctest test itself: it must find the examples it runs."""
  module = importlib.import_module("dcasgd_optax._src.delay_compensation")
  result = doctest.testmod(module, optionflags=OPTIONFLAGS, report=False)
  assert result.attempted >= 5 and result.failed == 0


def ray_extra_installed() -> bool:
  try:
    importlib.import_module("dcasgd_optax.ray")
  except ModuleNotFoundError:
    return False
  return True


def test_doctest_discovery_reaches_every_package():
  """Guards the doctest test: it walks into the harness and Ray packages'
  private modules (Ray's only when its extra is installed, since finding a
  package's modules imports the package)."""
  expected = {
      "dcasgd_optax._src.delay_compensation",
      "dcasgd_optax.harness._simulator",
      "dcasgd_optax.harness._sync_simulator",
      "dcasgd_optax.harness._schedules",
  }
  if ray_extra_installed():
    expected |= {"dcasgd_optax.ray._train", "dcasgd_optax.ray._server"}
  assert expected <= set(all_module_names())


# --- public API -----------------------------------------------------------


def public_names(module: types.ModuleType) -> set[str]:
  """Names a user sees on the module, leaving out its subpackages."""
  return {
      n
      for n, v in vars(module).items()
      if not n.startswith("_") and not isinstance(v, types.ModuleType)
  }


def test_public_api_is_exactly_all():
  exported = dcasgd_optax.__all__
  assert len(set(exported)) == len(exported), "duplicates in __all__"
  assert public_names(dcasgd_optax) == set(exported)
  namespace: dict = {}
  exec("from dcasgd_optax import *", namespace)
  assert set(namespace) - {"__builtins__"} == set(exported)


@pytest.mark.parametrize("name", dcasgd_optax.__all__)
def test_every_exported_name_is_importable_and_public(name):
  namespace: dict = {}
  exec(f"from dcasgd_optax import {name}", namespace)
  obj = namespace[name]
  assert obj is getattr(dcasgd_optax, name)
  assert obj.__doc__, f"{name} has no docstring"
  # Defined in a private module, re-exported by the package (optax's layout).
  assert obj.__module__.startswith("dcasgd_optax._src."), obj.__module__


@pytest.mark.parametrize(
    "name",
    [n for n in all_module_names() if "._" not in n and n != "dcasgd_optax"],
)
def test_public_subpackages_export_exactly_their_all(name):
  module = import_or_skip(name)
  if not hasattr(module, "__all__"):
    pytest.skip(f"{name} defines no __all__")
  exported = list(module.__all__)
  assert len(set(exported)) == len(exported)
  for n in exported:
    assert hasattr(module, n), f"{name}.__all__ lists missing {n!r}"
  assert public_names(module) <= set(exported) | {"annotations"}


# --- README ---------------------------------------------------------------

FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


def readme_blocks() -> list[tuple[int, str]]:
  text = README.read_text()
  return [
      (text.count("\n", 0, m.start(1)) + 1, m.group(1))
      for m in FENCE.finditer(text)
  ]


def test_readme_code_blocks_run(tmp_path, monkeypatch):
  """Every ```python block of README.md, in order, in one namespace."""
  if not README.exists():
    pytest.skip("README.md does not exist yet (the lead writes it)")
  blocks = readme_blocks()
  assert blocks, "README.md has no ```python blocks"
  monkeypatch.chdir(tmp_path)  # snippets that write files write them here
  namespace: dict = {"__name__": "__readme__"}
  for line, source in blocks:
    # Pad so tracebacks point at the README's own line numbers.
    code = compile("\n" * (line - 1) + source, str(README), "exec")
    try:
      exec(code, namespace)
    except Exception as e:
      raise AssertionError(
          f"README.md block starting at line {line} failed: {e!r}"
      ) from e


def test_readme_fence_parser_finds_python_blocks():
  """Guards the README test: the parser sees python blocks and no others."""
  text = (
      "intro\n```python\nx = 1\n```\n```bash\nrm -rf /\n```\n"
      "```python\ny = x\n```\n"
  )
  found = [
      (text.count("\n", 0, m.start(1)) + 1, m.group(1))
      for m in FENCE.finditer(text)
  ]
  assert found == [(3, "x = 1\n"), (9, "y = x\n")]
