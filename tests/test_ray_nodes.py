"""dcasgd_optax.ray.train across Ray nodes started on this host (slow).

The nodes are real raylets started with ``ray start --block`` on this host,
with token authentication as docs/ray.md says, by the machinery of
tests/test_ray_auth.py (private temp dirs and ports, each node stopped by
its process id). The driver runs in a subprocess whose environment holds the
token (Ray reads its auth mode when it is imported). Separate machines were
not tried (docs/ray.md).

The loss of a gradient held in the object store by its dead owner is
tested on one node, in tests/test_ray_faults.py (here the pieces are small
enough to travel inline with the call).
"""

import json
import subprocess
import sys

import pytest
from test_ray_auth import base_env
from test_ray_auth import cluster_dir  # noqa: F401  # a fixture
from test_ray_auth import start_head
from test_ray_auth import start_node  # noqa: F401  # a fixture

pytestmark = pytest.mark.slow

_DRIVER_TIMEOUT_S = 900.0

# A driver: trains logistic regression on the cluster at argv[1] as case
# argv[3] says and writes what happened to argv[2] as JSON.
DRIVER = r'''
import json, os, signal, sys, threading, time
import jax.numpy as jnp
import numpy as np
import optax
import ray
import dcasgd_optax
import dcasgd_optax.ray as dray

address, out_path, case, marker = sys.argv[1:5]
head = {"resources": {"node:__internal_head__": 0.001}}
on = lambda resource: {"resources": {resource: 0.01}}
W_TRUE = np.array([1.0, -2.0, 0.5, 3.0, -1.0, 0.25], np.float32)


def loss_fn(params, batch):
  x, y = batch
  return optax.sigmoid_binary_cross_entropy(x @ params["w"], y).mean()


def kill_node_before_push(shard_name):
  """Keep the shard busy, then kill this worker's node (its raylet, the
  worker's parent) and the worker: after the gradient was computed and
  pushed, before the busy shard read it."""
  if os.path.exists(marker):
    return
  open(marker, "w").close()
  ray.get_actor(shard_name).__ray_call__.remote(lambda _: time.sleep(10))
  raylet = os.getppid()

  def kill():
    os.kill(raylet, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)

  threading.Timer(3.0, kill).start()


def data_fn(worker, seq):
  if (case == "node_lost" and worker == 0 and seq == 3
      and ray.get_runtime_context().get_actor_id()):
    kill_node_before_push("shard0")
  x = np.random.default_rng([worker, seq]).normal(size=(32, 6))
  x = x.astype(np.float32)
  return x, (x @ W_TRUE > 0).astype(np.float32)


if case == "two_nodes":
  kwargs = dict(num_workers=3, num_updates=150, num_shards=2,
                server_options=[head, on("second")],
                worker_options=on("second"))
else:  # "node_lost"
  kwargs = dict(num_workers=2, num_updates=60,
                server_options={**head, "name": "shard0"},
                worker_options=on("workers"), restart_timeout_s=300.0)
tx = dcasgd_optax.dcasgd(0.5, num_workers=kwargs["num_workers"])
result = dray.train(loss_fn, tx, {"w": jnp.zeros(6)}, data_fn,
                    address=address, init_kwargs={"log_to_driver": False},
                    **kwargs)
loss = result.records.loss
traces = [result.records, *result.shard_records]
with open(out_path, "w") as f:
  json.dump(dict(
      step=result.step, first_loss=float(loss[:10].mean()),
      last_loss=float(loss[-10:].mean()),
      failures=result.worker_failures.tolist(),
      traces=[{k: t[k].tolist() for k in ("worker", "seq", "step")}
              for t in traces],
      ray_initialized=ray.is_initialized()), f)
'''


@pytest.fixture
def token_cluster(start_node, cluster_dir):  # pylint: disable=redefined-outer-name
  """A token head; returns ``(address, add_node, run_driver)``."""
  address, _, token = start_head(start_node, cluster_dir, "token")

  def add_node(name, resources):
    # More CPUs than actors placed on it: with fewer, Ray 2.60 stalled the
    # creation of the actors beyond the CPU count here (docs/ray.md).
    node = start_node(name, base_env(
        cluster_dir / f"{name}_home", RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token), [f"--address={address}",
                                f"--resources={resources}", "--num-cpus=8"])
    node.wait_started()

  def run_driver(case):
    script, out = cluster_dir / "driver.py", cluster_dir / f"{case}.json"
    script.write_text(DRIVER)
    env = base_env(cluster_dir / "driver_home", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=token)
    proc = subprocess.run(
        [sys.executable, str(script), address, str(out), case,
         str(cluster_dir / "killed")],
        env=env, capture_output=True, text=True, timeout=_DRIVER_TIMEOUT_S)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    return json.loads(out.read_text())

  return address, add_node, run_driver


def _check_exactly_once(trace, num_updates, num_workers):
  assert sorted(trace["step"]) == list(range(1, num_updates + 1))
  for m in range(num_workers):
    seqs = [s for w, s in zip(trace["worker"], trace["seq"]) if w == m]
    assert seqs, f"worker {m} has no records"
    assert seqs == list(range(len(seqs))), (m, seqs)


def test_shards_on_two_nodes_workers_on_the_second(token_cluster):  # pylint: disable=redefined-outer-name
  _, add_node, run_driver = token_cluster
  add_node("second", '{"second": 1}')
  result = run_driver("two_nodes")
  assert result["step"] == 150 and not result["ray_initialized"]
  for trace in result["traces"]:  # The run's, and each shard's.
    _check_exactly_once(trace, 150, 3)
  assert result["last_loss"] < 0.7 * result["first_loss"]


def test_a_worker_node_lost_before_a_shard_read_its_gradient(token_cluster):  # pylint: disable=redefined-outer-name
  _, add_node, run_driver = token_cluster
  add_node("a", '{"workers": 1}')
  add_node("b", '{"workers": 1}')
  result = run_driver("node_lost")
  assert result["failures"][0] >= 1
  _check_exactly_once(result["traces"][0], 60, 2)
  assert result["last_loss"] < 0.8 * result["first_loss"]
