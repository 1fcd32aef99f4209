"""Updates per second of dcasgd_optax.ray.train: shards, workers, data paths.

On one machine (a local Ray), trains a one-hidden-layer MLP on
scikit-learn's digits (batch 64) with DC-ASGD-a, for each model size, number
of shards ``K`` and number of workers ``M``, and reports per run:

* ``updates/s``, in steady state (each run's first ``2 M`` updates, which
  include process start-up and compilation, are left out);
* the server share: the busiest shard's busy time (its jitted apply and
  pull and the host copies) over the same wall time;
* the shard's apply cost, ms per update (its busy time per update);
* the worker's time per gradient (batch and ``value_and_grad``, to the
  flat messages on the host);
* the worker's cycle, ``M / updates/s`` (one gradient, push and reply), and
  the rest: the cycle less the worker's gradient and the shard's busy time,
  which is Ray's transport and scheduling (and, for ``M > 1``, waiting for
  the shard or a core);
* bytes moved per update: the gradient pushed plus the params pulled, as
  they travel (the same on both paths; halved with ``--wire bfloat16``),
  and the MB/s that makes.

Before the runs, what the machine can do at each size, measured in the same
process: one host copy of the params (GB/s), the jitted gradient and the
jitted DC-ASGD apply alone (no Ray), and a Ray round trip to an actor that
sends the same bytes back: one object each way, an empty call, and for
100-512 kB inline 96 kB chunks, as NumPy views (what ``train`` sent before)
and as ``bytes`` (what ``calls`` sends). From them, the ceilings: one worker
cannot beat ``1 / (grad + apply + round trip)`` (it waits for its pull; the
fastest round trip) in the calls, nor ``1 / (grad + apply + empty call + 2
copies)`` through shared memory; one shard cannot beat ``1 / apply``. Ray's own
messages (its C++ core logs to the process's stderr) go to ``--ray-log``,
never into the tables.

Three data paths, in the same run: ``direct`` is ``train`` as it is by
default (workers push to the shards and take the new params from their
replies; on one node the pieces go through the shared-memory channel and
the call carries only a header); ``calls`` is ``train(...,
shared_memory=False)``, the pieces in the actor calls (how ``train`` sends
them across nodes); ``driver`` is the path ``train`` had before sharding:
every gradient and every pull routed by the driver's loop (worker -> driver
-> server -> driver -> worker), one shard, the same actors and jitted steps,
so only the routing differs.

Run: python benchmarks/ray_throughput.py [--params 100_000,1_000_000]
  [--shards 1,2,4] [--workers 1,2,4] [--paths driver,calls,direct]
  [--seconds 4] [--wire bfloat16]
Results and the machine they came from: benchmarks/ray_throughput.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import ray
from sklearn.datasets import load_digits

import dcasgd_optax
import dcasgd_optax.ray as dray

# The actors, private: the old data path below drives them by hand.
from dcasgd_optax.ray._layout import make_layout
from dcasgd_optax.ray._server import ParameterServer
from dcasgd_optax.ray._worker import GradientWorker

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
  layout = make_layout(params, 1)
  server = ray.remote(ParameterServer).remote(
      tx, jax.device_get(params), num_workers)
  workers = [ray.remote(GradientWorker).remote(m, loss_fn, data_fn, layout)
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
           num_shards, wire, shared_memory=True):
  """``train``; returns each shard's trace (the first with compute times)."""
  result = dray.train(loss_fn, tx, params, data_fn, num_workers, num_updates,
                      num_shards=num_shards, wire_dtype=wire,
                      shared_memory=shared_memory)
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
                    num_shards, wire, shared_memory=path == "direct")
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


class Echo:
  """An actor that sends back what it gets (a Ray round trip, no work)."""

  def echo(self, x):
    return x

  def echo_all(self, *xs):
    return xs


def _best_ms(fn, repeats: int) -> float:
  """The fastest of ``repeats`` calls of ``fn`` (after one warm-up), in ms."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def machine_limits(num_params: int) -> dict:
  """Copy, gradient, apply and Ray round trip at this size, no training."""
  loss_fn, data_fn, params = make_problem(num_params)
  repeats = 20 if num_params <= 2_000_000 else 5
  flat = np.ones(sum(x.size for x in jax.tree.leaves(params)), np.float32)
  out = np.empty_like(flat)
  copy_ms = _best_ms(lambda: np.copyto(out, flat), repeats)
  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  batch = data_fn(0, 0)
  grad_ms = _best_ms(lambda: jax.block_until_ready(grad_fn(params, batch)),
                     repeats)
  tx = dcasgd_optax.dcasgd(0.01, 1)
  grads = jax.block_until_ready(grad_fn(params, batch)[1])

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def apply(params, state):
    updates, state = tx.update(grads, state, params, worker=0)
    return optax.apply_updates(params, updates), state

  held = [jax.tree.map(jnp.copy, params), tx.init(params)]

  def one_apply():
    held[:] = apply(*held)
    jax.block_until_ready(held)

  apply_ms = _best_ms(one_apply, repeats)
  echo = ray.remote(Echo).remote()
  trip_ms = _best_ms(lambda: ray.get(echo.echo.remote(flat)), repeats)
  empty_ms = _best_ms(lambda: ray.get(echo.echo.remote(None)), repeats)
  # 100-512 kB inline, in 96 kB chunks each way: as NumPy views (what train
  # sent before) and as bytes (what it sends now, _wire).
  views = [flat.view(np.uint8)[i:i + 96_000]
           for i in range(0, flat.nbytes, 96_000)]
  inline = 1 < len(views) <= 6

  def chunks_ms(chunks):
    call = echo.echo_all.options(num_returns=len(chunks))
    return (_best_ms(lambda: ray.get(list(call.remote(*chunks))), repeats)
            if inline else float("nan"))

  views_ms = chunks_ms(views)
  bytes_ms = chunks_ms([v.tobytes() for v in views])
  ray.kill(echo)
  trip = np.nanmin([trip_ms, views_ms, bytes_ms])
  return dict(size=flat.size, copy_gbs=flat.nbytes / copy_ms / 1e6,
              grad_ms=grad_ms, apply_ms=apply_ms, trip_ms=trip_ms,
              empty_ms=empty_ms, views_ms=views_ms, bytes_ms=bytes_ms,
              worker_cap=1e3 / (grad_ms + apply_ms + trip),
              shm_cap=1e3 / (grad_ms + apply_ms + empty_ms + 2 * copy_ms),
              shard_cap=1e3 / apply_ms)


def print_limits(sizes) -> None:
  """The table of :func:`machine_limits` for every size."""
  print("| params | host copy GB/s | grad ms | apply ms | Ray round trip ms: "
        "one object (empty call) | inline chunks ms: NumPy views | inline "
        "chunks ms: bytes | one-worker ceiling updates/s: calls | one-worker "
        "ceiling updates/s: shared memory | one-shard ceiling updates/s |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for p in sizes:
    r = machine_limits(p)
    print(f"| {r['size']:,} | {r['copy_gbs']:.1f} | {r['grad_ms']:.2f} | "
          f"{r['apply_ms']:.2f} | {r['trip_ms']:.2f} ({r['empty_ms']:.2f}) | "
          f"{r['views_ms']:.2f} | {r['bytes_ms']:.2f} | "
          f"{r['worker_cap']:.3g} | {r['shm_cap']:.3g} | "
          f"{r['shard_cap']:.3g} |", flush=True)


def _updates_for(num_params: int, seconds: float) -> int:
  """Enough updates for about ``seconds`` of steady state on this machine."""
  per_second = 300 if num_params <= 200_000 else 3e7 / num_params
  return int(max(8, seconds * per_second))


def _divert_native_stderr(path: str) -> None:
  """Sends file descriptor 2 (Ray's C++ logging) to ``path``.

  Python's own ``sys.stderr`` (tracebacks, warnings) keeps the original
  stream, so only the messages Ray's core writes natively leave the output.
  """
  original = os.dup(2)
  with open(path, "a", encoding="utf-8") as log:
    os.dup2(log.fileno(), 2)
  sys.stderr = os.fdopen(original, "w", buffering=1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", default="100_000,1_000_000,10_000_000,"
                      "25_000_000")
  parser.add_argument("--shards", default="1,2,4")
  parser.add_argument("--workers", default="1,2,4")
  parser.add_argument("--paths", default="driver,calls,direct")
  parser.add_argument("--seconds", type=float, default=3.0)
  parser.add_argument("--wire", default=None)
  parser.add_argument("--no-limits", dest="limits", action="store_false",
                      help="skip the table of what the machine can do")
  parser.add_argument("--ray-log", default=os.path.join(
      tempfile.gettempdir(), "ray_throughput_stderr.log"),
                      help="where Ray's own messages (its C++ core writes to "
                      "the process's stderr) go, out of the tables")
  args = parser.parse_args()
  ints = lambda s: [int(v.replace("_", "")) for v in s.split(",")]
  wire = jnp.dtype(args.wire) if args.wire else None
  _divert_native_stderr(args.ray_log)
  ray.init(address="local", include_dashboard=False, log_to_driver=False)
  started = time.time()
  print(f"Ray {ray.__version__}, JAX {jax.__version__}, {os.cpu_count()} "
        f"CPUs, load average {os.getloadavg()[0]:.1f} at the start, "
        f"wire {args.wire or 'float32'}")
  try:
    if args.limits:
      print_limits(ints(args.params))
    print("| params | path | shards | workers | updates/s | server share | "
          "apply ms/update | worker ms/grad | worker cycle ms | rest ms | "
          "MB/update | MB/s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in ints(args.params):
      n = _updates_for(p, args.seconds)
      for path in args.paths.split(","):
        for k in ints(args.shards) if path != "driver" else [1]:
          for m in ints(args.workers):
            r = measure(path, p, k, m, n + 2 * m, wire)
            cycle = 1e3 * m / r["rate"]
            print(f"| {r['size']:,} | {path} | {k} | {m} | {r['rate']:.3g} | "
                  f"{r['share']:.0%} | {r['apply_ms']:.2f} | "
                  f"{r['grad_ms']:.2f} | {cycle:.2f} | "
                  f"{cycle - r['grad_ms'] - r['apply_ms']:.2f} | "
                  f"{r['mb']:.1f} | {r['rate'] * r['mb']:.3g} |", flush=True)
  finally:
    print(f"load average {os.getloadavg()[0]:.1f} at the end, "
          f"{time.time() - started:.0f} s; Ray's messages in {args.ray_log}")
    ray.shutdown()


if __name__ == "__main__":
  main()
