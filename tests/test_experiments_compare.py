"""experiments.compare: the grid of runs, its table and plots, a bad grid."""

import csv
import os

import pytest

from experiments import compare
from experiments import tables
from experiments.configs import demo


def test_compare_writes_results_table_and_plots(config, tmp_path, capsys):
  config.num_epochs = 1
  config.grid.algorithms = demo.get_config().grid.algorithms  # the paper's six
  config.grid.num_workers = (2,)
  rows = compare.compare(config, str(tmp_path))
  assert len(rows) == 2 + 5 * 2  # sequential once per seed
  with open(tmp_path / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert tuple(table[0]) == tables.COLUMNS and len(table) == 12
  assert {r["algorithm"] for r in table} == set(config.grid.algorithms)
  with open(tmp_path / "metrics.jsonl") as f:
    assert len(f.readlines()) == 12
  md = (tmp_path / "table.md").read_text()
  assert "| 2 | " in md and "DC-ASGD-a" in md and " ± " in md
  assert md.split("\n", 2)[2] in capsys.readouterr().out
  for name in (
      "error_vs_epoch.png",
      "error_vs_workers.png",
      "staleness_hist.png",
  ):
    with open(tmp_path / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_grid_fails_before_any_run(config, tmp_path):
  config.grid.num_workers = (4, 0)
  with pytest.raises(ValueError, match="num_workers must be an int >= 1"):
    compare.compare(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "runs")
