"""Writes the generated part of the docs before Sphinx reads anything.

Into ``docs/_generated`` (not committed):

* ``api/<package>.rst``: one page per package of ``conf.api_packages``,
  listing its ``__all__`` in an ``autosummary`` table whose entries get a
  page each (a submodule listed in ``__all__`` links to its own package
  page instead);
* the Markdown files of the repository shown in the docs
  (``conf.external_pages``: benchmarks, experiments' README, the
  changelog) and the notebooks, with their relative links rewritten: to
  the page when the target is in the docs, to the file on GitHub when it
  is not, and images to their path in the repository;
* ``choose.md``: the choose-a-method table, from the methods grid's
  results (:mod:`experiments.choose`).

Files are rewritten only when their content changes, so incremental builds
stay incremental.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import posixpath
import re
import shutil
import sys
import types
from typing import Any

from sphinx import application

DOCS = pathlib.Path(__file__).resolve().parent.parent
ROOT = DOCS.parent
OUT = DOCS / "_generated"
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _write(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  if not path.exists() or path.read_text() != text:
    path.write_text(text)


def api_page(package: str) -> str:
  """The reStructuredText of ``package``'s API page, from its __all__."""
  module = importlib.import_module(package)
  title = f"``{package}``"
  lines = [title, "=" * len(title), "", f".. automodule:: {package}",
           "   :no-members:", "", f".. currentmodule:: {package}", ""]
  names = list(module.__all__)
  submodules = [n for n in names
                if isinstance(getattr(module, n), types.ModuleType)]
  objects = [n for n in names if n not in submodules]
  if objects:
    lines += [".. autosummary::", "   :toctree: _autosummary",
              "   :nosignatures:", ""]
    lines += [f"   {n}" for n in objects] + [""]
  if submodules:
    lines += ["Submodules", "----------", ""]
    lines += [f"* :mod:`{package}.{n}`" for n in submodules] + [""]
  return "\n".join(lines)


def rewrite_links(text: str, origin: str, pages: dict[str, str],
                  docname: str, repo_url: str) -> str:
  """Rewrites the relative links of ``text``, a file at repo path ``origin``.

  ``pages`` maps repository paths shown in the docs to their doc names;
  ``docname`` is the doc being written (links are made relative to it).
  """
  here = posixpath.dirname(origin)
  doc_dir = posixpath.dirname(docname)

  def sub(m: re.Match) -> str:
    bang, label, target = m.groups()
    if re.match(r"^[a-z]+:|^#|^/", target):
      return m.group(0)
    path, _, anchor = target.partition("#")
    repo_path = posixpath.normpath(posixpath.join(here, path))
    if bang:  # an image: its place in the repository, from the doc
      rel = posixpath.relpath(repo_path, posixpath.join("docs", doc_dir))
      return f"![{label}]({rel})"
    if repo_path in pages:
      rel = posixpath.relpath(pages[repo_path], doc_dir or ".")
      suffix = os.path.splitext(repo_path)[1]
      return f"[{label}]({rel}{suffix}{'#' + anchor if anchor else ''})"
    kind = "tree" if (ROOT / repo_path).is_dir() else "blob"
    url = f"{repo_url}/{kind}/main/{repo_path}"
    return f"[{label}]({url}{'#' + anchor if anchor else ''})"

  return LINK.sub(sub, text)


def _rewrite_notebook(text: str, **kw) -> str:
  import json  # pylint: disable=g-import-not-at-top
  nb = json.loads(text)
  for cell in nb["cells"]:
    if cell["cell_type"] == "markdown":
      cell["source"] = rewrite_links("".join(cell["source"]), **kw)
  return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def pages_map(cfg: Any) -> dict[str, str]:
  """Repository paths shown in the docs -> their doc names."""
  pages = dict(cfg.external_pages)
  for src in ROOT.glob("docs/*.md"):
    pages[f"docs/{src.name}"] = src.stem
  return pages


def generate(app: application.Sphinx, cfg: Any) -> None:
  del app
  OUT.mkdir(exist_ok=True)
  for package in cfg.api_packages:
    _write(OUT / "api" / f"{package}.rst", api_page(package))
  # docs/ray.md and the like are in the docs already: their links are
  # rewritten on reading (see _source_read), with the same map.
  pages = pages_map(cfg)
  for repo_path, docname in cfg.external_pages.items():
    text = (ROOT / repo_path).read_text()
    kw = dict(origin=repo_path, pages=pages, docname=docname,
              repo_url=cfg.repo_url)
    if repo_path.endswith(".ipynb"):
      _write(DOCS / (docname + ".ipynb"), _rewrite_notebook(text, **kw))
    else:
      _write(DOCS / (docname + ".md"), rewrite_links(text, **kw))
  sys.path.insert(0, str(ROOT))
  from experiments import choose  # pylint: disable=g-import-not-at-top
  _write(OUT / "choose.md", choose.table(choose.choices()))


def _source_read(app: application.Sphinx, docname: str,
                 source: list[str]) -> None:
  """Rewrites the links of the docs' own Markdown pages (docs/*.md)."""
  path = DOCS / (docname + ".md")
  if "/" in docname or not path.exists():
    return
  if docname == "index" and (DOCS / "pod.md").exists():
    # "Running on a pod" joins the guides once docs/pod.md exists.
    source[0] = source[0].replace("\nray\n", "\nray\npod\n", 1)
  source[0] = rewrite_links(
      source[0], origin=f"docs/{docname}.md",
      pages=pages_map(app.config), docname=docname,
      repo_url=app.config.repo_url)


_NAMES_ONLY = re.compile(r"^(\s+)(\w+(?:, \w+)*,)$")


def join_shared_args(lines: list[str]) -> None:
  """Joins an Args entry naming several parameters over two lines.

  ``a, b, c,`` / ``    d: as in f.`` becomes one line, which napoleon reads
  as one entry for all of them (it stops at the first line otherwise).
  """
  i = 0
  while i < len(lines) - 1:
    m = _NAMES_ONLY.match(lines[i])
    nxt = lines[i + 1]
    if m and nxt.startswith(m.group(1) + " ") and ":" in nxt:
      lines[i:i + 2] = [lines[i] + " " + nxt.strip()]
    i += 1


def _process_docstring(app, what, name, obj, options, lines) -> None:
  del app, what, name, obj, options
  join_shared_args(lines)


def _missing_reference(app, env, node, contnode):
  """Resolves a short name used inside a private module (``Simulator`` in
  ``dcasgd_optax.harness._clock``) against the public packages."""
  if node.get("refdomain") != "py":
    return None
  target = node["reftarget"].lstrip("~.")
  domain = env.get_domain("py")
  for package in app.config.api_packages:
    full = f"{package}.{target}"
    if full in domain.objects:
      return domain.resolve_xref(env, node["refdoc"], app.builder,
                                 node["reftype"], full, node, contnode)
  return None


def setup(app: application.Sphinx) -> dict[str, Any]:
  # Before napoleon (priority 500) parses the docstring.
  app.connect("autodoc-process-docstring", _process_docstring, priority=400)
  app.connect("missing-reference", _missing_reference)
  app.add_config_value("external_pages", {}, "env")
  app.add_config_value("repo_url", "", "env")
  # Before Sphinx looks for the sources (and autosummary for its stubs).
  app.connect("config-inited", generate)
  app.connect("source-read", _source_read)
  return {"version": "1", "parallel_read_safe": True}


def clean() -> None:
  shutil.rmtree(OUT, ignore_errors=True)
