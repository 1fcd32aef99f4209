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

from experiments import pod
from experiments import startup
from experiments import train


def main(argv):
  config, workdir = startup.setup(argv)
  summary = train.train_and_evaluate(config, workdir)
  if pod.is_writer():
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  startup.define_flags(
      workdir_help="Directory for checkpoints, metrics and the summary."
  )
  app.run(main)
