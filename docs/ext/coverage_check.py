"""Fails the docs build when a public name has no API page.

The public names of each package in ``conf.api_packages`` are its
``__all__`` and every other attribute not starting with ``_`` (so a name
added to a package but forgotten in ``__all__`` is caught too; submodules
count when ``__all__`` lists them). A name is documented when the Python
domain holds an object (or, for a module, a module) of that full name
after reading: i.e. when autodoc actually wrote its entry.
"""

from __future__ import annotations

import __future__
import importlib
import types
from typing import Any

from sphinx import application
from sphinx import errors


def public_names(package: str) -> set[str]:
  """Full names of what ``package`` makes public."""
  module = importlib.import_module(package)
  names = set(getattr(module, "__all__", ()))
  for name, value in vars(module).items():
    if name.startswith("_") or isinstance(value, __future__._Feature):
      continue
    if isinstance(value, types.ModuleType) and name not in names:
      continue  # an imported module, not an export
    names.add(name)
  return {f"{package}.{n}" for n in names}


def documented_names(env: Any) -> set[str]:
  py = env.domaindata["py"]
  return set(py["objects"]) | set(py["modules"])


def missing(env: Any, packages: list[str]) -> list[str]:
  public = set().union(*(public_names(p) for p in packages))
  return sorted(public - documented_names(env))


def _check(app: application.Sphinx, env: Any) -> None:
  undocumented = missing(env, app.config.api_packages)
  if undocumented:
    raise errors.ExtensionError(
        "coverage_check: public names without an API page (add them to "
        f"their package's __all__): {undocumented}"
    )


def setup(app: application.Sphinx) -> dict[str, Any]:
  app.add_config_value("api_packages", [], "env")
  app.connect("env-check-consistency", _check)
  return {"version": "1", "parallel_read_safe": True}
