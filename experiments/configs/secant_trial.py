r"""A server-side secant curvature for delay compensation: the trial.

Command::

  python -m experiments.secant_trial \
      --config=experiments/configs/secant_trial.py \
      --workdir=runs/secant_trial

Hardware: CPU only (the offline digits).

Setting: the quick tier's cyclic cells of the two missed targets
(``configs/methods.py:quick``): plain SGD at M = 32 and SGD with momentum
0.9 at M = 16, the demo's MLP (784-128-10), batch 32, 4,000 training
digits, a constant learning rate, cyclic arrivals (staleness exactly
M - 1), 10 epochs. Tuned on the grid's tuning seeds (100, 101) over the
grid's six learning rates of the optimizer times ``trial.lambdas``, the
same budget as the grid's λ0-tuned rows; reported on its seeds 0-4, never
tuned on. Runtime, as measured: 15 min 40 s (150 replays of 10 epochs, 5-8
s each, and the two measurement runs), on one core (the program pins
itself to one: see ``main``) while the quick tier ran on the other.

Expected result: experiments/README.md ("A secant curvature").
"""

import ml_collections

from experiments.configs import methods


def get_config():
  """The quick tier's setting, with the trial's estimator and its grid."""
  c = methods.get_config("quick")
  c.trial = ml_collections.ConfigDict()
  # (the grid's optimizer preset, M): the two missed targets' cyclic cells,
  # each on the grid's six learning rates for that optimizer.
  c.trial.cells = (("sgd", 32), ("momentum", 16))
  # The secant's strength: the same budget (two values) as the grid's
  # λ0-tuned rows.
  c.trial.lambdas = (0.5, 1.0)
  # The design, fixed before the reported seeds were run (chosen on the
  # tuning seeds: the README lists what was tried): the running means' decay
  # and the bound on the term, |term| <= clip * |g| per coordinate.
  c.trial.decay = 0.99
  c.trial.clip = 1.0
  # The curvature measurement: every arrival of one ASGD run at its tuned
  # rate in the grid (the quick tier's tuned.json), on the first tuning seed.
  c.trial.measure_learning_rates = {"sgd": 0.0125, "momentum": 0.0025}
  return c
