"""Where one worker's cycle goes on the direct path: timestamps in the actors.

Runs ``dcasgd_optax.ray.train`` with one worker and one shard (the MLP of
``ray_throughput.py``, DC-ASGD-a) with the worker and the shard classes
wrapped so that each records ``time.time()`` (one clock for every process on
one machine) around each part of a cycle:

* worker: ``data_fn``, the jitted gradient and its host copy (``_compute``);
  writing the gradient into the shared-memory channel (``--path shared``,
  train's default on one node) or packing it into ``bytes`` chunks
  (``--path calls``); submitting the call (``.remote``, which serializes
  the arguments);
* Ray: from the submitted call to the shard's ``push_shared`` (or ``push``)
  starting;
* shard: that method (reading the message, checks, the jitted apply and
  pull, the host copy, writing or packing the reply), and the busy time it
  records;
* Ray (or, through the channel, its doorbell): from the shard's method
  returning to the worker's ``ray.get`` (or its wait on the doorbell)
  returning;
* worker: reading the reply, and the step to the next gradient.

It prints the median of each over the run's cycles (the first 100 left
out), and the empty-call and 400 kB echo round trips of a plain actor on the
same Ray (the floor that Ray's per-call cost sets).

Run: python benchmarks/ray_cycle.py [--params 100_000] [--updates 1500]
  [--path shared|calls]
Results: benchmarks/ray_throughput.md ("Where one cycle goes, channel against
  calls").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import ray

import dcasgd_optax
import dcasgd_optax.ray as dray
from dcasgd_optax.ray import _server
from dcasgd_optax.ray import _train
from dcasgd_optax.ray import _wire
from dcasgd_optax.ray import _worker

import ray_throughput
from ray_throughput import Echo
from ray_throughput import _best_ms
from ray_throughput import _divert_native_stderr
from ray_throughput import make_problem

_SKIP = 100


class TimedWorker(_worker.GradientWorker):
  """``GradientWorker`` with one shard, recording each cycle's timestamps."""

  out_path = ""
  count = 0

  def _compute(self, seq):
    self._stamps = [time.time()]
    out = super()._compute(seq)
    self._stamps.append(time.time())
    return out

  def _push(self, meta, pieces, epoch, to):
    head = (self._worker, meta.seq, epoch, meta.finite,
            (meta.loss, meta.seconds))
    channel = self._channels[0] if self._channels else None
    if channel is not None:
      channel.grads.write(pieces[0])
      self._stamps.append(time.time())
      ref = self._shards[0].push_shared.remote(head)
      self._stamps.append(time.time())
      _, ticket = self._wait_bell(channel, ref)
      self._stamps.append(time.time())
      self._held[0] = list(channel.params.pieces)
    else:
      parts = _wire.pack(pieces[0], self._specs[0])
      self._stamps.append(time.time())
      refs = self._pushes[0].remote(head, *parts)
      self._stamps.append(time.time())
      (_, ticket), *reply = ray.get(list(refs))
      self._stamps.append(time.time())
      self._held[0] = _wire.unpack(reply, self._specs[0])
    self._ticket, self._seq = ticket, meta.seq + 1
    self._stamps.append(time.time())
    _record(self, self._stamps)


class TimedServer(_server.ParameterServer):
  """``ParameterServer`` recording when each push starts and returns."""

  out_path = ""
  count = 0

  def push(self, head, *parts):
    start = time.time()
    reply = super().push(head, *parts)
    _record(self, [start, time.time()])
    return reply

  def push_shared(self, head):
    start = time.time()
    reply = super().push_shared(head)
    _record(self, [start, time.time()])
    return reply


def _record(actor, stamps) -> None:
  rows = actor.__dict__.setdefault("_stamp_rows", [])
  rows.append(list(stamps))
  if len(rows) == actor.count:
    with open(actor.out_path, "w", encoding="utf-8") as f:
      json.dump(rows, f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", default="100_000")
  parser.add_argument("--updates", type=int, default=1500)
  parser.add_argument("--path", choices=("shared", "calls"), default="shared",
                      help="pieces through shared memory (train's default "
                      "on one node) or in the actor calls")
  parser.add_argument("--ray-log", default=os.path.join(
      tempfile.gettempdir(), "ray_cycle_stderr.log"))
  args = parser.parse_args()
  num_params = int(args.params.replace("_", ""))
  out = tempfile.mkdtemp()
  TimedWorker.out_path = os.path.join(out, "worker.json")
  TimedServer.out_path = os.path.join(out, "server.json")
  TimedWorker.count = TimedServer.count = args.updates
  _train.GradientWorker, _train.ParameterServer = TimedWorker, TimedServer
  _divert_native_stderr(args.ray_log)
  # Ray's workers cannot import the benchmarks: send their code by value.
  ray.cloudpickle.register_pickle_by_value(ray_throughput)
  ray.init(address="local", include_dashboard=False, log_to_driver=False)
  print(f"Ray {ray.__version__}, path {args.path}, load average "
        f"{os.getloadavg()[0]:.1f} at the start")
  try:
    loss_fn, data_fn, params = make_problem(num_params)
    result = dray.train(loss_fn, dcasgd_optax.dcasgd(0.01, 1), params,
                        data_fn, 1, args.updates + 1,
                        shared_memory=args.path == "shared")
    time.sleep(0.5)
    echo = ray.remote(Echo).remote()
    flat = np.ones(sum(np.size(x) for x in params.values()), np.float32)
    chunks = _wire.pack([flat], [(flat.shape, flat.dtype)])
    call = echo.echo_all.options(num_returns=len(chunks))
    empty_ms = _best_ms(lambda: ray.get(echo.echo.remote(None)), 50)
    bytes_ms = _best_ms(lambda: ray.get(list(call.remote(*chunks))), 50)
  finally:
    load = os.getloadavg()[0]
    ray.shutdown()
  _report(out, result, empty_ms, bytes_ms, load)


def _report(out, result, empty_ms, bytes_ms, load) -> None:
  with open(os.path.join(out, "worker.json"), encoding="utf-8") as f:
    w = np.array(json.load(f))[_SKIP:]
  with open(os.path.join(out, "server.json"), encoding="utf-8") as f:
    s = np.array(json.load(f))[_SKIP:]
  busy = result.shard_records[0]["server_time"][_SKIP + 1:len(w) + _SKIP]
  c0, c1, p0, p1, p2, p3 = w.T  # Compute, packed, submitted, got, read.
  s0, s1 = s.T
  ms = lambda x: 1e3 * np.median(x)
  cycle = ms(np.diff(c0))
  rows = [
      ("worker: data_fn, jitted gradient, host copy", ms(c1 - c0)),
      ("worker: write the gradient (channel) or pack it (chunks)",
       ms(p0 - c1)),
      ("worker: submit the call (.remote)", ms(p1 - p0)),
      ("Ray: call submitted -> shard's push starts", ms(s0 - p1)),
      ("shard: push (read, check, jitted apply and pull, write/pack)",
       ms(s1 - s0)),
      ("shard's push returns -> the worker has the reply (bell / ray.get)",
       ms(p2 - s1)),
      ("worker: read the reply", ms(p3 - p2)),
      ("worker: to the next gradient", ms(c0[1:] - p3[:-1])),
  ]
  print(f"| part of one cycle (median of {len(w) - 1}) | ms |")
  print("|---|---:|")
  for name, value in rows:
    print(f"| {name} | {value:.3f} |")
  print(f"| sum of the parts | {sum(v for _, v in rows):.3f} |")
  print(f"| the cycle (median) | {cycle:.3f} ({1e3 / cycle:.0f} updates/s) |")
  print(f"| (the shard's recorded busy time) | {ms(busy):.3f} |")
  print(f"| Ray: empty call round trip (best of 50) | {empty_ms:.3f} |")
  print(f"| Ray: 400 kB echo as bytes chunks (best of 50) | {bytes_ms:.3f} |")
  print(f"load average {load:.1f} at the end")


if __name__ == "__main__":
  main()
