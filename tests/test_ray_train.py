"""dcasgd_optax.ray.train on a local Ray: convergence, failures, resume.

One local Ray (2 CPUs, no dashboard, usage stats and token auth off, only
here) fits softmax regression on scikit-learn's digits.
"""

import os
import time

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("orbax.checkpoint")
datasets = pytest.importorskip("sklearn.datasets")

import dcasgd_optax  # pylint: disable=g-import-not-at-top
import dcasgd_optax.ray as dray  # pylint: disable=g-import-not-at-top

# ray.init forks after JAX has started threads; the children exec at once.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
_NUM_TRAIN = 1500  # Of the 1,797 digits; the rest are held out.
_INIT = dict(num_cpus=2, include_dashboard=False, log_to_driver=False)


def digits_problem(kill_at=None, marker=None, victim=None):
  """Softmax regression on the digits: (loss_fn, data_fn, params, accuracy).

  Workers train on the first 1,500 images; ``accuracy`` is on the other 297.
  The functions are closures, so Ray pickles them by value for the actors.

  With ``kill_at=(worker, seq)`` (``worker`` None: any worker), the first
  time such a batch is loaded, the worker kills (``ray.kill``, restart
  allowed) the actor named ``victim``, or itself, in the middle of that
  gradient, if ``victim`` is None. The file ``marker`` records that it did;
  without a marker it kills every time.
  """
  x, y = datasets.load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  y = y.astype(np.int32)

  def loss_fn(params, batch):
    xb, yb = batch
    logits = xb @ params["w"] + params["b"][None, :]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def maybe_kill(worker, seq):
    if kill_at is None or kill_at[0] not in (None, worker) or seq != kill_at[1]:
      return
    if marker and os.path.exists(marker):
      return
    if marker:
      open(marker, "w").close()
    if victim is None:
      ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
      time.sleep(60)  # Die here, mid-gradient, not after returning.
    try:
      ray.kill(ray.get_actor(victim), no_restart=False)
    except ValueError:  # Another worker killed it first.
      pass

  def data_fn(worker, seq):
    maybe_kill(worker, seq)
    shard = np.arange(worker, _NUM_TRAIN, 4)  # Worker m's own quarter.
    idx = np.random.default_rng([worker, seq]).choice(shard, 32)
    return x[idx], y[idx]

  def accuracy(params):
    logits = x[_NUM_TRAIN:] @ params["w"] + params["b"][None, :]
    return float(np.mean(np.argmax(logits, 1) == y[_NUM_TRAIN:]))

  params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
  return loss_fn, data_fn, params, accuracy


def reference_staleness(workers):
  """Staleness when every worker pulls at step 0 and right after each push."""
  last = {}
  out = []
  for k, m in enumerate(workers):
    out.append(k - last[m] - 1 if m in last else k)
    last[m] = k
  return np.array(out)


@pytest.fixture(scope="module")
def ray_env():
  """Usage stats and token auth off for this module only; Ray down after."""
  with pytest.MonkeyPatch.context() as mp:
    for key, value in _RAY_ENV.items():
      mp.setenv(key, value)
    yield
    if ray.is_initialized():
      ray.shutdown()


@pytest.fixture
def local_ray(ray_env):  # pylint: disable=redefined-outer-name,unused-argument
  """A local Ray for the test (started once, shut down with the module)."""
  if not ray.is_initialized():
    ray.init(address="local", **_INIT)
  yield


def _alive_actors(timeout_s=30.0):
  """Actors not yet dead, after waiting up to ``timeout_s`` for them to die.

  ``ray.kill`` is asynchronous, so an actor killed at the end of ``train``
  may take a moment to show as DEAD. Without a dashboard there is no
  ``ray.util.state``; the GCS actor table is read directly.
  """
  deadline = time.monotonic() + timeout_s
  while True:
    states = ray._private.state.actors().values()  # pylint: disable=protected-access
    alive = [a for a in states if a["State"] != "DEAD"]
    if not alive or time.monotonic() > deadline:
      return alive
    time.sleep(0.2)


@pytest.mark.usefixtures("local_ray")
def test_train_converges_and_records_staleness():
  loss_fn, data_fn, params, accuracy = digits_problem()
  tx = dcasgd_optax.dcasgd(0.5, num_workers=4)
  result = dray.train(loss_fn, tx, params, data_fn, num_workers=4,
                      num_updates=240)
  rec = result.records
  assert result.step == 240
  np.testing.assert_array_equal(rec.step, np.arange(1, 241))
  assert set(rec.worker.tolist()) == {0, 1, 2, 3}
  for m in range(4):  # Each worker's gradients are applied once, in order.
    np.testing.assert_array_equal(rec.seq[rec.worker == m],
                                  np.arange(np.sum(rec.worker == m)))
  np.testing.assert_array_equal(rec.staleness, reference_staleness(rec.worker))
  assert 1.0 <= rec.staleness.mean() <= 8.0
  assert rec.loss[-40:].mean() < 0.5 * rec.loss[:8].mean()
  assert accuracy(result.params) > 0.85  # Chance is 0.1.
  assert 0.0 < result.server_share < 1.0
  assert not _alive_actors()


@pytest.mark.usefixtures("local_ray")
def test_killed_worker_restarts_and_count_is_exact(tmp_path):
  # Worker 1 dies during its first gradient, while the others train: that
  # gradient is certain to be needed, so the test cannot finish without it.
  loss_fn, data_fn, params, accuracy = digits_problem(
      kill_at=(1, 0), marker=str(tmp_path / "killed")
  )
  tx = dcasgd_optax.dcasgd(0.5, num_workers=3)
  result = dray.train(loss_fn, tx, params, data_fn, num_workers=3,
                      num_updates=120)
  rec = result.records
  assert (tmp_path / "killed").exists()
  np.testing.assert_array_equal(result.worker_failures, [0, 1, 0])
  assert result.step == 120 and len(rec.step) == 120
  np.testing.assert_array_equal(rec.step, np.arange(1, 121))
  for m in range(3):  # Seq 0 of worker 1 was recomputed, not lost or doubled.
    np.testing.assert_array_equal(rec.seq[rec.worker == m],
                                  np.arange(np.sum(rec.worker == m)))
  # After its restart worker 1 pulled the current params, not the initial
  # ones: its first update is less stale than its step.
  first = np.flatnonzero(rec.worker == 1)[0]
  assert rec.staleness[first] < rec.step[first] - 1
  assert accuracy(result.params) > 0.8
  assert not _alive_actors()


@pytest.mark.usefixtures("local_ray")
def test_worker_dying_more_than_max_restarts_fails_the_run():
  loss_fn, data_fn, params, _ = digits_problem(kill_at=(0, 0))
  with pytest.raises(RuntimeError, match="Worker 0 died and could not be"):
    dray.train(loss_fn, optax.sgd(0.5), params, data_fn, num_workers=3,
               num_updates=60, max_restarts=1)
  assert not _alive_actors()


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

  loss_fn, killer, params, _ = digits_problem(kill_at=(0, 0), marker=marker)
  hang = SlowToRestart()
  data_fn = lambda worker, seq: (hang, killer(worker, seq))[1]
  with pytest.raises(RuntimeError, match="Worker 0 failed and has not"):
    dray.train(loss_fn, optax.sgd(0.5), params, data_fn, num_workers=3,
               num_updates=100, restart_timeout_s=3.0)
  assert not _alive_actors()


@pytest.mark.usefixtures("local_ray")
def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
  # One worker makes the run deterministic, so the two must agree exactly.
  loss_fn, data_fn, params, _ = digits_problem()
  tx = dcasgd_optax.dcasgd(0.5, num_workers=1)
  run = lambda n, **kw: dray.train(loss_fn, tx, params, data_fn, 1, n, **kw)
  first = run(30, checkpoint_dir=str(tmp_path), checkpoint_every=10)
  assert first.step == 30
  resumed = run(50, checkpoint_dir=str(tmp_path), resume=True)
  np.testing.assert_array_equal(resumed.records.step, np.arange(31, 51))
  np.testing.assert_array_equal(resumed.records.seq, np.arange(30, 50))
  straight = run(50)
  chex.assert_trees_all_equal((resumed.params, resumed.opt_state),
                              (straight.params, straight.opt_state))
  np.testing.assert_array_equal(resumed.records.loss,
                                straight.records.loss[30:])


@pytest.mark.usefixtures("local_ray")
def test_dead_server_run_resumes_from_its_checkpoint(tmp_path):
  name = f"server-{os.getpid()}"
  tx = dcasgd_optax.dcasgd(0.5, num_workers=3)
  ckpt = dict(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=10)
  loss_fn, killer, params, accuracy = digits_problem(
      # One of 3 workers computes >= 50 of 150 gradients, so some worker
      # loads batch 25; its first 25 are applied by then: step >= 25.
      kill_at=(None, 25), marker=str(tmp_path / "killed"), victim=name
  )
  with pytest.raises(RuntimeError, match="resume=True"):
    dray.train(loss_fn, tx, params, killer, 3, 150, **ckpt,
               server_options={"name": name})
  saved = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir()
                 if p.name.isdigit())
  assert saved and saved[-1] % 10 == 0 and saved[-1] < 150
  _, data_fn, _, _ = digits_problem()
  result = dray.train(loss_fn, tx, params, data_fn, 3, 150, **ckpt,
                      resume=True)
  assert result.step == 150
  np.testing.assert_array_equal(result.records.step,
                                np.arange(saved[-1] + 1, 151))
  assert accuracy(result.params) > 0.8
  assert not _alive_actors()


@pytest.mark.usefixtures("ray_env")
def test_train_started_ray_shuts_it_down():
  if ray.is_initialized():
    ray.shutdown()
  loss_fn, data_fn, params, _ = digits_problem()
  result = dray.train(loss_fn, optax.sgd(0.5), params, data_fn, num_workers=3,
                      num_updates=30, address="local", init_kwargs=_INIT)
  assert result.step == 30
  assert not ray.is_initialized()


def test_bad_arguments_fail_before_ray_starts():
  loss_fn, data_fn, params, _ = digits_problem()
  with pytest.raises(ValueError, match="`num_workers` is 3"):
    dray.train(loss_fn, dcasgd_optax.dcasgd(0.1, 4), params, data_fn, 3, 10)
  with pytest.raises(ValueError, match="num_updates"):
    dray.train(loss_fn, optax.sgd(0.1), params, data_fn, 3, 0)
  with pytest.raises(ValueError, match="checkpoint_dir"):
    dray.train(loss_fn, optax.sgd(0.1), params, data_fn, 3, 10, resume=True)
