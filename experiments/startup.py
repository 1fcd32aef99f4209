"""The start-up every study's command line shares, written once.

Each entry point (:mod:`experiments.main`, :mod:`experiments.compare`,
:mod:`experiments.methods`, :mod:`experiments.ray_async`) defines its flags
with :func:`define_flags` (plus its own) when run as a program, and its
``main`` begins with :func:`setup`: the arguments checked, absl's logging
quieted, and JAX's persistent compilation cache put in the work directory.
Nothing happens at import: importing a study from a notebook or a test
changes no global setting. Seeds are not set here: every run derives its
randomness from its own ``config.seed``.

Example (a study's module)::

  def main(argv):
    config, workdir = startup.setup(argv, compilation_cache=True)
    ...

  if __name__ == "__main__":
    startup.define_flags(workdir_help="Directory for all runs and the report.")
    app.run(main)
"""

from __future__ import annotations

from collections.abc import Sequence
import os

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from experiments import pod

# Runs that differ only in their seed or injected hyperparameters compile to
# the same programs; with a persistent cache every one after the first skips
# compilation, also across processes (a resumed study).
_CACHE_MIN_COMPILE_SECONDS = 0.2


def define_flags(
    *, workdir_help: str, workdir_default: str | None = None,
    config_default: str | None = None,
) -> None:
  """Defines ``--workdir``, ``--config`` (an ml_collections config file) and
  ``--multihost`` with its arguments (:func:`experiments.pod.define_flags`).

  Each is required unless given a default. Call it only when run as a
  program (under ``if __name__ == "__main__"``), so that importing several
  studies does not define the flags twice.
  """
  flags.DEFINE_string("workdir", workdir_default, workdir_help)
  pod.define_flags()
  config_flags.DEFINE_config_file(
      "config", config_default, "Path to an ml_collections config file.")
  required = [name for name, default in (("config", config_default),
                                         ("workdir", workdir_default))
              if default is None]
  if required:
    flags.mark_flags_as_required(required)


def setup(
    argv: Sequence[str], *, compilation_cache: bool = False,
) -> tuple[ml_collections.ConfigDict, str]:
  """The start of every entry point's ``main``; returns ``(config, workdir)``.

  With ``--multihost`` it first joins the other processes of a multi-host
  program (``jax.distributed.initialize``: docs/pod.md).

  Args:
    argv: ``main``'s arguments; any besides the program's name is an error.
    compilation_cache: put JAX's persistent compilation cache in
      ``WORKDIR/jax_cache`` (for studies, whose runs share programs).

  Raises:
    app.UsageError: on arguments that are not flags.
  """
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  pod.initialize_from_flags()  # first: before any other JAX call
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  workdir = flags.FLAGS.workdir
  if compilation_cache:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      _CACHE_MIN_COMPILE_SECONDS)
  return flags.FLAGS.config, workdir
