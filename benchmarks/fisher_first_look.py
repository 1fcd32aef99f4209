"""A first look at the Fisher-diagonal compensation (issue 18), not the grid.

The tests' tiny tanh regression net (3 -> 5 -> 1, 64 points, batches of 8),
16 cyclic workers, plain SGD at one shared rate, 640 arrivals, 3 seeds; the
full-data loss at the end. No tuning: the methods grid is where the methods
are compared fairly.

Run from the repository root:
  python benchmarks/fisher_first_look.py 0.2
"""

import sys

import jax.numpy as jnp
import optax

sys.path.insert(0, "tests")

import dcasgd_optax  # noqa: E402
from dcasgd_optax.harness import Simulator  # noqa: E402
from dcasgd_optax.harness import schedules  # noqa: E402

import helpers  # noqa: E402

M, A = 16, 640


def main(lr: float) -> None:
  full = lambda p: helpers.loss_fn(p, jnp.arange(64))
  methods = {
      "sequential": (lambda: optax.sgd(lr), 1, False),
      "asgd": (lambda: optax.sgd(lr), M, False),
      "dc-asgd-a": (lambda: dcasgd_optax.dcasgd(lr, M, lambda_=2.0), M,
                    False),
      "fisher-a": (lambda: dcasgd_optax.fisher_dcasgd(lr, M, lambda_=2.0), M,
                   True),
      "fisher-c1": (lambda: dcasgd_optax.fisher_dcasgd(
          lr, M, lambda_=1.0, adaptive=False), M, True),
      "fisher-c4": (lambda: dcasgd_optax.fisher_dcasgd(
          lr, M, lambda_=4.0, adaptive=False), M, True),
  }
  for name, (make, workers, push) in methods.items():
    finals = []
    for seed in range(3):
      sim = Simulator(helpers.loss_fn, make(), num_workers=workers,
                      push_grad_sq=push)
      state = sim.init(helpers.init_params())
      state, _ = sim.replay(state, helpers.make_batches(A, seed),
                            schedules.cyclic(workers, A))
      finals.append(float(full(state.params)))
    print(f"{name:12s} lr={lr}: " + " ".join(f"{x:.4f}" for x in finals),
          flush=True)


if __name__ == "__main__":
  main(float(sys.argv[1]) if len(sys.argv) > 1 else 0.2)
