"""Token authentication on real Ray clusters started on this host (slow).

Each test starts its own nodes with ``ray start --block`` (a head, then maybe
a second node), in a private temp dir with free ports, so they do not meet
other Ray clusters on the machine; ``ray start --block`` stops its node's
processes on SIGTERM, which is how each node is stopped (by its process id,
then its process group is killed if anything is left). Drivers run as
subprocesses with an environment built from scratch (their own empty HOME),
so whether they hold the token is exactly what the test says.

The token cluster is started as docs/ray.md says: ``ray get-auth-token
--generate`` writes the token to the head's ``~/.ray/auth_token`` and the head
starts with ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

pytest.importorskip("ray")
pytest.importorskip("orbax.checkpoint")

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
RAY_CLI = pathlib.Path(sys.executable).with_name("ray")
_START_TIMEOUT_S = 180.0  # a node on a loaded 2-core machine
_STOP_TIMEOUT_S = 60.0
_DRIVER_TIMEOUT_S = 420.0
_NUM_UPDATES = 60

# A driver: trains (or tries to) on the cluster at argv[1] and writes what
# happened to argv[2] as JSON. Its functions live in __main__, so Ray pickles
# them by value for the workers.
DRIVER = r'''
import json, sys
import jax.numpy as jnp
import numpy as np
import optax
import ray
import dcasgd_optax
import dcasgd_optax.ray as dray

W_TRUE = np.array([1.0, -2.0, 0.5, 3.0], np.float32)

def loss_fn(params, batch):
  x, y = batch
  return optax.sigmoid_binary_cross_entropy(x @ params["w"], y).mean()

def data_fn(worker, seq):
  x = np.random.default_rng([worker, seq]).normal(size=(32, 4))
  x = x.astype(np.float32)
  return x, (x @ W_TRUE > 0).astype(np.float32)

address, out_path, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {}
try:
  result = dray.train(
      loss_fn, dcasgd_optax.dcasgd(0.5, num_workers=2), {"w": jnp.zeros(4)},
      data_fn, num_workers=2, num_updates=options.pop("num_updates"),
      address=address, init_kwargs={"log_to_driver": False}, **options)
  ray.init(address=address, log_to_driver=False)  # only to count the nodes
  out.update(
      step=result.step, workers=sorted(set(result.records.worker.tolist())),
      num_records=len(result.records.loss),
      first_loss=float(result.records.loss[:10].mean()),
      last_loss=float(result.records.loss[-10:].mean()),
      nodes_alive=sum(n["Alive"] for n in ray.nodes()))
except Exception as e:  # reported to the test
  out.update(error=type(e).__name__, message=str(e))
out["ray_initialized"] = ray.is_initialized()
with open(out_path, "w") as f:
  json.dump(out, f)
'''


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("", 0))
    return s.getsockname()[1]


def base_env(home: pathlib.Path, **extra: str) -> dict[str, str]:
  """This process's environment without any Ray setting, plus ``extra``."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
  paths = [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
  env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0",
             PYTHONPATH=os.pathsep.join(paths))
  env.update(extra)
  home.mkdir(parents=True, exist_ok=True)
  return env


class RayNode:
  """One ``ray start --block`` process (a head or a joining node)."""

  def __init__(self, root: pathlib.Path, name: str, env: dict[str, str],
               args: list[str]):
    self.log = root / f"{name}.log"
    ports = {flag: free_port() for flag in (
        "node-manager-port", "object-manager-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port")}
    low = 20000 + 100 * (free_port() % 90)  # worker ports, away from 10002+
    cmd = [str(RAY_CLI), "start", "--block", "--num-cpus=2",
           "--object-store-memory=100000000", f"--temp-dir={root / name}",
           f"--min-worker-port={low}", f"--max-worker-port={low + 99}",
           *(f"--{flag}={port}" for flag, port in ports.items()), *args]
    with open(self.log, "w") as log:
      self.process = subprocess.Popen(cmd, env=env, stdout=log,
                                      stderr=subprocess.STDOUT,
                                      start_new_session=True)

  def wait_started(self) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while "Ray runtime started." not in self.log.read_text():
      assert self.process.poll() is None, (
          f"ray start exited with {self.process.returncode}:\n"
          f"{self.log.read_text()[-3000:]}")
      assert time.monotonic() < deadline, f"{self.log} never said it started"
      time.sleep(0.5)

  def wait_exit(self) -> int:
    try:
      return self.process.wait(timeout=_START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      pytest.fail(f"ray start did not give up in {_START_TIMEOUT_S} s")

  def stop(self) -> list[int]:
    """Stops the node (SIGTERM, as `ray stop` does, to this node only).

    Returns:
      The processes of its group that outlived it by ``_STOP_TIMEOUT_S`` and
      were killed (SIGKILL), normally none.
    """
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGTERM)
      try:
        self.process.wait(timeout=_STOP_TIMEOUT_S)
      except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while group_alive(self.process.pid) and time.monotonic() < deadline:
      time.sleep(0.5)
    left = group_alive(self.process.pid)
    if left:
      os.killpg(self.process.pid, signal.SIGKILL)
    self.process.wait(timeout=_STOP_TIMEOUT_S)
    return left


def group_alive(pgid: int) -> list[int]:
  """Running (not zombie) processes of the process group ``pgid``."""
  pids = []
  for proc in pathlib.Path("/proc").iterdir():
    if not proc.name.isdigit():
      continue
    try:
      # /proc/PID/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces.
      fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if fields[0] != "Z" and int(fields[2]) == pgid:
      pids.append(int(proc.name))
  return pids


@pytest.fixture
def cluster_dir():
  """A short private directory (Ray's socket paths must stay < 108 chars)."""
  root = pathlib.Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
  yield root
  shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def start_node(cluster_dir):  # pylint: disable=redefined-outer-name
  """Starts nodes; at teardown stops them all, last started first."""
  nodes = []

  def start(name, env, args):
    node = RayNode(cluster_dir, name, env, args)
    nodes.append(node)
    return node

  yield start
  killed = {node.log.name: node.stop() for node in reversed(nodes)}
  for node in nodes:
    assert not group_alive(node.process.pid), f"{node.log}: processes left"
  # Not a failure of the code under test, but worth seeing in the report.
  for name, pids in killed.items():
    if pids:
      print(f"{name}: SIGKILLed {pids}, which outlived SIGTERM")


def start_head(start_node, cluster_dir, mode):  # pylint: disable=redefined-outer-name
  """A head with RAY_AUTH_MODE=``mode``.

  Returns:
    ``(address, client_address, token)``: its GCS, its Ray Client server
    (``ray://``), and the token (None unless ``mode`` is ``"token"``).
  """
  home = cluster_dir / "head_home"
  env = base_env(home, RAY_AUTH_MODE=mode)
  token = None
  if mode == "token":
    subprocess.run([str(RAY_CLI), "get-auth-token", "--generate"], env=env,
                   check=True, capture_output=True, timeout=120)
    token = (home / ".ray" / "auth_token").read_text().strip()
  port, client_port = free_port(), free_port()
  head = start_node("head", env, [
      "--head", f"--port={port}", "--include-dashboard=false",
      f"--ray-client-server-port={client_port}"])
  head.wait_started()
  return f"127.0.0.1:{port}", f"ray://127.0.0.1:{client_port}", token


def run_driver(cluster_dir, address, env, **options):  # pylint: disable=redefined-outer-name
  """Runs DRIVER in a fresh process; returns what it wrote."""
  script = cluster_dir / "driver.py"
  script.write_text(DRIVER)
  out = cluster_dir / f"driver_{time.monotonic_ns()}.json"
  options.setdefault("num_updates", _NUM_UPDATES)
  proc = subprocess.run(
      [sys.executable, str(script), address, str(out), json.dumps(options)],
      env=env, capture_output=True, text=True, timeout=_DRIVER_TIMEOUT_S)
  assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
  return json.loads(out.read_text())


def assert_trained(result):
  assert "error" not in result, result
  assert result["step"] == _NUM_UPDATES
  assert result["num_records"] == _NUM_UPDATES
  assert result["workers"] == [0, 1]
  assert result["last_loss"] < 0.8 * result["first_loss"]


def test_token_cluster_admits_token_holders_only(start_node, cluster_dir):  # pylint: disable=redefined-outer-name
  address, client_address, token = start_head(start_node, cluster_dir,
                                              "token")

  # (a) A driver without the token is refused by connect, before ray.init;
  # so is one that has it but would not send it (RAY_AUTH_MODE unset), and
  # one with another token. Through Ray Client (ray://) too.
  for name, target, extra in [
      ("no token", address, {}),
      ("no token, ray://", client_address, {}),
      ("token not sent", address, {"RAY_AUTH_TOKEN": token}),
      ("wrong token", address, {"RAY_AUTH_MODE": "token",
                                "RAY_AUTH_TOKEN": "0" * 64}),
  ]:
    env = base_env(cluster_dir / "driver_home", **extra)
    result = run_driver(cluster_dir, target, env)
    assert result["error"] == "AuthenticationError", (name, result)
    assert ("rejected the token" if name == "wrong token"
            else "requires token authentication") in result["message"], name
    assert not result["ray_initialized"], name  # so no actor was started

  # (c) A second node without the token cannot join; with it, it joins.
  node_args = [f"--address={address}", '--resources={"second": 2}']
  outsider = start_node("outsider", base_env(cluster_dir / "outsider_home"),
                        node_args)
  assert outsider.wait_exit() != 0
  assert "Authentication token is missing or incorrect" in (
      outsider.log.read_text())
  second = start_node("second", base_env(
      cluster_dir / "second_home", RAY_AUTH_MODE="token",
      RAY_AUTH_TOKEN=token), node_args)
  second.wait_started()

  # (b) A driver with the token trains to the end, its workers on the
  # second node (only it has the "second" resource), the server on the head.
  env = base_env(cluster_dir / "driver_home", RAY_AUTH_MODE="token",
                 RAY_AUTH_TOKEN=token)
  result = run_driver(
      cluster_dir, address, env,
      worker_options={"resources": {"second": 1}},
      server_options={"resources": {"node:__internal_head__": 0.001}})
  assert_trained(result)
  assert result["nodes_alive"] == 2  # head and second; the outsider never


def test_cluster_without_auth_is_refused_unless_allowed(start_node,
                                                        cluster_dir):  # pylint: disable=redefined-outer-name
  address, _, _ = start_head(start_node, cluster_dir, "disabled")
  env = base_env(cluster_dir / "driver_home")
  result = run_driver(cluster_dir, address, env)
  assert result["error"] == "RuntimeError", result
  assert "allow_insecure_cluster=True" in result["message"]
  assert not result["ray_initialized"]
  result = run_driver(cluster_dir, address, env, allow_insecure_cluster=True)
  assert_trained(result)


# Starts a local Ray through connect, with a dashboard on port argv[1], and
# writes to argv[2] whether that port answers on 127.0.0.1 and on this node's
# own address.
LOCAL_DASHBOARD = r'''
import json, socket, sys, time
import ray
import dcasgd_optax.ray as dray

port, out_path = int(sys.argv[1]), sys.argv[2]
dray.connect("local", num_cpus=1, include_dashboard=True,
             dashboard_port=port, log_to_driver=False)

def answers(host):
  try:
    with socket.create_connection((host, port), timeout=2):
      return True
  except OSError:
    return False

deadline = time.monotonic() + 120
while not answers("127.0.0.1") and time.monotonic() < deadline:
  time.sleep(0.5)
node_ip = ray.util.get_node_ip_address()
with open(out_path, "w") as f:
  json.dump({"node_ip": node_ip, "localhost": answers("127.0.0.1"),
             "node": answers(node_ip)}, f)
ray.shutdown()
'''


def test_a_local_ray_binds_its_dashboard_to_localhost(cluster_dir):  # pylint: disable=redefined-outer-name
  script, out = cluster_dir / "dashboard.py", cluster_dir / "dashboard.json"
  script.write_text(LOCAL_DASHBOARD)
  env = base_env(cluster_dir / "home", RAY_AUTH_MODE="token")
  proc = subprocess.run(
      [sys.executable, str(script), str(free_port()), str(out)], env=env,
      capture_output=True, text=True, timeout=_DRIVER_TIMEOUT_S)
  assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["localhost"], result  # The dashboard is up...
  if result["node_ip"].startswith("127."):
    pytest.skip("this host has no address but the loopback")
  assert not result["node"], result  # ...and only on the loopback.
