r"""The paper's CIFAR-10 setting: ResNet-20, M = 4 and 8 workers.

Command (the whole grid, then the table and plots)::

  pip install -e '.[cifar]'   # TensorFlow, needed once to prepare CIFAR-10
  python -m experiments.compare \
      --config=experiments/configs/cifar10_resnet20.py --workdir=runs/cifar10

or one run::

  python -m experiments.main --config=experiments/configs/cifar10_resnet20.py \
      --config.algorithm=dc-asgd-a --config.num_workers=8 \
      --workdir=runs/c10-dca-8

The first run downloads CIFAR-10 and prepares it as array_record in
``data_dir`` (this step needs TensorFlow; later reads do not).

Recipe (the paper does not give its exact one; this is the standard ResNet-20
recipe of He et al. 2016): ResNet-20 with BatchNorm and option-A shortcuts,
SGD with momentum 0.9 on the server, weight decay 1e-4, minibatch 128 per
gradient, learning rate 0.1 divided by 10 at epochs 80 and 120 of 160, random
4-pixel-shift crops and horizontal flips, per-channel standardization, all
50,000 training images (no validation split). The same hyperparameters for
every algorithm; SSGD averages M gradients of 128 per update (effective batch
128 M, same learning rate), so it makes 1/M as many updates per epoch.
Arrivals are cyclic (every gradient has staleness M - 1).

Hardware: one GPU or TPU. Runtime: roughly 62,400 gradients per run (160
epochs of 390); the simulator computes each run of M consecutive arrivals as
one batched call, so an asynchronous run costs about as much as sequential
training, tens of minutes per run on a current GPU; the grid is 11 runs per
seed. Not run in this project's CI (no GPU there).

Expected result: the paper's table (test error, %):

  ====  ==========  =====  =====  =========  =========
  M     sequential  ASGD   SSGD   DC-ASGD-c  DC-ASGD-a
  ====  ==========  =====  =====  =========  =========
  4     8.65        9.27   9.17   8.67       8.19
  8     8.65        10.26  10.10  9.27       8.57
  ====  ==========  =====  =====  =========  =========

With this recipe sequential ResNet-20 should land near He et al.'s 8.75%;
the ordering ASGD > DC-ASGD-c > DC-ASGD-a is what to look for, not the exact
numbers (different recipe, simulated rather than real asynchrony).
"""

from experiments.configs import default


def get_config():
  """default, overridden with the CIFAR-10 ResNet-20 recipe."""
  c = default.get_config()
  c.dataset = "cifar10"
  c.model = "resnet20"
  c.algorithm = "dc-asgd-a"
  c.num_workers = 8
  c.schedule = "cyclic"
  c.batch_size = 128
  c.num_epochs = 160
  c.learning_rate = 0.1
  c.lr_boundaries_epochs = (80, 120)
  c.lr_decay_factor = 0.1
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.eval_batch_size = 1000
  c.checkpoint_every_epochs = 5
  c.grid.algorithms = (
      "sequential",
      "ssgd",
      "asgd",
      "sa-asgd",
      "dc-asgd-c",
      "dc-asgd-a",
  )
  c.grid.num_workers = (4, 8)
  c.grid.seeds = (0,)
  return c
