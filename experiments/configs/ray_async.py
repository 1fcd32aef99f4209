r"""Ray: ASGD and DC-ASGD-a on a real parameter server, and Ray's staleness.

Command (from the repository root, a local Ray on this machine)::

  python -m experiments.ray_async --config=experiments/configs/ray_async.py \
      --workdir=runs/ray_async

Any field can be overridden (``--config.num_workers=8``,
``--config.momentum=0.9``, ``--config.grid.algorithms="('asgd','sa-asgd')"``);
on a cluster add ``--address=auto`` (see docs/ray.md).

Hardware: CPU. Runtime: about a minute on 2 shared CPU cores (4 workers,
3,000 updates per algorithm, mostly Ray start-up and compilation).

Expected result: both algorithms reach about 94% test accuracy on the 1,000
test digits. Staleness has mean ``M - 1 = 3``; on Ray about 80% of the
updates have staleness exactly 3 (round-robin), more than ``gamma_speeds``
with shape 100 (71%), plus a thin tail of long delays; the fitted schedule
spreads far wider (about 30% at 3). See docs/ray.md.

The fields are those of ``default.py`` (model, optimizer, DC-ASGD, seed,
data) plus ``num_updates``, ``num_shards`` (parameter-server shards) and
``wire_dtype`` (``None`` or e.g. ``"bfloat16"``: what gradients and params
travel in); ``grid.algorithms`` lists the algorithms run,
one Ray run each. The simulator-only fields (``schedule``, ``gamma_shape``,
``num_epochs``, ``grid.num_workers``, ``grid.seeds``) are not used.
"""

from ml_collections import config_dict

from experiments.configs import default


def get_config():
  """default, with 4 Ray workers and 3,000 updates per algorithm."""
  c = default.get_config()
  c.num_workers = 4
  c.num_updates = 3000  # server updates per algorithm
  c.num_shards = 1  # parameter-server shards (docs/ray.md)
  c.wire_dtype = config_dict.placeholder(str)  # "bfloat16": half the bytes
  c.grid.algorithms = ("asgd", "dc-asgd-a")
  return c
