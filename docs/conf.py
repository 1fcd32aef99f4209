"""Sphinx configuration of the dcasgd-optax documentation.

Built offline with ``make docs`` (warnings are errors). The API pages are
generated from each package's ``__all__`` (``ext/generate.py``), and the
build fails when a public name has no page (``ext/coverage_check.py``).
"""

import os
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "ext"))
sys.path.insert(0, str(DOCS.parent))  # the checkout's package and experiments/
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dcasgd_optax  # pylint: disable=g-import-not-at-top,wrong-import-position

project = "dcasgd-optax"
author = "dcasgd-optax developers"
copyright = "2026, dcasgd-optax developers"  # pylint: disable=redefined-builtin
release = dcasgd_optax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
    "generate",
    "coverage_check",
]

# The packages whose public names each get an API page.
api_packages = [
    "dcasgd_optax",
    "dcasgd_optax.harness",
    "dcasgd_optax.harness.schedules",
    "dcasgd_optax.ray",
    "dcasgd_optax.extend",
]
repo_url = "https://github.com/dcasgd-optax/dcasgd-optax"
# Repository files shown in the docs: repo path -> doc name. Their relative
# links to each other become links between pages; to other files, links to
# the file on GitHub.
external_pages = {
    "experiments/README.md": "_generated/experiments",
    "benchmarks/update_cost.md": "_generated/performance/update_cost",
    "benchmarks/harness_throughput.md":
        "_generated/performance/harness_throughput",
    "benchmarks/ray_throughput.md": "_generated/performance/ray_throughput",
    "benchmarks/compensation_error.md":
        "_generated/performance/compensation_error",
    "benchmarks/curvature_ceiling.md":
        "_generated/performance/curvature_ceiling",
    "benchmarks/multihost_throughput.md":
        "_generated/performance/multihost_throughput",
    "CHANGELOG.md": "_generated/changelog",
    "CONTRIBUTING.md": "_generated/contributing",
    "notebooks/01_quickstart.ipynb": "_generated/notebooks/01_quickstart",
    "notebooks/02_paper_reproduction.ipynb":
        "_generated/notebooks/02_paper_reproduction",
    "notebooks/03_how_delay_compensation_works.ipynb":
        "_generated/notebooks/03_how_delay_compensation_works",
}

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb",
                 ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "ext"]
root_doc = "index"

# Every reference must resolve. Names of other libraries cannot (the build
# is offline: no intersphinx inventories), so they are let through by name.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jnp|optax|chex|np|numpy|ray|flax|nnx|orbax|ocp|"
               r"ml_collections|typing|collections|concurrent|"
               r"enum|types|abc|os|pathlib)(\..*)?"),
    (r"py:.*", r"(Array|ArrayLike|PyTree|Params|Updates|OptState|"
               r"ScalarOrSchedule|GradientTransformation.*|Callable|"
               r"Sequence|Mapping|Iterable|Iterator|Any|NamedTuple|"
               r"DTypeLike|Shape|Mesh|Sharding|Path|PathLike)"),
    # Private modules and their classes: named in docstrings for readers of
    # the code, with no page of their own.
    (r"py:.*", r"(.*\.)?_[a-z].*"),
    (r"py:class", r"Piece"),
    (r"py:exc", r"UnsafeCacheError"),  # an OSError of a private module
]

templates_path = ["_templates"]
autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_default_options = {"show-inheritance": True}
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# `lambda_` stays `lambda_` in the parameter lists (not a link target).
strip_signature_backslash = True
napoleon_use_ivar = True  # "Attributes:" as fields: no second entry per field
napoleon_custom_sections = [("Fields", "params_style")]

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 4
nb_execution_mode = "off"  # notebooks render their committed outputs
suppress_warnings = ["myst.header"]  # the notebooks open below an h1

html_theme = "sphinx_book_theme"
html_title = f"dcasgd-optax {release}"
html_theme_options = {
    "repository_url": repo_url,
    "use_repository_button": True,
    "show_toc_level": 2,
}
