"""What the Ray test files share: a small real problem, a local Ray, checks.

The problem is softmax regression on scikit-learn's digits. Its functions
are closures, so Ray pickles them by value for the actors. The local Ray
(2 CPUs, no dashboard; usage stats and token auth off, as tests/conftest.py
sets them for every test process) is started once per module.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ray = pytest.importorskip("ray")
datasets = pytest.importorskip("sklearn.datasets")

INIT = dict(num_cpus=2, include_dashboard=False, log_to_driver=False)
NUM_TRAIN = 1500  # Of the 1,797 digits; the rest are held out.


def _kill_self_later(seconds: float) -> None:
  pid = os.getpid()
  threading.Timer(seconds, lambda: os.kill(pid, signal.SIGKILL)).start()


def digits_problem(fault=None, marker=None, pad=0, nan_at=None):
  """Softmax regression on the digits: ``(loss_fn, data_fn, params, accuracy)``.

  Workers train on the first 1,500 images, worker m on every 4th from m;
  ``accuracy`` is on the other 297.

  Args:
    fault: ``(kind, worker, seq, target)``, done in ``data_fn`` the first
      time a worker actor loads gradient ``seq`` of ``worker`` (None: any
      worker):
      ``"kill_self"``: the worker's actor is killed (restart allowed) in the
      middle of that gradient; ``"kill_actor"``: the actor named ``target``
      is killed; ``"kill_before_push"``: the actor named ``target`` (a shard)
      is kept busy for 8 s and the worker's process is SIGKILLed 3 s later,
      after it computed the gradient and sent the push that the busy shard
      has not read yet.
    marker: a file recording that the fault happened (so it happens once);
      without one it happens every time.
    pad: the size of an extra leaf ``"pad"`` that the loss ignores (its
      gradient is zero): makes a shard's message larger than the 512 kB
      the wire sends inline, so that it goes through the object store.
    nan_at: ``(worker, seq)`` whose batch holds one NaN pixel.
  """
  # Ray's workers cannot import this test module: send its code by value.
  ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
  x, y = datasets.load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  y = y.astype(np.int32)

  def loss_fn(params, batch):
    xb, yb = batch
    logits = xb @ params["w"] + params["b"][None, :]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    if "pad" in params:
      loss = loss + 0.0 * params["pad"].sum()
    return loss

  def maybe_fault(worker, seq):
    if fault is None or fault[1] not in (None, worker) or seq != fault[2]:
      return
    if ray.get_runtime_context().get_actor_id() is None:
      return  # Called by train's check in the driver, not by a worker.
    if marker and os.path.exists(marker):
      return
    if marker:
      open(marker, "w").close()
    kind, target = fault[0], fault[3]
    if kind == "kill_self":
      ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
      time.sleep(60)  # Die here, mid-gradient, not after returning.
    elif kind == "kill_actor":
      try:
        ray.kill(ray.get_actor(target), no_restart=False)
      except ValueError:  # Another worker killed it first.
        pass
    elif kind == "kill_before_push":
      ray.get_actor(target).__ray_call__.remote(lambda _: time.sleep(8))
      _kill_self_later(3.0)

  def data_fn(worker, seq):
    maybe_fault(worker, seq)
    shard = np.arange(worker % 4, NUM_TRAIN, 4)
    idx = np.random.default_rng([worker, seq]).choice(shard, 32)
    xb = x[idx]
    if nan_at == (worker, seq):
      xb = xb.copy()
      xb[3, 17] = np.nan
    return xb, y[idx]

  def accuracy(params):
    logits = x[NUM_TRAIN:] @ params["w"] + params["b"][None, :]
    return float(np.mean(np.argmax(logits, 1) == y[NUM_TRAIN:]))

  params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
  if pad:
    params["pad"] = jnp.zeros(pad)
  return loss_fn, data_fn, params, accuracy


def trace_batches(data_fn, records):
  """The batches of a trace, in step order, stacked for the simulator."""
  order = np.argsort(records["step"])
  batches = [
      data_fn(int(m), int(s))
      for m, s in zip(records["worker"][order], records["seq"][order])
  ]
  return jax.tree.map(lambda *b: np.stack(b), *batches)


def check_exactly_once(records, num_workers):
  """Each worker's seqs are 0, 1, 2, ... in the server's order: no gradient
  lost or applied twice; and every worker has some (none was left out)."""
  for m in range(num_workers):
    got = np.asarray(records["seq"])[np.asarray(records["worker"]) == m]
    assert len(got), f"worker {m} has no records"
    np.testing.assert_array_equal(got, np.arange(len(got)))


@pytest.fixture(scope="module")
def ray_env():
  """Ray down after the module.

  Token auth is off for the whole test process (tests/conftest.py), not
  switched here: a process's Ray keeps the mode it first started with.
  """
  assert os.environ.get("RAY_AUTH_MODE") == "disabled"
  yield
  if ray.is_initialized():
    ray.shutdown()


@pytest.fixture
def local_ray(ray_env):  # pylint: disable=redefined-outer-name,unused-argument
  """A local Ray for the test (started once, shut down with the module)."""
  if not ray.is_initialized():
    ray.init(address="local", **INIT)
  yield


def alive_actors(timeout_s=30.0):
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
