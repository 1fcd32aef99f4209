"""Replay throughput of one program on 1 process x 8 devices and 2 x 4.

The same DC-ASGD replay (an MLP, 16 workers, a cyclic order, the
``"compiled"`` strategy) on eight CPU devices, held by one process or by two
processes of four joined with ``jax.distributed`` (collectives over gloo on
loopback), as on a two-host pod slice: the difference is the cost of the
collectives crossing processes. Also printed, from the compiled program's
HLO: the collectives the replay runs and the bytes each moves, i.e. what a
host sends per arrival (docs/pod.md turns it into a capacity note).

Each layout is launched as fresh processes (this script with ``--child``);
process 0 reports the best of ``--repeats`` timed replays after a warm-up.

Run: python benchmarks/multihost_throughput.py [--arrivals 512]
       [--repeats 3] [--hidden 32,256]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = 16
BATCH = 32


def _child(args: argparse.Namespace) -> None:
  """One process of a layout: joins the program, times the replays."""
  import jax  # pylint: disable=g-import-not-at-top
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes, process_id=args.process,
        initialization_timeout=60)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import dcasgd_optax  # pylint: disable=g-import-not-at-top
  from dcasgd_optax.harness import Simulator  # pylint: disable=g-import-not-at-top
  from dcasgd_optax.harness import schedules  # pylint: disable=g-import-not-at-top

  rows = []
  for hidden in map(int, args.hidden.split(",")):
    keys = jax.random.split(jax.random.key(0), 4)
    sizes = [784, hidden, hidden, 10]
    params = [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a),
               "b": jnp.zeros((b,))}
              for k, a, b in zip(keys, sizes[:-1], sizes[1:])]
    xs = jax.random.normal(keys[3], (2048, 784))
    ys = jax.random.randint(keys[3], (2048,), 0, 10)

    def loss_fn(params, idx, xs=xs, ys=ys):
      h = xs[idx]
      for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
      logits = h @ params[-1]["w"] + params[-1]["b"]
      return -jnp.mean(jnp.take_along_axis(
          jax.nn.log_softmax(logits), ys[idx][:, None], axis=1))

    tx = dcasgd_optax.dcasgd(0.01, WORKERS, momentum=0.9, adaptive=True)
    sim = Simulator(loss_fn, tx, strategy="compiled", donate=True)
    arrivals = schedules.cyclic(WORKERS, args.arrivals)
    batches = np.random.default_rng(0).integers(
        0, 2048, (args.arrivals, BATCH)).astype(np.int32)
    state = sim.init(params)
    hlo = sim.lower(state, batches, arrivals).compile().as_text()
    collectives = _collectives(hlo)
    state, metrics = sim.replay(state, batches, arrivals)  # compiles
    jax.block_until_ready(metrics)
    best = float("inf")
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      state, metrics = sim.replay(state, batches, arrivals)
      jax.block_until_ready((state, metrics))
      best = min(best, time.perf_counter() - t0)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    rows.append(dict(hidden=hidden, params=int(num_params),
                     us_per_arrival=1e6 * best / args.arrivals,
                     collectives=collectives))
  if jax.process_index() == 0:
    print("RESULT " + json.dumps(rows), flush=True)


def _collectives(hlo: str) -> dict[str, list[str]]:
  """Each collective op of the compiled program: its kind and result shape."""
  found: dict[str, list[str]] = {}
  kinds = "all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter"
  pattern = rf"= (\([^)]*\)|\S+) ({kinds})(?:-start)?\("
  for shape, kind in re.findall(pattern, hlo):
    found.setdefault(kind, []).append(shape)
  return found


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _layout(num_processes: int, devices: int, args: argparse.Namespace):
  """Launches one layout; returns process 0's rows."""
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = []
  for i in range(num_processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=ROOT)
    procs.append(subprocess.Popen(
        [sys.executable, __file__, "--child", "--process", str(i),
         "--num-processes", str(num_processes), "--coordinator", coordinator,
         "--arrivals", str(args.arrivals), "--repeats", str(args.repeats),
         "--hidden", args.hidden],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=1800) for p in procs]
  for p, (out, err) in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(f"layout {num_processes}x{devices}: {out}\n{err}")
  line = [r for r in outs[0][0].splitlines() if r.startswith("RESULT ")][0]
  return json.loads(line[len("RESULT "):])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arrivals", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--hidden", default="32,256")
  parser.add_argument("--child", action="store_true")
  parser.add_argument("--process", type=int, default=0)
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--coordinator", default="")
  args = parser.parse_args()
  if args.child:
    _child(args)
    return
  results = {}
  for num_processes, devices in ((1, 8), (2, 4), (1, 8)):  # 1x8 again last
    rows = _layout(num_processes, devices, args)
    key = f"{num_processes}x{devices}"
    results.setdefault(key, []).append(rows)
  print("| model (hidden) | params | 1x8 us/arrival (best of 2 launches) "
        "| 2x4 us/arrival | 2x4 / 1x8 |")
  print("|---|---|---|---|---|")
  for i, row in enumerate(results["2x4"][0]):
    one = min(r[i]["us_per_arrival"] for r in results["1x8"])
    two = row["us_per_arrival"]
    print(f"| {row['hidden']} | {row['params']} | {one:.0f} | {two:.0f} "
          f"| {two / one:.2f}x |")
  for row in results["2x4"][0]:
    print(f"hidden {row['hidden']}: collectives in the replay program: "
          + json.dumps(row["collectives"]))


if __name__ == "__main__":
  main()
