"""Strict numerics for every test (implicit rank promotion is an error), one
Ray authentication mode for every test process, and the fixtures the
experiments tests share."""

import importlib
import os
import re

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

# Every Ray that a test process starts or joins itself runs with token
# authentication off (tests that need a token run their drivers and nodes as
# subprocesses with an environment built from scratch: test_ray_auth.py).
# One mode for the whole process, set before any test imports Ray, because
# Ray caches the mode in its process-wide config the first time it starts
# (and a ray.init with RAY_AUTH_MODE unset turns token mode on, writing
# RAY_AUTH_MODE=token into os.environ for the rest of the process). Switching
# the variable later changes the mode of the new cluster's processes but not
# the driver's: the driver then rejects the GCS's calls ("Missing
# authorization header"), and the GCS, taking the actors' owner for gone,
# destroys each new actor before it starts (ActorDiedError: "The actor never
# ran"). That is how tests/test_experiments_ray_async.py's Ray run (mode
# unset) broke the Ray tests that ran after it in the same xdist worker.
RAY_AUTH_MODE = "disabled"
os.environ["RAY_AUTH_MODE"] = RAY_AUTH_MODE
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


# The core promises dtypes (updates keep the gradient's dtype: bf16 in, bf16
# out; statistics in at least float32). The tests of that promise run under
# JAX's strict dtype promotion, so an implicit promotion in the library (a
# float32 scalar widening a bf16 update, an int mixed into a float) is an
# error rather than a silently changed dtype.
STRICT_PROMOTION_MODULES = frozenset({
    "test_alias", "test_contract", "test_delay_compensation",
    "test_delayed_nesterov", "test_fused", "test_gap_aware",
    "test_look_ahead", "test_pull", "test_staleness",
})
STRICT_PROMOTION_TESTS = re.compile(r"dtype|bf16|bfloat16|float64")
# Named exceptions: cases whose implicit promotion is in optax's own code,
# not ours (optax.scale_by_adam's bias correction raises a Python float to
# the int32 count), keep JAX's standard promotion.
OPTAX_PROMOTES = re.compile(r"\[look_ahead_adam\]")


def strict_promotion(module: str, test: str) -> bool:
  return (module.rsplit(".", 1)[-1] in STRICT_PROMOTION_MODULES
          and STRICT_PROMOTION_TESTS.search(test) is not None
          and OPTAX_PROMOTES.search(test) is None)


@pytest.fixture(autouse=True)
def _strict_dtype_promotion(request):
  if strict_promotion(request.module.__name__, request.node.name):
    with jax.numpy_dtype_promotion("strict"):
      yield
  else:
    yield


@pytest.fixture(autouse=True)
def _one_ray_auth_mode():
  """Fails a test that leaves this process in another Ray auth mode."""
  yield
  mode = os.environ.get("RAY_AUTH_MODE")
  assert mode == RAY_AUTH_MODE, (
      f"RAY_AUTH_MODE is {mode!r} after this test, not {RAY_AUTH_MODE!r}: "
      "the Ray tests after it in this process would start clusters whose "
      "actors never run (tests/conftest.py says why)."
  )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS data dir per test module: mnist5k is prepared once per module."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def config(data_dir):  # pylint: disable=redefined-outer-name
  """The tiny experiment config, reading its data from ``data_dir``.

  Imported here rather than at the top, so that the library's own tests
  never depend on the experiments code being importable.
  """
  c = importlib.import_module("experiments.configs.tiny").get_config()
  c.data_dir = data_dir
  return c
