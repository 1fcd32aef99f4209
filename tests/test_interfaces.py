"""Subpackages meet at stated interfaces: no module of one imports a
non-public name of another.

The owners are the core (``dcasgd_optax``'s own modules, ``_src`` and the
drivers' interface ``extend``), ``dcasgd_optax.harness``,
``dcasgd_optax.ray`` and ``experiments``. A module may import anything of
its own owner; from another owner only names with no leading underscore
in any part of the dotted path, e.g. ``from dcasgd_optax.extend import
find_states``, never ``from dcasgd_optax._src.pull import find_states`` or
``from dcasgd_optax.harness import _checks``. (The benchmarks may import
private modules to measure them.)
"""

import ast
import pathlib

import pytest

import dcasgd_optax

ROOT = pathlib.Path(dcasgd_optax.__file__).parent.parent
PACKAGES = ("dcasgd_optax", "experiments")


def owner(module: str) -> str:
  """Which subsystem a dotted module name belongs to."""
  parts = module.split(".")
  if parts[0] == "dcasgd_optax" and len(parts) > 1 and parts[1] in (
      "harness", "ray"):
    return parts[1]
  return parts[0]


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def imported(tree: ast.AST, module: str, is_package: bool):
  """Every ``(dotted target, line)`` a module imports: modules and names."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, node.lineno
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # Relative: resolve against the importing package.
        here = module.split(".")
        here = here if is_package else here[:-1]
        here = here[:len(here) - node.level + 1]
        base = ".".join(here + ([base] if base else []))
      for alias in node.names:
        yield f"{base}.{alias.name}", node.lineno


def violations(path: pathlib.Path) -> list[str]:
  module = module_name(path)
  tree = ast.parse(path.read_text(), str(path))
  found = []
  for target, line in imported(tree, module, path.name == "__init__.py"):
    if owner(target) not in ("dcasgd_optax", "harness", "ray", "experiments"):
      continue  # Third-party.
    if owner(target) == owner(module):
      continue
    if any(part.startswith("_") for part in target.split(".")):
      found.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
  return found


def sources():
  for package in PACKAGES:
    yield from sorted((ROOT / package).rglob("*.py"))


def test_no_subpackage_imports_a_private_name_of_another():
  found = [v for path in sources() for v in violations(path)]
  assert not found, "\n".join(found)


@pytest.mark.parametrize("line, bad", [
    ("from dcasgd_optax._src.pull import find_states", True),
    ("from dcasgd_optax._src import _checks", True),
    ("import dcasgd_optax._src.alias", True),
    ("from dcasgd_optax.ray import _layout", True),
    ("from dcasgd_optax.extend import find_states", False),
    ("from dcasgd_optax import pull", False),
    ("from dcasgd_optax.harness import _checks", False),  # its own
])
def test_the_check_sees_a_private_import(tmp_path, line, bad, monkeypatch):
  """The check itself, on a module placed in the harness."""
  path = ROOT / "dcasgd_optax" / "harness" / "_probe_for_test.py"
  monkeypatch.setattr(pathlib.Path, "read_text", lambda self: line)
  assert bool(violations(path)) == bad
