"""Updates per second of dcasgd_optax.ray.train: shards, workers, data paths.

On one machine (a local Ray), trains a one-hidden-layer MLP on
scikit-learn's digits (batch 64) with DC-ASGD-a, for each model size, number
of shards ``K`` and number of workers ``M``, and reports per run:

* ``updates/s``, in steady state (each run's first ``2 M`` updates, which
  include process start-up and compilation, are left out);
* the server share: the busiest shard's busy time (its jitted apply and
  pull and the host copies) over the same wall time;
* the shard's apply cost, ms per update (its busy time per update);
* the worker's time per gradient (batch and ``value_and_grad``);
* bytes moved per update: the gradient pushed plus the params pulled, as
  they travel (the same on both paths; halved with ``--wire bfloat16``).

Two data paths, in the same run: ``direct`` is ``train`` (workers push to the
shards and take the new params from their replies); ``driver`` is the path
``train`` had before: every gradient and every pull routed by the driver's
loop (worker -> driver -> server -> driver -> worker), one shard, the same
actors and jitted steps, so only the routing differs.

Run: python benchmarks/ray_throughput.py [--params 100_000,1_000_000]
  [--shards 1,2,4] [--workers 1,2,4] [--paths driver,direct]
  [--seconds 4] [--wire bfloat16]
Results and the machine they came from: benchmarks/ray_throughput.md.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import ray
from sklearn.datasets import load_digits

import dcasgd_optax
import dcasgd_optax.ray as dray

_BATCH = 64


def make_problem(num_params: int, seed: int = 0):
  """``(loss_fn, data_fn, params)``: an MLP 64 -> H -> 10 with ~num_params."""
  hidden = max(1, num_params // 75)
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {
      "w1": jax.random.normal(k1, (64, hidden)) / 8.0,
      "b1": jnp.zeros(hidden),
      "w2": jax.random.normal(k2, (hidden, 10)) / np.sqrt(hidden),
      "b2": jnp.zeros(10),
  }
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  y = y.astype(np.int32)

  def loss_fn(params, batch):
    x_BxD, y_B = batch
    h_BxH = jax.nn.relu(x_BxD @ params["w1"] + params["b1"][None, :])
    logits_BxK = h_BxH @ params["w2"] + params["b2"][None, :]
    return jax.numpy.mean(
        jax.nn.logsumexp(logits_BxK, -1)
        - jnp.take_along_axis(logits_BxK, y_B[:, None], -1)[:, 0])

  def data_fn(worker, seq):
    idx = np.random.default_rng([worker, seq]).integers(0, len(y), _BATCH)
    return x[idx], y[idx]

  return loss_fn, data_fn, params


def via_driver(loss_fn, tx, params, data_fn, num_workers, num_updates):
  """The old data path: the driver routes every gradient and pull.

  Returns the shard's trace, as ``train``'s ``shard_records`` would.
  """
  layout = dray.make_layout(params, 1)
  server = ray.remote(dray.ParameterServer).remote(
      tx, jax.device_get(params), num_workers)
  workers = [ray.remote(dray.GradientWorker).remote(m, loss_fn, data_fn,
                                                     layout)
             for m in range(num_workers)]
  ray.get([w.ready.remote() for w in workers])
  inflight = {}

  def submit(m, seq, pulled):
    meta, grads = workers[m].compute.options(num_returns=2).remote(seq, pulled)
    inflight[meta] = (m, seq, grads)

  for m in range(min(num_workers, num_updates)):
    submit(m, 0, server.pull.remote(m))
  sent = 0
  while sent < num_updates:
    ready, _ = ray.wait(list(inflight), num_returns=1)
    m, seq, grads = inflight.pop(ready[0])
    meta = ray.get(ready[0])
    _, pulled = server.apply.options(num_returns=2).remote(
        m, seq, grads, finite=meta.finite, meta=(meta.loss, meta.seconds))
    sent += 1
    if sent + len(inflight) < num_updates:
      submit(m, seq + 1, pulled)
  trace = ray.get(server.trace.remote())
  for actor in (server, *workers):
    ray.kill(actor)
  return [trace]


def direct(loss_fn, tx, params, data_fn, num_workers, num_updates,
           num_shards, wire):
  """``train``; returns each shard's trace (the first with compute times)."""
  result = dray.train(loss_fn, tx, params, data_fn, num_workers, num_updates,
                      num_shards=num_shards, wire_dtype=wire)
  traces = list(result.shard_records)
  traces[0] = {**traces[0], "compute_time": result.records.compute_time}
  return traces


def measure(path, num_params, num_shards, num_workers, num_updates, wire):
  """One run: updates/s, server share, apply ms, grad ms, MB/update."""
  loss_fn, data_fn, params = make_problem(num_params)
  tx = dcasgd_optax.dcasgd(0.01, num_workers)
  if path == "driver":
    traces = via_driver(loss_fn, tx, params, data_fn, num_workers,
                        num_updates)
  else:
    traces = direct(loss_fn, tx, params, data_fn, num_workers, num_updates,
                    num_shards, wire)
  skip = 2 * num_workers
  times = np.sort(traces[0]["time"])
  begin, elapsed = times[skip - 1], times[-1] - times[skip - 1]
  # Each shard's busy time over the same updates; the busiest one counts.
  busy = [t["server_time"][t["time"] > begin] for t in traces]
  size = sum(x.size for x in jax.tree.leaves(params))
  itemsize = 2 if wire is not None else 4
  return dict(
      rate=(len(times) - skip) / elapsed,
      share=max(b.sum() for b in busy) / elapsed,
      apply_ms=1e3 * max(b.mean() for b in busy),
      grad_ms=1e3 * np.mean(traces[0]["compute_time"][skip:]),
      mb=2 * size * itemsize / 1e6, size=size,
  )


def _updates_for(num_params: int, seconds: float) -> int:
  """Enough updates for about ``seconds`` of steady state on this machine."""
  per_second = 300 if num_params <= 200_000 else 3e7 / num_params
  return int(max(8, seconds * per_second))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", default="100_000,1_000_000,10_000_000,"
                      "25_000_000")
  parser.add_argument("--shards", default="1,2,4")
  parser.add_argument("--workers", default="1,2,4")
  parser.add_argument("--paths", default="driver,direct")
  parser.add_argument("--seconds", type=float, default=3.0)
  parser.add_argument("--wire", default=None)
  args = parser.parse_args()
  ints = lambda s: [int(v.replace("_", "")) for v in s.split(",")]
  wire = jnp.dtype(args.wire) if args.wire else None
  ray.init(address="local", include_dashboard=False, log_to_driver=False)
  print(f"Ray {ray.__version__}, JAX {jax.__version__}, {os.cpu_count()} "
        f"CPUs, load average {os.getloadavg()[0]:.1f} at the start, "
        f"wire {args.wire or 'float32'}")
  print("| params | path | shards | workers | updates/s | server share | "
        "apply ms/update | worker ms/grad | MB/update |")
  print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
  try:
    for p in ints(args.params):
      n = _updates_for(p, args.seconds)
      for path in args.paths.split(","):
        for k in ints(args.shards) if path == "direct" else [1]:
          for m in ints(args.workers):
            r = measure(path, p, k, m, n + 2 * m, wire)
            print(f"| {r['size']:,} | {path} | {k} | {m} | {r['rate']:.3g} | "
                  f"{r['share']:.0%} | {r['apply_ms']:.2f} | "
                  f"{r['grad_ms']:.1f} | {r['mb']:.1f} |", flush=True)
  finally:
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    ray.shutdown()


if __name__ == "__main__":
  main()
