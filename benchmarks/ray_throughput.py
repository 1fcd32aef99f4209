"""Updates per second of dcasgd_optax.ray.train against the number of workers.

On one machine (a local Ray), trains a one-hidden-layer MLP on scikit-learn's
digits (batch 64) with DC-ASGD-a, for each model size and worker count, and
reports the steady-state rate (each run's first ``2 * M`` updates, which
include process start-up and compilation, are left out), the server's share
of that time (its jitted update, the pull and the host copy of the params;
Ray's serialization is not included), and the mean time a worker spends on
one gradient.

Run: python benchmarks/ray_throughput.py [--workers 1,2,4]
  [--params 100_000,1_000_000] [--updates 600] [--tx dcasgd|sgd]
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxK, y_B).mean()

  def data_fn(worker, seq):
    idx = np.random.default_rng([worker, seq]).integers(0, len(y), _BATCH)
    return x[idx], y[idx]

  return loss_fn, data_fn, params


def measure(num_params: int, num_workers: int, num_updates: int, tx_name: str):
  """One run; returns (updates/s, server share, worker seconds/gradient)."""
  loss_fn, data_fn, params = make_problem(num_params)
  if tx_name == "dcasgd":
    tx = dcasgd_optax.dcasgd(0.05, num_workers)
  else:
    tx = optax.sgd(0.05)
  result = dray.train(loss_fn, tx, params, data_fn, num_workers, num_updates)
  rec = result.records
  skip = 2 * num_workers
  elapsed = rec.time[-1] - rec.time[skip - 1]
  rate = (num_updates - skip) / elapsed
  server_share = rec.server_time[skip:].sum() / elapsed
  return rate, server_share, rec.compute_time[skip:].mean()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", default="1,2,4")
  parser.add_argument("--params", default="100_000,1_000_000")
  parser.add_argument("--updates", type=int, default=600)
  parser.add_argument("--tx", choices=("dcasgd", "sgd"), default="dcasgd")
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(",")]
  sizes = [int(p.replace("_", "")) for p in args.params.split(",")]
  ray.init(include_dashboard=False, log_to_driver=False)
  print(f"Ray {ray.__version__}, JAX {jax.__version__}, "
        f"{os.cpu_count()} CPUs, tx={args.tx}, {args.updates} updates/run")
  print("| params | workers | updates/s | server share | worker ms/grad |")
  print("|---:|---:|---:|---:|---:|")
  try:
    for p in sizes:
      for m in workers:
        rate, share, compute = measure(p, m, args.updates, args.tx)
        print(f"| {p:,} | {m} | {rate:.0f} | {share:.0%} | "
              f"{compute * 1e3:.1f} |", flush=True)
  finally:
    ray.shutdown()


if __name__ == "__main__":
  main()
