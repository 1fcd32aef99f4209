"""experiments.taylor_reach: the exact correction's reach, measured (tiny)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import programs
from experiments import taylor_reach
from experiments import train
from experiments.configs import taylor_reach as taylor_config

M = 4


@pytest.fixture
def tiny(data_dir):
  c = taylor_config.get_config()
  # 8 gradients of 500 digits per epoch, 1 epoch, a small MLP.
  c.data_dir, c.batch_size, c.num_epochs, c.mlp_hidden = data_dir, 500, 1, (16,)
  c.study.every, c.study.eval_every, c.study.big_batch = 2, 4, 64
  c.study.settle = 8
  return c


def _run(config, algorithm, lr=0.02):
  r = dict(
      optimizer="momentum",
      num_workers=M,
      learning_rate=lr,
      algorithm=algorithm,
      seed=0,
  )
  return taylor_reach.run_config(config, r)


def _server_models(config):
  """The server's model before every arrival, one arrival at a time."""
  c = _run(config, "exact-dc")
  c.diagnostics_every = 0
  program = programs.ProgramCache().program(c)
  run = train._Run(c, program)  # pylint: disable=protected-access
  total = c.num_epochs * run.steps_per_epoch
  batches = taylor_reach.input_pipeline.batches(
      program.ds, c.seed, c.batch_size, run.rng, 0, total
  )
  state, models = run.init(), []
  for k in range(total):
    models.append(jax.tree.map(np.asarray, state.params))
    state, _ = program.sim.replay(
        state,
        jax.tree.map(lambda x, i=k: x[i : i + 1], batches),
        run.arrivals[k : k + 1],
    )
  return models


def _norm(tree):
  return math.sqrt(
      sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(tree))
  )


def test_trace_measures_what_the_harness_says(tiny):
  out = taylor_reach.trace(_run(tiny, "exact-dc"))
  samples = out["samples"]
  assert [x["step"] for x in samples] == [0, 2, 4, 6]
  # The harness's diagnostics of the same arrivals (an independent
  # implementation): cos(g, f), cos(g + H d, f), and the residual is
  # applied_error / stale_error for the exact correction (lambda = 1).
  late = [x for x in samples if x["staleness"] > 0]
  assert len(late) == 3 and all(x["staleness"] == M - 1 for x in late[1:])
  for x in late:
    assert x["stale_cos"] == pytest.approx(x["stale_cosine"], abs=1e-4)
    assert x["exact_cos"] == pytest.approx(x["applied_cosine"], abs=1e-4)
    assert x["residual"] == pytest.approx(
        x["applied_error"] / x["stale_error"], rel=1e-3
    )
    assert 0.0 <= x["flips"] <= 1.0 and x["correction"] > 0
  assert out["curve"][-1][0] == 8 and 0 < out["curve"][-1][1] < 1
  assert all(
      math.isfinite(float(jnp.sum(x))) for x in jax.tree.leaves(out["params"])
  )


@pytest.mark.slow
def test_trace_measures_the_displacement_a_replay_gives(tiny):
  tiny.num_epochs = 2
  late = [
      x
      for x in taylor_reach.trace(_run(tiny, "exact-dc"))["samples"]
      if x["staleness"] == M - 1
  ]
  assert len(late) == 6
  # d = w - w_bak from a one-arrival-at-a-time replay of the same run:
  # with cyclic arrivals the worker arriving at k pulled after arrival
  # k - M, so it holds the server's model before arrival k - M + 1.
  models = _server_models(tiny)
  for x in late:
    k = x["step"]
    d = jax.tree.map(np.subtract, models[k], models[k - M + 1])
    assert x["d_rel"] == pytest.approx(_norm(d) / _norm(models[k]), rel=1e-3)


def test_the_oracle_has_nothing_stale_to_measure(tiny):
  out = taylor_reach.trace(_run(tiny, "sequential"))
  assert out["samples"] == [] and [s for s, _ in out["curve"]] == [4, 8]


def test_divergence_and_the_reach_table():
  curve = [(4, 0.8), (8, 0.3), (12, 0.6), (16, 0.7)]
  assert taylor_reach.diverged_at(curve, 0.5, settle=8) == 12
  # It came back below the threshold: not diverged.
  assert math.isnan(taylor_reach.diverged_at(curve[:2], 0.5, settle=8))
  assert math.isnan(
      taylor_reach.diverged_at(curve[:3] + [(16, 0.1)], 0.5, settle=8)
  )
  assert taylor_reach.diverged_at([(4, math.nan)], 0.5, settle=8) == 4
  rows = [
      dict(
          optimizer="sgd",
          num_workers=2,
          learning_rate=0.1,
          algorithm=a,
          seed=s,
          final_error=e,
          diverged_at=d,
      )
      for a, s, e, d in (
          ("asgd", 0, 0.1, math.nan),
          ("asgd", 1, 0.7, 12),
          ("exact-dc", 0, math.nan, 4),
          ("exact-dc", 1, 0.05, math.nan),
      )
  ]
  assert "| sgd M=2 | 0.1 | 10.0 / 70.0† | NaN / 5.0 |" in (
      taylor_reach.reach_table(rows)
  )


def test_bad_sampling_is_a_clear_error(tiny):
  tiny.study.eval_every = 3
  with pytest.raises(ValueError, match="eval_every"):
    taylor_reach.trace(_run(tiny, "asgd"))


def test_the_config_documents_its_command_and_every_run_validates():
  c = taylor_config.get_config()
  runs = taylor_reach.runs(c)
  # 3 cases x 4 rates x 3 algorithms x 2 seeds.
  assert len(runs) == 72
  for r in runs:
    train.validate(taylor_reach.run_config(c, r))
  doc = taylor_config.__doc__
  assert "python -m experiments.taylor_reach" in doc
  assert "Runtime" in doc and "Expected result" in doc
