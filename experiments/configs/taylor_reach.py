r"""How far the exact Taylor correction reaches, with and without momentum.

Command::

  python -m experiments.taylor_reach \
      --config=experiments/configs/taylor_reach.py \
      --workdir=runs/taylor_reach

Hardware: CPU only (the offline digits).

Setting: the methods grid's (``configs/methods.py``): the demo's MLP
(784-128-10), batch 32, 4,000 training digits, a constant learning rate,
cyclic arrivals (staleness exactly M - 1), 10 epochs, seeds 0 and 1
(reported seeds of the grid, never tuned on). Each case of
``study.cases`` is an optimizer preset of the grid and a worker count, run
at each of its learning rates (spanning ASGD's stable range and beyond)
with ASGD, the exact correction (``exact-dc``) and the oracle
(``sequential``: the fresh gradient on the same batch stream). Every
``study.every``-th arrival is measured. Runtime: 9 minutes on 2 loaded CPU
cores (72 runs of 10 epochs).

Expected result: the tables in experiments/README.md ("Why the exact
correction breaks with momentum"): the exact correction stable up to
ASGD's tuned rate and non-finite at twice it, in every case.
"""

import ml_collections

from experiments.configs import methods


def get_config():
  """The methods grid's setting, with the study's cases and sampling."""
  c = methods.get_config("quick")
  c.num_epochs = 10  # the grid's budget
  c.study = ml_collections.ConfigDict()
  # (optimizer preset of the grid, M, learning rates). The rates are the
  # grid's (factor 2 apart) around ASGD's tuned one: 0.0025 with momentum
  # at M = 16, 0.0125 with plain SGD at M = 32. Plain SGD at M = 16 at ten
  # times momentum's rates has the same tau and effective step
  # eta / (1 - mu): it separates momentum from the size of the step.
  c.study.cases = (
      ("momentum", 16, (0.00125, 0.0025, 0.005, 0.01)),
      ("sgd", 32, (0.00625, 0.0125, 0.025, 0.05)),
      ("sgd", 16, (0.0125, 0.025, 0.05, 0.1)),
  )
  # asgd: the stale gradient; exact-dc: g(w_bak) + H(w_bak) d; sequential:
  # the oracle, the fresh gradient g(w) on the worker's batch.
  c.study.algorithms = ("asgd", "exact-dc", "sequential")
  c.study.every = 5  # measure every 5th arrival (one extra HVP each)
  c.study.eval_every = 25  # test error every 25 arrivals
  # Examples of the training set for the larger-batch H d (hypothesis c).
  c.study.big_batch = 512
  # A run counts as diverged once its test error reaches this (or NaN).
  c.study.diverged_error = 0.5
  # ... at this arrival or later (or NaN): one epoch, before which every
  # run's error is high.
  c.study.settle = 125
  # Reported seeds of the grid (never tuned on).
  c.study.seeds = (0, 1)
  return c
