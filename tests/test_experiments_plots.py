"""experiments.plots: every algorithm's style, figures drawn without pyplot."""

import numpy as np
import pytest

from experiments import algorithms
from experiments import plots

PNG = b"\x89PNG\r\n\x1a\n"


def test_every_algorithm_has_its_own_colour():
  assert set(plots.STYLES) == set(algorithms.REGISTRY)
  colors = [plots.style(a).color for a in algorithms.REGISTRY.values()]
  assert len(set(colors)) == len(colors)
  # The single-worker reference is dashed, every other line solid.
  for a in algorithms.REGISTRY.values():
    assert plots.style(a).linestyle == (
        "--" if a.single_worker else "-"
    ), a.name


def test_an_algorithm_without_a_style_fails_naming_it():
  record = algorithms.Algorithm("hogwild", "Hogwild!", algorithms.ASGD.build_tx)
  with pytest.raises(ValueError, match="No plot style for algorithm 'hogwild'"):
    plots.style(record)


def test_the_comparisons_figures_are_written(tmp_path):
  rows = [{"algorithm": a, "workers": m, "seed": s, "final_test_error": e}
          for a, m, e in (("sequential", 1, 0.1), ("asgd", 2, 0.2),
                          ("asgd", 4, 0.3), ("dc-asgd-a", 4, 0.15))
          for s in (0, 1)]
  plots.plot_error_vs_workers(rows, str(tmp_path / "w.png"), title="t")
  history = [{"test_error": 0.5}, {"test_error": 0.3}]
  plots.plot_error_vs_epoch(
      {("sequential", 1): [history], ("asgd", 2): [history]},
      str(tmp_path / "e.png"),
  )
  plots.plot_staleness({2: np.array([0, 1, 1, 1])}, str(tmp_path / "s.png"))
  for name in ("w.png", "e.png", "s.png"):
    assert (tmp_path / name).read_bytes()[:8] == PNG


def test_the_grid_s_figures_draw_optimizers_with_different_columns(tmp_path):
  """The quick tier's plain SGD has cyclic and straggler columns, momentum
  cyclic and Gamma: each panel without data is left out, not a crash."""
  stats = [
      {"optimizer": opt, "schedule": sch, "num_workers": m, "algorithm": a,
       "mean": 0.1, "std": 0.01, "gap_closed": None}
      for opt, schedules in (("sgd", ("cyclic", "straggler")),
                             ("momentum", ("cyclic", "gamma")))
      for sch in schedules
      for a, m in (("sequential", 1), ("asgd", 16), ("dc-asgd-a", 16))
  ]
  path = tmp_path / "errors.png"
  plots.plot_methods_errors(stats, str(path), title="t",
                            optimizers=("sgd", "momentum"))
  assert path.read_bytes()[:8] == PNG
