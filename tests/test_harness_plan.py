"""The replay plan: how arrivals are cut into runs and chunks (``describe``)."""

import optax
import pytest

from dcasgd_optax.harness import Simulator
from dcasgd_optax.harness import schedules

from helpers import STRATEGIES
from helpers import A
from helpers import W
from helpers import init_params
from helpers import loss_fn


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_chunking_is_as_planned(strategy):
  arrivals = schedules.cyclic(W, A)
  sim = Simulator(loss_fn, optax.sgd(0.1), W, strategy=strategy)
  assert sim.describe(arrivals, init_params()) == dict(
      num_arrivals=A, num_runs=A // W, chunk=W, num_chunks=A // W,
      fill_ratio=1.0, strategy=strategy)
  sim = Simulator(loss_fn, optax.sgd(0.1), W, max_parallel=3,
                  strategy=strategy)
  plan = sim.describe([0, 1, 2, 3, 0, 1, 2, 3, 0], init_params())
  assert plan["num_runs"] == 3 and plan["num_chunks"] == 5  # 2+2, 2+2, 1
  assert plan["chunk"] == 2 and plan["fill_ratio"] == 9 / 10
