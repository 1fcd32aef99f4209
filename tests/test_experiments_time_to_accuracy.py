"""experiments.time_to_accuracy: the longer cap's time to accuracy (tiny)."""

import json
import math
import os

import numpy as np
import pytest

from experiments import time_to_accuracy
from experiments.configs import time_to_accuracy as tta_config

M = 4


def _curve(errors, times):
  return dict(
      test_error=list(errors),
      time=list(times),
      gradients=[8 * (i + 1) for i in range(len(errors))],
  )


def test_summarize_against_a_loop_over_epochs():
  target = dict(
      sequential=0.10, sequential_time=100.0, ssgd=0.20, ssgd_time=30.0
  )
  times = [10.0, 20.0, 30.0, 40.0]
  rows = [
      dict(seed=0, curve=_curve([0.5, 0.15, 0.10, 0.09], times)),
      dict(seed=1, curve=_curve([0.3, 0.19, 0.12, 0.08], times)),
      dict(seed=2, curve=_curve([0.4, 0.25, 0.11, float("nan")], times)),
  ]
  out = time_to_accuracy.summarize(rows, target, budget_epochs=2)
  # Sequential's 0.10: seeds reach it at 30 and 40, seed 2 never (it
  # diverges: NaN does not count): median of (30, 40, inf) = 40.
  assert out["to_sequential"] == dict(
      reached=2, runs=3, time=40.0, gradients=32.0, known=True
  )
  assert out["speedup"] == pytest.approx(100.0 / 40.0)
  # SSGD's 0.20: at 20, 20 and 40 (seed 2's 0.25 is above it): median 20.
  assert out["to_ssgd"]["time"] == 20.0 and out["to_ssgd"]["reached"] == 3
  assert out["speedup_ssgd"] == pytest.approx(30.0 / 20.0)
  assert out["per_seed"][2]["sequential"]["reached"] is False
  assert out["per_seed"][0]["ssgd"]["time"] == 20.0
  assert out["budget_error"] == pytest.approx((0.15 + 0.19 + 0.25) / 3)
  # A diverged run's error counts as 1.
  assert out["final_error"] == pytest.approx((0.09 + 0.08 + 1.0) / 3)
  # Half the seeds not there: not reached, no speed-up.
  late = time_to_accuracy.summarize(rows[1:], target, budget_epochs=2)
  assert late["to_sequential"]["time"] is None and late["speedup"] is None


def _result(algorithm, time, speedup, schedule="straggler", m=32):
  return dict(
      optimizer="sgd",
      schedule=schedule,
      num_workers=m,
      algorithm=algorithm,
      speedup=speedup,
      to_sequential=dict(time=time),
  )


def test_verdict_needs_the_speedup_and_to_beat_ssgd():
  results = [
      _result("sequential", 1000.0, None, "cyclic", 1),
      _result("ssgd", None, None),
      _result("asgd", 200.0, 6.25),
      _result("exact-dc", 125.0, 10.0),
      _result("exact-dc", 50.0, 25.0, "cyclic", 32),
  ]  # another cell
  v = time_to_accuracy.verdict(results, "sgd", "straggler", 32, 8.0)
  assert v == dict(
      best="exact-dc",
      speedup=10.0,
      ssgd_time=None,
      faster_than_ssgd=True,
      met=True,
      sequential_first=1000.0,
      speedup_first=8.0,
  )
  results[1] = _result("ssgd", 100.0, 12.5)  # SSGD gets there first
  v = time_to_accuracy.verdict(results, "sgd", "straggler", 32, 8.0)
  assert v["best"] == "exact-dc" and not v["faster_than_ssgd"]
  assert not v["met"]
  v = time_to_accuracy.verdict(results[1:3], "sgd", "straggler", 32, 8.0)
  assert v["best"] == "asgd" and not v["met"]  # 6.25x < 8x
  assert v["sequential_first"] is None and v["speedup_first"] is None


@pytest.fixture
def tiny(data_dir):
  c = tta_config.get_config()
  # 8 gradients of 500 digits per epoch, a small MLP, 3 epochs against a
  # budget of 1.
  c.data_dir, c.batch_size, c.mlp_hidden = data_dir, 500, (16,)
  c.num_epochs, c.study.budget_epochs = 3, 1
  c.study.cells = (("sgd", "straggler", M, ("asgd", "ssgd")),)
  c.study.seeds = (0, 1)
  c.study.target = ("sgd", "straggler", M, 2.0)
  return c


TUNED = {
    "sgd-sequential": {"setting": {"learning_rate": 0.2}},
    f"sgd-straggler-M{M}-asgd": {"setting": {"learning_rate": 0.1}},
    f"sgd-straggler-M{M}-ssgd": {"setting": {"learning_rate": 0.4}},
}


def _stats(sequential, ssgd):
  return [
      dict(
          optimizer="sgd",
          schedule="cyclic",
          num_workers=1,
          algorithm="sequential",
          mean=sequential,
          final_time=8.0,
      ),
      dict(
          optimizer="sgd",
          schedule="straggler",
          num_workers=M,
          algorithm="ssgd",
          mean=ssgd,
          final_time=5.0,
      ),
  ]


def _metrics(workdir, epochs, name, seed):
  path = os.path.join(
      workdir, f"epochs{epochs}", "runs", f"{name}-seed{seed}", "metrics.jsonl"
  )
  with open(path) as f:
    return [json.loads(line) for line in f]


def _reference(records_per_seed, target):
  """Median over seeds of the first epoch's clock at or below target."""
  times = []
  for records in records_per_seed:
    hit = math.inf
    for r in records:
      if r["test_error"] <= target:
        hit = r["time"]
        break
    times.append(hit)
  t = float(np.median(times))
  return None if math.isinf(t) else t


@pytest.mark.slow
def test_study_runs_the_longer_cap_against_the_quick_tiers_targets(
    tiny, tmp_path
):
  workdir = str(tmp_path)
  time_to_accuracy.study(tiny, workdir, TUNED, _stats(1.0, 1.0))
  asgd = [
      _metrics(workdir, 3, f"sgd-straggler-M{M}-asgd-learning_rate0.1", s)
      for s in (0, 1)
  ]
  ssgd = [
      _metrics(workdir, 3, f"sgd-straggler-M{M}-ssgd-learning_rate0.4", s)
      for s in (0, 1)
  ]
  seq = [
      _metrics(workdir, 1, "sgd-sequential-learning_rate0.2", s) for s in (0, 1)
  ]
  # The cap for the parallel methods, the budget for sequential SGD, each
  # at its tuned rate (its directory's name).
  assert [len(x) for x in asgd + ssgd + seq] == [3, 3, 3, 3, 1, 1]
  # Targets that the runs reach late: every ASGD seed reaches the first
  # (its worst seed's best error), not necessarily the second.
  first = max(min(r["test_error"] for r in x) for x in asgd)
  second = min(min(r["test_error"] for r in x) for x in asgd)
  results = time_to_accuracy.study(
      tiny, workdir, TUNED, _stats(first, second)
  )  # cached runs
  by = {r["algorithm"]: r for r in results}
  assert set(by) == {"sequential", "asgd", "ssgd"}
  for name, runs in (("asgd", asgd), ("ssgd", ssgd)):
    r = by[name]
    assert r["epochs"] == 3
    for key, target, budget in (
        ("sequential", first, 8.0),
        ("ssgd", second, 5.0),
    ):
      want = _reference(runs, target)
      assert r[f"to_{key}"]["time"] == want, (name, key)
      speed = r["speedup" if key == "sequential" else "speedup_ssgd"]
      assert speed == (
          None if want is None else pytest.approx(budget / want)
      ), (name, key)
    assert r["budget_error"] == pytest.approx(
        np.mean([x[0]["test_error"] for x in runs])
    )
    assert r["final_error"] == pytest.approx(
        np.mean([x[-1]["test_error"] for x in runs])
    )
  assert by["asgd"]["to_sequential"]["reached"] == 2
  with open(os.path.join(workdir, "table.md")) as f:
    text = f.read()
  assert "**Target**" in text and "ASGD" in text
  assert os.path.exists(os.path.join(workdir, "time_to_accuracy.png"))


def test_bad_input_is_named_before_any_run(tiny, tmp_path):
  with pytest.raises(ValueError, match="no setting for 'sgd-straggler-M4-"):
    time_to_accuracy.study(
        tiny,
        str(tmp_path),
        {"sgd-sequential": TUNED["sgd-sequential"]},
        _stats(0.1, 0.1),
    )
  with pytest.raises(ValueError, match="stats: expected one entry"):
    time_to_accuracy.study(tiny, str(tmp_path), TUNED, _stats(0.1, 0.1)[:1])
  tiny.num_epochs = 0
  with pytest.raises(ValueError, match="num_epochs"):
    time_to_accuracy.study(tiny, str(tmp_path), TUNED, _stats(0.1, 0.1))
  assert not os.listdir(tmp_path)
