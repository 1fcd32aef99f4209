"""How close each variant of delay compensation brings a stale gradient to
the fresh one.

Notebook 03's measure, for the early-training remedies of issue 10: an MLP
(784-64-10, ReLU) on the offline digits (mnist5k), ``--workers`` cyclic
workers (staleness ``workers - 1``), learning rate 0.1, batch 32. At every
arrival the worker's gradient ``g`` is computed at the model it holds and the
fresh gradient at the server's current model on the same batch; each variant
of ``delay_compensation`` turns ``g`` into its estimate, and the relative
error ``|estimate - fresh| / |fresh|`` is averaged over the first round to
update 100 ("early") and after update 100 ("late"). Every variant sees the
same arrivals, gradients and backups; the model itself is trained by the
variant named in ``--driver`` (plain ASGD, "stale", by default).

Run: python benchmarks/compensation_error.py [--driver stale] [--seeds 3]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dcasgd_optax
from dcasgd_optax.harness import schedules
from experiments import data

LAMBDA0 = 2.0


def variants(num_workers: int) -> dict[str, optax.GradientTransformation]:
  """The compensations compared, each holding its own backups."""
  dc_a = lambda **kw: dcasgd_optax.delay_compensation(
      num_workers, LAMBDA0, adaptive=True, **kw)
  return {
      "stale (no compensation)": dcasgd_optax.delay_compensation(
          num_workers, 0.0
      ),
      "DC-ASGD-c, lambda 0.04": dcasgd_optax.delay_compensation(
          num_workers, 0.04
      ),
      "DC-ASGD-a (paper)": dc_a(),
      "  + bias_correction": dc_a(bias_correction=True),
      "  + lambda_warmup=100": dc_a(lambda_warmup=100),
      "  + per_worker_mean_square": dc_a(per_worker_mean_square=True),
      "  + per_worker + bias_correction": dc_a(
          per_worker_mean_square=True, bias_correction=True
      ),
      "  + correction_clip=0.5": dc_a(correction_clip=0.5),
      "  + correction_clip=1": dc_a(correction_clip=1.0),
      "  + correction_clip=2": dc_a(correction_clip=2.0),
      "  + correction_clip=1, bias_correction": dc_a(
          correction_clip=1.0, bias_correction=True
      ),
      "  + correction_clip=1, per_worker": dc_a(
          correction_clip=1.0, per_worker_mean_square=True
      ),
  }


def mlp_problem():
  """The digits, an MLP initialiser and its cross-entropy loss."""
  ds = data.load("mnist5k")
  x = jnp.asarray(ds.train_images.reshape(len(ds.train_images), -1))
  y = jnp.asarray(ds.train_labels)

  def init(key, sizes=(784, 64, 10)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

  def loss_fn(params, idx):
    h = x[idx]
    for layer in params[:-1]:
      h = jax.nn.relu(h @ layer["w"] + layer["b"])
    logits = h @ params[-1]["w"] + params[-1]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, y[idx]
    ).mean()

  return init, loss_fn, len(y)


def flat(tree):
  return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


def run(seed: int, args, txs, init, loss_fn, num_examples) -> np.ndarray:
  """Relative errors, one row per arrival, one column per variant."""
  names = list(txs)
  driver = names.index(args.driver)
  grad_fn = jax.grad(loss_fn)

  @jax.jit
  def arrival(params, states, idx, worker):
    g = grad_fn(dcasgd_optax.worker_params(states[0], worker), idx)
    fresh = grad_fn(params, idx)
    outs, states = zip(
        *[
            tx.update(g, s, params, worker=worker)
            for tx, s in zip(txs.values(), states)
        ]
    )
    params = jax.tree.map(lambda p, u: p - args.lr * u, params, outs[driver])
    states = [dcasgd_optax.record_pull(s, params, worker) for s in states]
    norm = jnp.linalg.norm(flat(fresh))
    errors = jnp.stack(
        [jnp.linalg.norm(flat(u) - flat(fresh)) / norm for u in outs]
    )
    return params, states, errors

  rng = np.random.default_rng(seed)
  params = init(jax.random.key(seed + 1))
  states = [tx.init(params) for tx in txs.values()]
  rows = []
  for worker in schedules.cyclic(args.workers, args.steps):
    idx = jnp.asarray(rng.integers(0, num_examples, args.batch))
    params, states, errors = arrival(params, states, idx, int(worker))
    rows.append(np.asarray(errors))
  return np.array(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, default=16)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--driver", default="stale (no compensation)")
  args = parser.parse_args()
  txs = variants(args.workers)
  init, loss_fn, n = mlp_problem()
  runs = np.stack(
      [run(s, args, txs, init, loss_fn, n) for s in range(args.seeds)]
  )
  early = runs[:, args.workers:100].mean(axis=1)  # seeds x variants
  late = runs[:, 100:].mean(axis=1)
  print(f"model trained by: {args.driver}; {args.workers} cyclic workers, "
        f"{args.steps} updates, {args.seeds} seeds (mean, min-max over seeds)")
  print("| variant | early error | late error |\n|---|---|---|")
  for j, name in enumerate(txs):
    e, la = early[:, j], late[:, j]
    print(f"| {name.strip()} | {e.mean():.2f} ({e.min():.2f}-{e.max():.2f}) "
          f"| {la.mean():.2f} ({la.min():.2f}-{la.max():.2f}) |")


if __name__ == "__main__":
  main()
