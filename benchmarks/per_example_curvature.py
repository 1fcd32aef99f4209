"""What the workers' per-example curvature costs (``push_grad_sq=True``).

Usage::

  python benchmarks/per_example_curvature.py [--repeats 200]

Times, in one process and alternated, on the demo's MLP (784-128-10, batch
32, float32): the worker's plain gradient (``jax.grad``), and the mean of
its per-example squared gradients taken the two ways the harness knows
(``_per_example._by_scan``: one example after another, the CPU default;
``_per_example._by_vmap``: all at once, the default elsewhere), each jitted
alone. Prints the medians, the ratio of each to the gradient and the
bandwidth the curvature's outputs reach (parameters read + written, a lower
bound of the traffic). Results: benchmarks/per_example_curvature.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from dcasgd_optax._src import _per_example


def _mlp():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {
      "w1": jax.random.normal(k1, (784, 128)) * 0.05,
      "b1": jnp.zeros(128),
      "w2": jax.random.normal(k2, (128, 10)) * 0.1,
      "b2": jnp.zeros(10),
  }

  def loss(p, batch):
    x, y = batch
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    return -jnp.mean(
        jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)
    )

  batch = (jax.random.uniform(k3, (32, 784)), jnp.arange(32) % 10)
  return loss, params, batch


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=200)
  args = parser.parse_args()
  loss, params, batch = _mlp()
  fns = {
      "jax.grad (the gradient)": jax.jit(jax.grad(loss)),
      "mean square, scan": jax.jit(
          lambda p, b: _per_example._by_scan(loss, p, b)
      ),
      "mean square, vmap": jax.jit(
          lambda p, b: _per_example._by_vmap(loss, p, b)
      ),
  }
  for fn in fns.values():
    jax.block_until_ready(fn(params, batch))
  times = {name: [] for name in fns}
  for _ in range(args.repeats):  # alternated: each sees the same machine
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(params, batch))
      times[name].append(time.perf_counter() - t)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
  base = statistics.median(times["jax.grad (the gradient)"])
  print(
      f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, "
      f"{args.repeats} alternated repeats"
  )
  print(
      "| computation | median (ms) | x the gradient "
      "| GB/s (params in + out) |"
  )
  print("|---|---|---|---|")
  for name, ts in times.items():
    med = statistics.median(ts)
    print(
        f"| {name} | {1e3 * med:.3f} | {med / base:.1f} | "
        f"{2 * nbytes / med / 1e9:.2f} |"
    )


if __name__ == "__main__":
  main()
