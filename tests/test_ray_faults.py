"""dcasgd_optax.ray.train survives its workers dying; a dying shard stops it
cleanly, with every shard's checkpoint at one step to resume from.

Slow (``make test-slow``): each test kills processes and waits for Ray to
notice and restart them.
"""

import os
import time

import numpy as np
import optax
import pytest

from ray_helpers import INIT
from ray_helpers import alive_actors
from ray_helpers import check_exactly_once
from ray_helpers import digits_problem
from ray_helpers import local_ray  # noqa: F401  # a fixture
from ray_helpers import ray
from ray_helpers import ray_env  # noqa: F401  # a fixture

pytest.importorskip("orbax.checkpoint")

import dcasgd_optax  # pylint: disable=g-import-not-at-top
import dcasgd_optax.ray as dray  # pylint: disable=g-import-not-at-top

pytestmark = [
    pytest.mark.slow,
    # ray.init forks after JAX has started threads; the children exec at once.
    pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),
]


@pytest.mark.usefixtures("local_ray")
def test_worker_killed_mid_gradient_restarts_and_count_is_exact(tmp_path):
  # Worker 1 dies during its first gradient, while the others train: that
  # gradient is certain to be needed, so the test cannot finish without it.
  loss_fn, data_fn, params, accuracy = digits_problem(
      fault=("kill_self", 1, 0, None), marker=str(tmp_path / "killed"))
  tx = dcasgd_optax.dcasgd(0.5, num_workers=3)
  result = dray.train(loss_fn, tx, params, data_fn, 3, 120)
  rec = result.records
  assert (tmp_path / "killed").exists()
  np.testing.assert_array_equal(result.worker_failures, [0, 1, 0])
  np.testing.assert_array_equal(rec.step, np.arange(1, 121))
  check_exactly_once(rec, 3)  # Seq 0 of worker 1 recomputed, not lost.
  # After its restart worker 1 pulled the current params, not the initial
  # ones: its first update is less stale than its step.
  first = np.flatnonzero(rec.worker == 1)[0]
  assert rec.staleness[first] < rec.step[first] - 1
  assert accuracy(result.params) > 0.8
  assert not alive_actors()


@pytest.mark.parametrize("shared_memory", [False, True])
@pytest.mark.usefixtures("local_ray")
def test_worker_lost_after_computing_before_a_shard_read_it(tmp_path,
                                                           shared_memory):
  # Worker 1 computes gradient 2 and pushes it to both shards; shard 1 is
  # kept busy, so when worker 1's process is killed, shard 0 has applied
  # the gradient but shard 1 has not read it. In the calls, it cannot: its
  # pieces (600 kB a shard, above the 512 kB a message may carry inline, so
  # passed through the object store) died with their owner; the restarted
  # worker recomputes it and sends it to shard 1 only. Through shared
  # memory, the buffer outlives the worker: shard 1 applies the push if Ray
  # runs it before the restarted worker attaches, else ignores it as stale
  # and gets the recomputed one. Either way every shard applies gradient 2
  # exactly once.
  name = f"shard1-{os.getpid()}"
  loss_fn, data_fn, params, accuracy = digits_problem(
      fault=("kill_before_push", 1, 2, name),
      marker=str(tmp_path / "killed"), pad=300_000)
  tx = dcasgd_optax.dcasgd(0.5, num_workers=2)
  result = dray.train(loss_fn, tx, params, data_fn, 2, 60, num_shards=2,
                      server_options=[{}, {"name": name}],
                      shared_memory=shared_memory)
  assert (tmp_path / "killed").exists()
  np.testing.assert_array_equal(result.worker_failures, [0, 1])
  for trace in (result.records, *result.shard_records):
    np.testing.assert_array_equal(np.sort(trace["step"]), np.arange(1, 61))
    check_exactly_once(trace, 2)  # Nothing lost or doubled on any shard.
  assert accuracy(result.params) > 0.7
  assert not alive_actors()


@pytest.mark.usefixtures("local_ray")
def test_worker_dying_more_than_max_restarts_fails_the_run():
  loss_fn, data_fn, params, _ = digits_problem(fault=("kill_self", 0, 0, None))
  with pytest.raises(RuntimeError, match="Worker 0 died and could not be"):
    dray.train(loss_fn, optax.sgd(0.5), params, data_fn, num_workers=3,
               num_updates=60, max_restarts=1)
  assert not alive_actors()


@pytest.mark.usefixtures("local_ray")
def test_worker_not_back_in_time_fails_the_run(tmp_path):
  marker = str(tmp_path / "killed")

  class SlowToRestart:  # Local, so Ray pickles the class by value.
    """Unpickling sleeps once the worker was killed: its restart hangs."""

    def __getstate__(self):
      return {"marker": marker}

    def __setstate__(self, state):
      if os.path.exists(state["marker"]):
        time.sleep(60)

  loss_fn, killer, params, _ = digits_problem(
      fault=("kill_self", 0, 0, None), marker=marker)
  hang = SlowToRestart()
  data_fn = lambda worker, seq: (hang, killer(worker, seq))[1]
  with pytest.raises(RuntimeError, match="Worker 0 failed and has not"):
    dray.train(loss_fn, optax.sgd(0.5), params, data_fn, num_workers=3,
               num_updates=100, restart_timeout_s=3.0)
  assert not alive_actors()


@pytest.mark.usefixtures("local_ray")
def test_dead_shard_stops_the_run_and_it_resumes_from_a_common_step(
    tmp_path):
  name = f"shard1-{os.getpid()}"
  tx = dcasgd_optax.dcasgd(0.5, num_workers=3)
  ckpt = dict(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=10,
              num_shards=2)
  loss_fn, killer, params, accuracy = digits_problem(
      # One of 3 workers computes >= 50 of 150 gradients, so some worker
      # loads batch 25; its first 25 are applied by then: step >= 25.
      fault=("kill_actor", None, 25, name), marker=str(tmp_path / "killed"))
  with pytest.raises(RuntimeError, match=r"shard\(s\) \[1\] died.*resume"):
    dray.train(loss_fn, tx, params, killer, 3, 150, **ckpt,
               server_options=[{}, {"name": name}])
  saved = [sorted(int(p.name) for p in (tmp_path / "ckpt" / d).iterdir()
                  if p.name.isdigit()) for d in ("shard-0-of-2",
                                                 "shard-1-of-2")]
  # Shard 0 may hold a step more (if shard 1 died while both saved it); the
  # last step both hold is a multiple of checkpoint_every.
  common = max(set(saved[0]) & set(saved[1]))
  assert common % 10 == 0 and 20 <= common < 150
  _, data_fn, _, _ = digits_problem()
  result = dray.train(loss_fn, tx, params, data_fn, 3, 150, **ckpt,
                      resume=True)
  assert result.step == 150
  np.testing.assert_array_equal(result.records.step,
                                np.arange(common + 1, 151))
  assert accuracy(result.params) > 0.8
  assert not alive_actors()


@pytest.mark.usefixtures("ray_env")
def test_train_started_ray_shuts_it_down():
  if ray.is_initialized():
    ray.shutdown()
  loss_fn, data_fn, params, _ = digits_problem()
  result = dray.train(loss_fn, optax.sgd(0.5), params, data_fn, num_workers=3,
                      num_updates=30, address="local", init_kwargs=INIT)
  assert result.step == 30
  assert not ray.is_initialized()
