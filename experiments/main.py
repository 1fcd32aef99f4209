r"""Trains one run. Flags only; the work is in :mod:`experiments.train`.

Example::

  python -m experiments.main --config=experiments/configs/default.py \
      --config.algorithm=dc-asgd-a --config.num_workers=16 --workdir=runs/one

Rerunning the same command resumes from the latest checkpoint in
``--workdir``. With ``--multihost`` every host of a pod slice (or every GPU
node) runs the same command as one program (docs/pod.md).
"""

import json

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import pod
from experiments import train

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  pod.initialize_from_flags()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  summary = train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  if pod.is_writer():
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
  config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
  pod.define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
