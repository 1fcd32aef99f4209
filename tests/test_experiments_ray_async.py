"""experiments/ray_async.py: its config, optimizers, data, and one Ray run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("ray")

from experiments import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import ray_async  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.configs import ray_async as ray_async_config  # pylint: disable=g-import-not-at-top,wrong-import-position

# ray.init forks after JAX has started threads; the children exec at once
# (the same named exception as tests/test_ray_train.py's).
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def config(data_dir):
  c = ray_async_config.get_config()
  c.data_dir = data_dir
  return c


def test_optimizer_follows_the_config_like_the_simulator(config):
  config.momentum, config.learning_rate = 0.9, 0.1
  params = {"w": jnp.array([1.0, -2.0])}
  tx = ray_async.make_tx("asgd", config, num_train=4000)
  reference = optax.sgd(0.1, momentum=0.9)
  state, ref_state = tx.init(params), reference.init(params)
  for g in ([0.5, 1.0], [-1.0, 2.0], [0.25, 0.0]):
    g = {"w": jnp.array(g)}
    u, state = tx.update(g, state, params)
    r, ref_state = reference.update(g, ref_state, params)
    np.testing.assert_allclose(u["w"], r["w"], rtol=1e-6)
  dc = ray_async.make_tx("dc-asgd-a", config, num_train=4000)
  backups = jax.tree.leaves(dc.init(params))
  assert any(np.shape(x) == (config.num_workers, 2) for x in backups)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("grid.algorithms", ("asgd", "ssgd"), "'ssgd' is synchronous"),
        ("grid.algorithms", ("hogwild",), "valid choices: sequential"),
        ("num_updates", 0, "config.num_updates must be an int >= 1"),
        ("batch_size", 0, "config.batch_size must be an int >= 1"),
    ],
)
def test_bad_config_fails_before_ray_starts(
    config, tmp_path, field, value, message
):
  parent, _, name = field.rpartition(".")
  (config[parent] if parent else config)[name] = value
  with pytest.raises(ValueError, match=message):
    ray_async.run(config, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_each_worker_draws_from_its_own_shard_deterministically(config):
  batches = ray_async.ShardedBatches(config.dataset, config.data_dir, 4, 8, 0)
  ds = data.load(config.dataset, data_dir=config.data_dir)
  images, labels = batches(2, 5)
  again, _ = batches(2, 5)
  np.testing.assert_array_equal(images, again)
  flat = ds.train_images.reshape(len(ds.train_labels), -1)
  rows = [np.flatnonzero((flat == x.ravel()).all(1)) for x in images]
  assert all(len(r) and r[0] % 4 == 2 for r in rows)  # images 2, 6, 10, ...
  assert not np.array_equal(batches(2, 6)[0], images)


@pytest.mark.slow
def test_two_algorithms_train_on_ray_and_report(config, tmp_path):
  config.num_updates, config.num_workers = 200, 2
  # "local": a Ray of its own, never one that `ray start` recorded on this
  # host (what address=None would join).
  runs = ray_async.run(config, str(tmp_path), address="local")
  assert [r["algorithm"] for r in runs] == ["asgd", "dc-asgd-a"]
  assert all(r["test_accuracy"] > 0.5 for r in runs)
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["config"]["num_updates"] == 200
  assert (tmp_path / "staleness.png").read_bytes()[:4] == b"\x89PNG"
