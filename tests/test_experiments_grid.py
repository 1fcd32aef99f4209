"""The methods grid's parallel baseline, resolution and time to accuracy:
experiments.statistics' paired intervals and clock statistics against hand
computations, input_pipeline's clock against loops, the tiers, and a tiny
grid end to end (tuning, report, stats.json)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dcasgd_optax
from dcasgd_optax import harness
from dcasgd_optax.harness import schedules
from experiments import input_pipeline
from experiments import methods
from experiments import programs
from experiments import statistics
from experiments import tables
from experiments import train
from experiments.configs import methods as methods_config

HAS_CLOCK = hasattr(schedules, "timed_gamma")


def test_paired_interval_against_a_hand_computation():
  # Differences 1, 2, 3: mean 2, s = 1, t(0.975, 2) = 4.302653: half 2.4841.
  i = statistics.paired_interval([0.01, 0.02, 0.03])
  assert i["mean"] == pytest.approx(0.02) and i["n"] == 3
  assert i["low"] == pytest.approx(0.02 - 0.024841, abs=1e-6)
  assert i["high"] == pytest.approx(0.02 + 0.024841, abs=1e-6)
  assert not i["resolved"]  # crosses 0
  tight = statistics.paired_interval([-0.010, -0.011, -0.009, -0.010, -0.010])
  assert tight["resolved"] and tight["high"] < 0
  assert statistics.paired_interval([0.01]) is None  # one seed: no interval
  assert statistics.paired_interval([0.01, float("nan")]) is None


def test_time_to_target_is_the_first_evaluation_at_or_below_it():
  hit = statistics.time_to_target(
      [0.5, 0.2, 0.1], [1.5, 3.0, 4.5], [32, 64, 96], 0.2
  )
  assert hit == dict(reached=True, time=3.0, gradients=64)
  miss = statistics.time_to_target(
      [0.5, float("nan")], [1.0, 2.0], [8, 16], 0.2
  )
  assert miss == dict(reached=False, time=None, gradients=None)


def _row(algorithm, error, curve_errors, times, *, workers=4, seed=0):
  return dict(
      optimizer="sgd",
      schedule="cyclic",
      num_workers=workers,
      algorithm=algorithm,
      seed=seed,
      final_test_error=error,
      curve=dict(
          test_error=curve_errors,
          time=times,
          gradients=[10 * (i + 1) for i in range(len(times))],
      ),
  )


def test_cell_stats_adds_ssgd_paired_and_time_keys_keeping_the_old_ones():
  # Sequential: 6% after 40 units. ASGD 16/18%, SSGD 10/12%, DC 8/9% (4
  # workers: 4x the clock's speed).
  seq = [
      _row(
          "sequential",
          e,
          [0.2, 0.1, 0.07, e],
          [10, 20, 30, 40],
          workers=1,
          seed=s,
      )
      for s, e in ((0, 0.06), (1, 0.06))
  ]
  asgd = [
      _row("asgd", e, [0.3, e], [5, 10], seed=s)
      for s, e in ((0, 0.16), (1, 0.18))
  ]
  ssgd = [
      _row("ssgd", e, [0.3, e], [5, 10], seed=s)
      for s, e in ((0, 0.10), (1, 0.12))
  ]
  dc = [
      _row("dc-asgd-a", 0.08, [0.05, 0.08], [5, 10], seed=0),
      _row("dc-asgd-a", 0.09, [0.115, 0.09], [5, 10], seed=1),
  ]
  stats = {
      s["algorithm"]: s
      for s in statistics.cell_stats(seq + asgd + ssgd + dc, min_gap=0.005)
  }
  old_keys = {
      "optimizer",
      "schedule",
      "num_workers",
      "algorithm",
      "mean",
      "std",
      "seeds",
      "gap_closed",
  }
  assert all(old_keys <= set(s) for s in stats.values())
  d = stats["dc-asgd-a"]
  assert d["gap_closed"] == pytest.approx((0.17 - 0.085) / (0.17 - 0.06))
  assert d["gap_closed_ssgd"] == pytest.approx((0.17 - 0.085) / (0.17 - 0.11))
  assert d["seed_errors"] == {0: 0.08, 1: 0.09}
  # Paired on seeds: -8 and -9 points from ASGD; t(0.975, 1) = 12.706.
  assert d["vs_asgd"]["mean"] == pytest.approx(-0.085)
  assert d["vs_asgd"]["high"] == pytest.approx(
      -0.085 + 12.7062 * 0.005, abs=1e-5
  )
  assert d["vs_ssgd"]["mean"] == pytest.approx(-0.025)
  # Sequential's 6%: seed 0 at 5, seed 1 never: the median is not reached.
  # SSGD's 11%: seed 0 at 5, seed 1 at 10: median 7.5.
  assert d["time_to_sequential"]["time"] is None
  assert d["time_to_sequential"]["reached"] == 1
  assert d["time_to_ssgd"]["time"] == pytest.approx(7.5)
  assert d["speedup"] is None and d["final_time"] == 10
  assert stats["sequential"]["final_time"] == 40
  assert stats["sequential"]["vs_asgd"] is None
  text = tables.time_table(list(stats.values()), "sgd", "t").splitlines()
  assert text[4] == "| sequential SGD | 40 (its whole run) |"
  assert text[-1] == ("| DC-ASGD-a | not reached (1/2) / 8 (15 g, 2/2) / - |")
  json.dumps(list(stats.values()))  # stats.json stays writable


def test_speedup_is_sequentials_whole_run_over_the_time_to_its_error():
  seq = [
      _row("sequential", 0.06, [0.1, 0.06], [50, 100], workers=1, seed=s)
      for s in (0, 1)
  ]
  fast = [_row("asgd", 0.05, [0.06, 0.05], [10, 20], seed=s) for s in (0, 1)]
  stats = {
      s["algorithm"]: s
      for s in statistics.cell_stats(seq + fast, min_gap=0.005)
  }
  assert stats["asgd"]["time_to_sequential"]["time"] == 10
  assert stats["asgd"]["speedup"] == pytest.approx(10.0)


def test_resolution_and_paired_tables_mark_what_is_not_resolved():
  rows = [
      _row("asgd", e, [e], [1], seed=s)
      for s, e in enumerate((0.10, 0.12, 0.11))
  ]
  rows += [
      _row("dc-asgd-a", e, [e], [1], seed=s)
      for s, e in enumerate((0.08, 0.10, 0.09))
  ]  # -2 points each seed
  rows += [
      _row("da-asgd", e, [e], [1], seed=s)
      for s, e in enumerate((0.11, 0.11, 0.11))
  ]  # +1, -1, 0
  stats = statistics.cell_stats(rows, min_gap=0.005)
  table = tables.paired_ci_table(stats, "sgd", "asgd", "t")
  assert "| DC-ASGD-a | -2.00 [-2.00, -2.00] |" in table
  assert "| delay-adaptive | +0.00 [-2.48, +2.48] n.s. |" in table
  assert tables.resolution_summary(stats).startswith("1 of 2 differences")


def test_cyclic_and_synchronous_clocks_count_one_unit_per_round(config):
  config.schedule = "cyclic"
  times = input_pipeline.arrival_times(config, 3, 7)
  np.testing.assert_array_equal(times, [k // 3 + 1 for k in range(7)])
  np.testing.assert_array_equal(
      input_pipeline.arrival_times(config, 3, 7, synchronous=True), times
  )
  np.testing.assert_array_equal(
      input_pipeline.arrival_times(config, 1, 3), [1, 2, 3]
  )


@pytest.mark.skipif(not HAS_CLOCK, reason="the harness has no clock yet")
@pytest.mark.parametrize("schedule", ["gamma", "straggler"])
def test_gamma_clocks_follow_each_workers_draws(config, schedule):
  config.schedule = schedule
  m, n = 4, 400
  arrivals = input_pipeline.arrival_schedule(config, m, n)
  times = input_pipeline.arrival_times(config, m, n)
  assert np.all(np.diff(times) >= 0)
  # Each worker's own compute times, from its arrivals' clock.
  own = [
      np.diff(np.concatenate([[0.0], times[arrivals == w]])) for w in range(m)
  ]
  rounds = min(len(t) for t in own)
  sync = input_pipeline.arrival_times(config, m, m * rounds, synchronous=True)
  expected = np.cumsum(np.max([t[:rounds] for t in own], axis=0))
  np.testing.assert_allclose(sync[m - 1 :: m], expected, rtol=1e-12)
  slow = own[-1].mean() / own[0].mean()
  if schedule == "straggler":  # the last worker 10x slower, 10x rarer
    assert slow == pytest.approx(input_pipeline.STRAGGLER_SLOWDOWN, rel=0.05)
    assert np.bincount(arrivals)[-1] < n / (3 * 10) + 2
  else:
    assert slow == pytest.approx(1.0, rel=0.05)


def test_the_straggler_schedule_makes_the_last_worker_ten_times_rarer(config):
  config.schedule = "straggler"
  counts = np.bincount(input_pipeline.arrival_schedule(config, 4, 620))
  assert counts[:3].min() >= 195 and 15 <= counts[3] <= 25


def test_the_tiers_cells_validate_and_the_quick_tier_is_the_targets():
  full = methods_config.get_config()
  assert len(full.grid.seeds) >= 5 and "ssgd" in full.grid.algorithms
  assert ("straggler", 32) in methods.columns(full, "sgd")
  quick = methods_config.get_config("quick")
  cells = methods.cells(quick)
  assert {
      (c.optimizer, c.schedule, c.num_workers)
      for c in cells
      if c.num_workers > 1
  } == {
      ("sgd", "cyclic", 32),
      ("sgd", "straggler", 32),
      ("momentum", "cyclic", 16),
      ("momentum", "gamma", 16),
      ("adam", "cyclic", 16),
      ("adam", "gamma", 16),
  }
  # Every target cell of the issue is in the quick tier, and nothing else.
  assert {tuple(t[:3]) for t in quick.report.targets} == {
      (c.optimizer, c.schedule, c.num_workers)
      for c in cells
      if c.schedule != "straggler" and c.num_workers > 1
  }
  # Muon, the fourth optimizer, in its own tier: the quick tier's methods
  # and seeds, no target.
  muon = methods_config.get_config("muon")
  muon_cells = methods.cells(muon)
  assert {
      (c.optimizer, c.schedule, c.num_workers)
      for c in muon_cells
      if c.num_workers > 1
  } == {("muon", "cyclic", 16), ("muon", "gamma", 16)}
  assert not muon.report.targets
  assert {c.algorithm for c in muon_cells} == {
      "sequential",
      "ssgd",
      "asgd",
      "dc-asgd-a-tuned",
      "fisher-dc-a",
  }
  assert (muon.grid.seeds, muon.tuning.seeds, muon.tuning.dc_lambda) == (
      quick.grid.seeds,
      quick.tuning.seeds,
      quick.tuning.dc_lambda,
  )
  # The second model: small_cnn in two of those cells, the same tuning.
  cnn = methods_config.get_config("cnn")
  assert cnn.model == "small_cnn"
  assert {
      (c.optimizer, c.schedule, c.num_workers)
      for c in methods.cells(cnn)
      if c.num_workers > 1
  } == {("sgd", "cyclic", 32), ("momentum", "cyclic", 16)}
  assert cnn.tuning.seeds == quick.tuning.seeds
  assert cnn.tuning.dc_lambda == quick.tuning.dc_lambda
  for opt in cnn.grid.optimizers:  # the quick tier's rates, and two below
    assert set(quick.tuning.learning_rates[opt]) < set(
        cnn.tuning.learning_rates[opt]
    )
  assert cnn.grid.seeds == quick.grid.seeds
  assert len(quick.grid.seeds) >= 5
  assert not set(quick.grid.seeds) & set(quick.tuning.seeds)
  for tier, tier_cells in ((quick, cells), (muon, muon_cells)):
    for cell in tier_cells:
      assert {"asgd", "ssgd"} <= {
          c.algorithm for c in tier_cells if c.optimizer == cell.optimizer
      }
      train.validate(
          methods.cell_config(tier, cell, 0, methods.candidates(tier, cell)[0])
      )
  with pytest.raises(
      ValueError,
      match="Unknown tier 'huge'; valid choices: full, quick, muon, cnn",
  ):
    methods_config.get_config("huge")


@pytest.mark.slow
def test_a_tiny_grid_end_to_end_with_ssgd_stragglers_and_time(
    data_dir, tmp_path
):
  c = methods_config.get_config()
  c.data_dir, c.batch_size, c.num_epochs, c.mlp_hidden = data_dir, 500, 2, (16,)
  c.grid.algorithms = ("sequential", "ssgd", "asgd", "da-asgd")
  c.grid.num_workers, c.grid.schedules, c.grid.optimizers = (
      (2,),
      ("cyclic",),
      ("sgd",),
  )
  c.grid.scenarios = (("straggler", 4),)
  c.grid.seeds, c.tuning.seeds = (0, 1), (100,)
  c.tuning.learning_rates.sgd = (0.05, 0.4)
  c.report.remedies = ()
  c.report.diagnostics.optimizers = ()
  cache = programs.ProgramCache()
  tuned = methods.tune(c, str(tmp_path), cache=cache)
  assert set(tuned) == {x.key for x in methods.cells(c)}
  assert "sgd-straggler-M4-ssgd" in tuned
  rows = methods.report(c, str(tmp_path), tuned, cache=cache)
  assert len(rows) == 2 * (1 + 3 * 2)
  # The clock of each run: sequential one unit per gradient (8 per epoch);
  # SSGD and ASGD with 2 cyclic workers one unit per round of 2.
  by = {(r["algorithm"], r["schedule"], r["seed"]): r for r in rows}
  assert by[("sequential", "cyclic", 0)]["curve"]["time"] == [8.0, 16.0]
  assert by[("asgd", "cyclic", 0)]["curve"]["time"] == [4.0, 8.0]
  assert by[("ssgd", "cyclic", 0)]["curve"]["time"] == [4.0, 8.0]
  if HAS_CLOCK:  # SSGD's rounds wait for the straggler: 10 units each
    t = by[("ssgd", "straggler", 0)]["curve"]["time"]
    assert t[-1] > 35 and by[("asgd", "straggler", 0)]["curve"]["time"][-1] < 10
  with open(tmp_path / "stats.json") as f:
    stats = json.load(f)
  cell = [
      s
      for s in stats
      if s["algorithm"] == "asgd" and s["schedule"] == "straggler"
  ]
  assert cell and {
      "gap_closed",
      "vs_ssgd",
      "time_to_sequential",
      "speedup",
      "gap_closed_ssgd",
      "seed_errors",
  } <= set(cell[0])
  table = (tmp_path / "table.md").read_text()
  assert "| method | cyclic M=2 | straggler M=4 |" in table
  assert "time to accuracy" in table and "| SSGD |" in table
  assert "differences from ASGD are resolved" in table


@pytest.mark.skipif(
    not hasattr(harness, "time_to_accuracy"),
    reason="the harness has no time_to_accuracy yet",
)
def test_time_to_target_agrees_with_the_harness_helper():
  rng = np.random.default_rng(0)
  for _ in range(20):
    errors = rng.uniform(0.05, 0.3, 6)
    errors[rng.integers(6)] = np.nan
    times = np.cumsum(rng.uniform(0.5, 2.0, 6))
    gradients = np.cumsum(rng.integers(1, 9, 6))
    target = float(rng.uniform(0.05, 0.3))
    mine = statistics.time_to_target(errors, times, gradients, target)
    theirs = harness.time_to_accuracy(errors, times, gradients, target)
    assert mine["reached"] == theirs.reached
    if theirs.reached:
      assert (mine["time"], mine["gradients"]) == (
          theirs.time,
          theirs.gradients,
      )


def test_the_exact_taylor_row_turns_stale_quadratic_gradients_into_fresh_ones(
    config,
):
  # On a quadratic, g(w_bak) + H (w - w_bak) is g(w): ASGD with the exact
  # correction replays exactly sequential SGD's steps (the row passes
  # exact_compensation=1.0 to the simulator).
  x = jax.random.normal(jax.random.key(0), (64, 3))
  y = x @ jnp.array([1.0, -2.0, 0.5])

  def loss_fn(p, batch):
    r = x[batch["idx"]] @ p["w"] - y[batch["idx"]]
    return 0.5 * jnp.mean(r * r)

  batches = {"idx": jnp.arange(64, dtype=jnp.int32).reshape(16, 4)}
  params = {"w": jnp.zeros(3)}
  finals = {}
  for name, m in (("sequential", 1), ("exact-dc", 4), ("asgd", 4)):
    config.algorithm, config.num_workers, config.learning_rate = name, m, 0.1
    sim = programs.make_simulator(
        config, loss_fn, steps_per_epoch=16, has_model_state=False
    )
    arrivals = schedules.cyclic(m, 16)
    state, _ = sim.replay(sim.init(params), batches, arrivals)
    finals[name] = np.asarray(state.params["w"])
  np.testing.assert_allclose(
      finals["exact-dc"], finals["sequential"], rtol=1e-5
  )
  assert not np.allclose(finals["asgd"], finals["sequential"], rtol=1e-3)


def _regression_loss():
  """A least-squares ``loss(params, idx)`` on 64 fixed examples (made
  here, outside any trace), ``idx`` a batch of them."""
  x = jax.random.normal(jax.random.key(0), (64, 3))
  y = x @ jnp.array([1.0, -2.0, 0.5]) + 0.1 * jax.random.normal(
      jax.random.key(1), (64,)
  )

  def loss(p, idx):
    r = x[idx] @ p["w"] - y[idx]
    return 0.5 * jnp.mean(r * r)

  return loss


def _replay(config, name, m, batch_size, **fields):
  loss = _regression_loss()

  def loss_fn(p, batch):
    return loss(p, batch["idx"])

  config.algorithm, config.num_workers, config.learning_rate = name, m, 0.1
  config.update(fields)
  n = 64 // batch_size
  sim = programs.make_simulator(
      config, loss_fn, steps_per_epoch=n, has_model_state=False
  )
  batches = {"idx": jnp.arange(64, dtype=jnp.int32).reshape(n, batch_size)}
  state, _ = sim.replay(
      sim.init({"w": jnp.zeros(3)}), batches, schedules.cyclic(m, n)
  )
  return np.asarray(state.params["w"])


def test_the_fisher_row_pushes_per_example_squares(config):
  # With one example per gradient the per-example Fisher diagonal is g * g:
  # the row is DC-ASGD-a with the same λ0. With four it is not.
  for batch, same in ((1, True), (4, False)):
    fisher = _replay(
        config, "fisher-dc-a", 4, batch, dc_lambda=2.0, learning_rate=0.02
    )
    dc = _replay(
        config, "dc-asgd-a-tuned", 4, batch, dc_lambda=2.0, learning_rate=0.02
    )
    assert np.isfinite(fisher).all()
    assert np.allclose(fisher, dc, rtol=1e-5, atol=1e-7) == same, batch


@pytest.mark.parametrize(
    "name,reference,fields",
    [
        ("pipemare", "asgd", {}),
        ("wp-nesterov", "asgd", {"momentum": 0.9, "nesterov": True}),
        ("wp-nadam", "asgd", {"optimizer": "adam"}),
    ],
)
def test_rescheduling_and_weight_prediction_rows_act_only_on_stale_gradients(
    config, name, reference, fields
):
  # One worker: nothing is stale, nothing to predict, so each row is its
  # optimizer (wp-nadam: NAdam β1 0.99, so only against itself with M = 1
  # vs 4); four workers: it changes the run.
  fields = dict(learning_rate=0.02, **fields)
  one = _replay(config, name, 1, 4, **fields)
  four = _replay(config, name, 4, 4, **fields)
  assert np.isfinite(four).all()
  if name != "wp-nadam":
    np.testing.assert_allclose(
        one, _replay(config, reference, 1, 4, **fields), rtol=1e-6
    )
  assert not np.allclose(
      four, _replay(config, reference, 4, 4, **fields), rtol=1e-4
  )


def test_the_secant_row_is_secant_compensation_with_the_tuned_lambda(config):
  # λ = 0 leaves ASGD; the tuned λ (config.secant_lambda) gives the library's
  # secant_dcasgd with that λ, in the same replay.
  asgd = _replay(config, "asgd", 4, 4)
  off = _replay(config, "secant-dc", 4, 4, secant_lambda=0.0)
  on = _replay(config, "secant-dc", 4, 4, secant_lambda=1.0)
  np.testing.assert_allclose(off, asgd, rtol=1e-6)
  assert not np.allclose(on, asgd, rtol=1e-3)
  sim = harness.Simulator(
      _regression_loss(), dcasgd_optax.secant_dcasgd(0.1, 4, lambda_=1.0)
  )
  state, _ = sim.replay(
      sim.init({"w": jnp.zeros(3)}),
      jnp.arange(64, dtype=jnp.int32).reshape(16, 4),
      schedules.cyclic(4, 16),
  )
  np.testing.assert_allclose(on, np.asarray(state.params["w"]), rtol=1e-5)


def test_the_delayed_nesterov_secant_row_is_the_library_optimizer(config):
  # λ = 0 leaves delayed Nesterov alone; the tuned λ gives the library's
  # delayed_nesterov_secant_dcasgd (η = M times the grid's rate, period M),
  # in the same replay.
  fields = dict(momentum=0.9, learning_rate=0.02)
  off = _replay(
      config, "delayed-nesterov-secant", 4, 4, secant_lambda=0.0, **fields
  )
  plain = _replay(config, "delayed-nesterov-dc", 4, 4, dc_lambda=0.0, **fields)
  on = _replay(
      config, "delayed-nesterov-secant", 4, 4, secant_lambda=1.0, **fields
  )
  np.testing.assert_allclose(off, plain, rtol=1e-6)
  assert not np.allclose(on, plain, rtol=1e-3)
  sim = harness.Simulator(
      _regression_loss(),
      dcasgd_optax.delayed_nesterov_secant_dcasgd(4 * 0.02, 4, lambda_=1.0),
  )
  state, _ = sim.replay(
      sim.init({"w": jnp.zeros(3)}),
      jnp.arange(64, dtype=jnp.int32).reshape(16, 4),
      schedules.cyclic(4, 16),
  )
  np.testing.assert_allclose(on, np.asarray(state.params["w"]), rtol=1e-5)
