r"""Tiny: a few steps through the whole pipeline, for tests.

Command::

  python -m experiments.compare --config=experiments/configs/tiny.py \
      --workdir=/tmp/tiny

Hardware: CPU. Runtime: a few seconds per run (mostly compilation).

Expected result: nothing in particular (16 gradients of a tiny MLP: 20-50%
test error); every output file is produced.
"""

from experiments.configs import default


def get_config():
  """default, with 2 epochs of 8 gradients of 500 digits and a small MLP."""
  c = default.get_config()
  c.batch_size = 500  # 8 gradients per epoch on the 4,000 training digits
  c.num_epochs = 2
  c.mlp_hidden = (16,)
  c.learning_rate = 0.1
  c.num_workers = 4
  c.progress_bar = False
  c.grid.algorithms = ("sequential", "ssgd", "asgd", "dc-asgd-a")
  c.grid.num_workers = (2, 4)
  c.grid.seeds = (0, 1)
  return c
