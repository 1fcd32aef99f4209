"""Cost of one DC-ASGD-a update against plain SGD with momentum, in one process.

Measures, on a 25M-parameter tree, a jitted and donated step (update + apply)
of ``dcasgd(..., adaptive=True, momentum=0.9)`` against ``optax.sgd(momentum=0.9)``,
and the same DC-ASGD step at 1 vs 64 workers, with float32 and bfloat16
backups. Prints ratios beside the memory-traffic bound: DC-ASGD-a with
momentum reads 5 model-sized arrays (g, w, backup[m], ms, momentum) and writes
4 (w, backup[m], ms, momentum); SGD with momentum reads 3 and writes 2, so a
bandwidth-bound step costs 9/5 = 1.8x.

Run: python benchmarks/update_cost.py [--params 25_000_000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dcasgd_optax

_TRAFFIC_BOUND = 9 / 5


def make_params(num_params: int) -> dict[str, jax.Array]:
  """Two matrices and a vector totalling about ``num_params`` float32s."""
  side = int(np.sqrt(num_params * 2 / 3))
  shapes = {"w1": (side, side), "w2": (side // 2, side), "b": (1024,)}
  keys = jax.random.split(jax.random.key(0), len(shapes))
  return {
      k: jax.random.normal(key, s, jnp.float32)
      for key, (k, s) in zip(keys, shapes.items())
  }


def make_step(tx):
  """A jitted step that donates params and state (closes over tx)."""

  def step(params, state, grads, worker):
    updates, state = tx.update(grads, state, params, worker=worker)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


class Runner:
  """Holds one optimizer's live buffers and times steps on them."""

  def __init__(self, tx, params, grads, num_workers):
    self.step = make_step(optax.with_extra_args_support(tx))
    self.params = jax.tree.map(jnp.copy, params)
    self.state = tx.init(self.params)
    self.grads = grads
    self.num_workers = num_workers
    self.k = 0
    self.run(2)  # compile and warm up

  def run(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      worker = self.k % self.num_workers
      self.params, self.state = self.step(
          self.params, self.state, self.grads, worker
      )
      self.k += 1
    jax.block_until_ready((self.params, self.state))
    return (time.perf_counter() - start) / n

  def state_bytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self.state))

  def close(self):
    del self.params, self.state


def time_interleaved(runners: dict[str, Runner], repeats: int, steps: int):
  """Median seconds per step, alternating runners to share machine noise."""
  samples = {name: [] for name in runners}
  for _ in range(repeats):
    for name, r in runners.items():
      samples[name].append(r.run(steps))
  return {name: statistics.median(s) for name, s in samples.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=int, default=25_000_000)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()

  params = make_params(args.params)
  n = sum(x.size for x in jax.tree.leaves(params))
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  print(f"device: {jax.devices()[0].device_kind}, params: {n / 1e6:.1f}M, "
        f"jax {jax.__version__}, optax {optax.__version__}")

  def dc(workers, backup_dtype=None):
    tx = dcasgd_optax.dcasgd(
        0.01, workers, momentum=0.9, backup_dtype=backup_dtype
    )
    return Runner(tx, params, grads, workers)

  configs = {
      "sgd(momentum=0.9)": lambda: Runner(
          optax.sgd(0.01, momentum=0.9), params, grads, 1
      ),
      "dcasgd-a, 1 worker": lambda: dc(1),
      "dcasgd-a, 64 workers": lambda: dc(64),
      "dcasgd-a, 64 workers, bf16 backups": lambda: dc(64, jnp.bfloat16),
  }
  runners = {name: make() for name, make in configs.items()}
  times = time_interleaved(runners, args.repeats, args.steps)
  base = times["sgd(momentum=0.9)"]
  print("\n| optimizer | ms/step | vs sgd+momentum | state MiB |")
  print("|---|---|---|---|")
  for name, t in times.items():
    mib = runners[name].state_bytes() / 2**20
    print(f"| {name} | {t * 1e3:.1f} | {t / base:.2f}x | {mib:,.0f} |")
  print(
      f"\nmemory-traffic bound for DC-ASGD-a+momentum vs SGD+momentum: "
      f"{_TRAFFIC_BOUND:.1f}x (target <= 2.0x)"
  )
  print(
      "growth with workers (64 vs 1): "
      f"{times['dcasgd-a, 64 workers'] / times['dcasgd-a, 1 worker']:.2f}x "
      "(target: no growth, 1.0x)"
  )
  if jax.default_backend() == "cpu":
    print(
        "note: XLA:CPU upcasts a bfloat16 dynamic-update-slice to float32, so "
        "on CPU bf16 backups convert the whole backup array every step; they "
        "save memory, not time (GPU/TPU have native bf16; not measured here)."
    )


if __name__ == "__main__":
  main()
