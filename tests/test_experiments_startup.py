"""experiments.startup: one start-up for every study, and no import-time
side effects in any module of experiments/."""

import importlib.util
import os
import subprocess
import sys

from absl import app
import pytest

from experiments import startup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imports every study (matplotlib and JAX first, to see what the imports
# change), draws a figure, then starts up like a study's main.
_PROGRAM = """
import sys
import jax
import matplotlib
backend = dict.__getitem__(matplotlib.rcParams, "backend")  # unresolved yet
cache_dir = jax.config.jax_compilation_cache_dir
from experiments import compare, main, methods, plots, startup, train
if {ray}:
  from experiments import ray_async
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
assert dict.__getitem__(matplotlib.rcParams, "backend") is backend, "backend"
assert jax.config.jax_compilation_cache_dir == cache_dir, "JAX configured"
import numpy as np
plots.plot_staleness({{2: np.array([0, 1, 1])}}, {png!r})
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported to plot"

from absl import app
from absl import logging

def run(argv):
  config, workdir = startup.setup(argv, compilation_cache=True)
  assert jax.config.jax_compilation_cache_dir == workdir + "/jax_cache"
  assert logging.get_verbosity() == logging.WARNING
  print("started", config.algorithm, workdir)

startup.define_flags(workdir_help="where")
app.run(run)
"""


def test_importing_the_studies_changes_nothing_and_setup_starts_one(tmp_path):
  ray = importlib.util.find_spec("ray") is not None
  program = _PROGRAM.format(ray=ray, png=str(tmp_path / "s.png"))
  cmd = [
      sys.executable,
      "-c",
      program,
      "--config=experiments/configs/tiny.py",
      f"--workdir={tmp_path}",
  ]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == f"started dc-asgd-a {tmp_path}"
  assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_a_stray_argument_is_refused_before_anything_starts():
  with pytest.raises(
      app.UsageError, match="Unexpected arguments: \\['runs/x'\\]"
  ):
    startup.setup(["main.py", "runs/x"], compilation_cache=True)
