"""experiments.methods: the evidence grid's cells, tuning and report (tiny)."""

import csv
import json

import pytest

from experiments import algorithms
from experiments import methods
from experiments import programs
from experiments import run_files
from experiments import train
from experiments.configs import methods as methods_config


def test_the_grid_has_every_applicable_cell_and_each_validates():
  c = methods_config.get_config()
  cells = methods.cells(c)
  per_optimizer = {
      o: [x for x in cells if x.optimizer == o] for o in c.grid.optimizers
  }
  # sequential once; 7 = 2 schedules x 3 worker counts + the straggler
  # scenario for the others (SSGD among them).
  assert len(per_optimizer["sgd"]) == 1 + 16 * 7  # no momentum-only methods
  # + delayed Nesterov (3), DANA(-DC), weight prediction:
  assert len(per_optimizer["momentum"]) == 1 + 22 * 7
  # neither, nor Gap-Aware (SGD only):
  assert len(per_optimizer["adam"]) == 1 + 16 * 7
  c.grid.skip = (("momentum", "dana", 32), ("adam", "dc-asgd-a-clip-tuned"))
  assert len(methods.cells(c)) == len(cells) - 3 - 7  # one M, all of them
  assert len({x.key for x in cells}) == len(cells)
  for cell in cells:
    train.validate(
        methods.cell_config(c, cell, 0, methods.candidates(c, cell)[0])
    )
  counts = {
      x.algorithm: len(methods.candidates(c, x)) for x in per_optimizer["sgd"]
  }
  assert counts["asgd"] == 8 and counts["dc-asgd-a-tuned"] == 8 * 4
  assert counts["secant-dc"] == 8 * 2  # λ over {0.5, 1}
  assert not set(c.grid.seeds) & set(c.tuning.seeds)


@pytest.fixture
def tiny(data_dir):
  c = methods_config.get_config()
  c.data_dir, c.batch_size, c.num_epochs, c.mlp_hidden = data_dir, 500, 1, (16,)
  # Two programs, each compiled once.
  c.grid.algorithms = ("sequential", "asgd")
  c.grid.num_workers, c.grid.schedules = (2,), ("cyclic",)
  c.grid.optimizers = ("sgd",)
  c.grid.scenarios = ()  # no straggler column
  c.grid.seeds, c.tuning.seeds = (0, 1), (100,)
  c.tuning.learning_rates.sgd = (0.02, 0.4)
  c.report.diagnostics.update(dict(
      optimizers=("sgd",), schedule="cyclic", num_workers=2, every=2, seed=0,
      algorithms=("asgd",)))
  return c


def test_tuning_picks_the_lowest_error_and_the_report_uses_other_seeds(
    tiny, tmp_path
):
  cache = programs.ProgramCache()
  tuned = methods.tune(tiny, str(tmp_path), cache=cache)
  with open(tmp_path / "tuned.json") as f:
    assert json.load(f) == json.loads(json.dumps(tuned))
  for cell in methods.cells(tiny):
    errors = {
        lr: methods.run(tiny, str(tmp_path), cell, 100, {"learning_rate": lr})
        ["final_test_error"] for lr in (0.02, 0.4)
    }
    best = min(errors, key=errors.get)
    assert tuned[cell.key]["setting"] == {"learning_rate": best}
    assert tuned[cell.key]["tuning_error"] == pytest.approx(errors[best])

  rows = methods.report(tiny, str(tmp_path), tuned, cache=cache)
  assert sorted({r["seed"] for r in rows}) == [0, 1] and len(rows) == 2 * 2
  with open(tmp_path / "results.csv") as f:
    assert len(list(csv.DictReader(f))) == 4
  table = (tmp_path / "table.md").read_text()
  assert "| method | cyclic M=2 |" in table and "| sequential SGD | " in table
  lr = tuned["sgd-cyclic-M2-asgd"]["setting"]["learning_rate"]
  seq_at_lr = dict(
      (s["learning_rate"], e) for s, e in tuned["sgd-sequential"]["tried"]
  )[lr]
  assert f"| sgd | cyclic | 2 | {lr:g} | " in table
  asgd_error = tuned["sgd-cyclic-M2-asgd"]["tuning_error"]
  assert f"| {100 * seq_at_lr:.2f} | {100 * asgd_error:.2f} |" in table
  settings = (tmp_path / "tuned.md").read_text()
  for cell in methods.cells(tiny):
    lr = tuned[cell.key]["setting"]["learning_rate"]
    assert f"| {algorithms.get(cell.algorithm).label} | {lr:g} |" in settings
  for plot in ("gap_closed.png", "errors.png", "diagnostics.png"):
    assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
  # ASGD's 8 arrivals, those at even server steps diagnosed ("step" is the
  # step after the update, 1-based): staleness 0, then 1.
  trace = run_files.read_diagnostics(
      str(tmp_path / "diagnostics" / "sgd-cyclic-M2-asgd")
  )
  assert trace[0]["staleness"] == [0, 1, 1, 1]
  assert trace[0]["step"] == [1, 3, 5, 7]
  # Nothing adjusts; the first arrival is fresh: the same gradient.
  assert trace[0]["applied_cosine"] == trace[0]["stale_cosine"]
  assert trace[0]["stale_cosine"][0] == pytest.approx(1.0)

  tiny.tuning.seeds = (1,)  # a reported seed
  with pytest.raises(ValueError, match=r"share \[1\]: reported seeds must not"):
    methods.report(tiny, str(tmp_path), tuned)
