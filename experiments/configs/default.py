r"""Default: one run on the offline MNIST subset (mnist5k), an MLP, 16 workers.

Command (one run; the flags override any field)::

  python -m experiments.main --config=experiments/configs/default.py \
      --config.algorithm=dc-asgd-a --config.num_workers=16 --workdir=runs/one

Hardware: CPU is enough. Runtime: under 10 s on one CPU core (mostly
imports and compilation), plus ~2 s to prepare mnist5k into
``~/tensorflow_datasets`` the first time.

Expected result (test error after 15 epochs on the 1,000 test digits, mean
of 3 seeds): sequential SGD about 6.7%; with 16 cyclic workers (staleness
15) DC-ASGD-a about 6.8%, ASGD about 10% (unstable, seed-dependent).

The other configs override this one; every field is documented here.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """The default hyperparameters."""
  c = ml_collections.ConfigDict()
  # Data: one of experiments.data.DATASETS. mnist5k needs no internet.
  c.dataset = "mnist5k"
  c.data_dir = config_dict.placeholder(
      str
  )  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.download = True  # prepare the dataset into data_dir if it is not there
  # Model: one of experiments.models.MODELS.
  c.model = "mlp"
  c.mlp_hidden = (128,)
  # Algorithm: one of experiments.algorithms.REGISTRY.
  c.algorithm = "dc-asgd-a"
  c.num_workers = 16  # ignored (1) for sequential
  c.schedule = "cyclic"  # cyclic | shuffled | gamma
  c.gamma_shape = 100.0  # Gamma shape of the compute times (gamma schedule)
  # Optimization. An epoch is num_train // batch_size gradients (see
  # experiments/algorithms.py for how SSGD counts it).
  c.batch_size = 32
  c.num_epochs = 15
  c.learning_rate = 0.05
  c.lr_boundaries_epochs = ()  # epochs at which the rate is multiplied by...
  c.lr_decay_factor = 0.1
  c.warmup_epochs = 0.0
  c.optimizer = "sgd"  # sgd | adam (experiments.optimizers.OPTIMIZERS)
  c.momentum = 0.0  # SGD's momentum; 0: plain SGD
  c.nesterov = False
  c.weight_decay = 0.0
  # DC-ASGD. dc_lambda None: the paper's defaults (2.0 adaptive, 0.04 constant).
  c.dc_lambda = config_dict.placeholder(float)
  c.dc_decay = 0.95
  c.dc_eps = 1e-7
  # The secant compensation (the `secant-dc` row): its λ; decay 0.99 and
  # the clip |term| <= |g| are secant_compensation's defaults.
  c.secant_lambda = 0.5
  # Bookkeeping.
  c.seed = 0
  c.eval_batch_size = 500
  c.checkpoint_every_epochs = 1  # 0: never (an interrupted run restarts)
  # Compare every k-th arrival's gradient with the fresh one (0: off; one
  # extra gradient per sampled arrival; see experiments/train.py).
  c.diagnostics_every = 0
  c.progress_bar = True
  # The grid run by experiments.compare (sequential runs once per seed).
  c.grid = ml_collections.ConfigDict()
  c.grid.algorithms = (
      "sequential",
      "ssgd",
      "asgd",
      "sa-asgd",
      "dc-asgd-c",
      "dc-asgd-a",
  )
  c.grid.num_workers = (4, 16)
  c.grid.seeds = (0, 1)
  return c
