r"""Time to accuracy with a longer cap: the quick tier's methods, run longer.

Command::

  python -m experiments.time_to_accuracy \
      --config=experiments/configs/time_to_accuracy.py \
      --workdir=runs/time_to_accuracy \
      [--tuned=experiments/results/methods-quick/tuned.json]

Hardware: CPU only (the offline digits).

Setting: the methods grid's quick tier (``configs/methods.py:quick``): the
demo's MLP (784-128-10), batch 32, 4,000 training digits, a constant
learning rate. Each method of ``study.cells`` runs at the quick tier's
tuned setting (``--tuned``) for ``num_epochs`` = 40 epochs (the quick tier
gave every method 10, ``study.budget_epochs``) on the reported seeds 0-4
(never tuned on); sequential SGD reruns its 10 epochs for the plot. The
targets are the quick tier's (``stats.json`` beside ``--tuned``):
sequential SGD's and SSGD's mean final error at their 10-epoch budget.

Runtime: see experiments/README.md ("Time to accuracy with a longer cap").

Expected result: the table in experiments/README.md (same section).
"""

import ml_collections

from experiments.configs import methods


def get_config():
  """The quick tier's setting, with the study's cells, seeds and target."""
  c = methods.get_config("quick")
  c.num_epochs = 40  # the longer cap (4x the quick tier's budget)
  c.study = ml_collections.ConfigDict()
  # The quick tier's budget: its targets (sequential SGD's and SSGD's final
  # error) and the settings were measured and tuned at this many epochs.
  c.study.budget_epochs = 10
  # (optimizer preset, arrivals, M, methods): the time-to-accuracy
  # cell (M = 32, Gamma arrivals with one worker 10x slower) and the
  # momentum cell where the quick tier's best methods lead.
  c.study.cells = (
      (
          "sgd",
          "straggler",
          32,
          (
              "asgd",
              "ssgd",
              "da-asgd",
              "dc-asgd-a-tuned",
              "fisher-dc-a",
              "exact-dc",
              "secant-dc",
          ),
      ),
      (
          "momentum",
          "gamma",
          16,
          (
              "asgd",
              "ssgd",
              "delayed-nesterov-dc",
              "fisher-dc-a",
              "wp-nesterov",
              "delayed-nesterov-secant",
          ),
      ),
  )
  # The reported seeds of the grid (the tuning seeds were 100 and 101).
  c.study.seeds = (0, 1, 2, 3, 4)
  # Issue 18's target: (optimizer, arrivals, M, speed-up over sequential
  # SGD that the best method must reach, in simulated time, to sequential
  # SGD's final error; it must also get there before SSGD).
  c.study.target = ("sgd", "straggler", 32, 8.0)
  return c
