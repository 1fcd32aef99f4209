r"""Simulated-staleness harness throughput, against its limit and a naive loop.

For an MLP on 784-dimensional inputs and a small CNN on 28x28 images (batch
32, DC-ASGD-a with momentum), side by side in one process, per gradient:

- ``replay``: ``Simulator.replay`` on a cyclic order (and a Gamma order),
  with the default strategy (on CPU ``"compiled"`` for the MLPs and
  ``"host_chunks"`` for the CNN, picked from whether the gradient
  convolves; ``"compiled"`` elsewhere); ``other strategy``: the same with
  the other one, and the first call of each (compilation included), in
  seconds.
- ``limit``: the same gradients computed synchronously (num_workers at a
  time, at one shared model; the fastest of a vmapped call, a loop, and
  unrolled calls per round) plus one server update (DC update + apply +
  pull) per arrival in another jitted scan, each timed alone;
  ``limit / replay`` is the fraction of that bound reached (target >= 0.8).
- ``floor``: the same, but each of a round's gradients at its own model (16
  workers hold 16 models: what a replay must compute); ``floor / replay``
  (target >= 0.9 where the limit is out of reach for that reason).
- ``naive``: a Python loop with one jitted gradient call and one jitted,
  donated update per arrival; ``naive / replay`` is the speed-up.
- the replay time per gradient at num_workers = 4, 16, 64 (target: flat).

Models: ``mlp`` 784-256-256-10 (270k params), ``cnn`` conv3x3/16 -> conv3x3/32
(stride 2) -> dense 10 (20k params), ``mlp32`` 784-32-32-10 (26k params, where
per-call dispatch weighs most against compute).

Each time is the best of ``--repeats`` runs after a warm-up (compilation).

``--sweep S``: ``replay_many`` of S seeds against S ``replay`` calls, its
floor (S x 16 gradients at as many models per vmapped call plus S server
updates per arrival, vmapped, each timed alone), and how far each is from
the machine's limits: the gradient's FLOPs (XLA's cost analysis) per second
against a large jitted matrix product's, and the update's bytes (9
model-sized arrays) per second against a donated ``w + g``'s over the
sweep's working set.

Run: python benchmarks/harness_throughput.py [--arrivals 256] [--repeats 3]
     python benchmarks/harness_throughput.py --sweep 8   # replay_many, 8 seeds
     XLA_FLAGS=--xla_force_host_platform_device_count=8 \
       python benchmarks/harness_throughput.py --memory  # bytes per device
     PYTHONPATH=. python benchmarks/harness_throughput.py --resnet20 2,8
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import operator
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dcasgd_optax
from dcasgd_optax.harness import Simulator
from dcasgd_optax.harness import schedules

BATCH = 32
NUM_EXAMPLES = 2048


def _xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mlp(hidden: int = 256) -> tuple[Any, Callable]:
  """A 784-hidden-hidden-10 MLP, its loss on closed-over data, the data."""
  keys = jax.random.split(jax.random.key(0), 4)
  sizes = [784, hidden, hidden, 10]
  params = [
      {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros((b,))}
      for k, a, b in zip(keys, sizes[:-1], sizes[1:])
  ]
  xs = jax.random.normal(keys[3], (NUM_EXAMPLES, 784))
  ys = jax.random.randint(keys[3], (NUM_EXAMPLES,), 0, 10)

  def loss_fn(params, idx):
    h = xs[idx]
    for layer in params[:-1]:
      h = jax.nn.relu(h @ layer["w"] + layer["b"][None])
    logits = h @ params[-1]["w"] + params[-1]["b"][None]
    return _xent(logits, ys[idx])

  return params, loss_fn


def cnn() -> tuple[Any, Callable]:
  """Two 3x3 convolutions (16, 32 channels, stride 2) and a dense layer."""
  keys = jax.random.split(jax.random.key(1), 4)
  params = {
      "c1": jax.random.normal(keys[0], (3, 3, 1, 16)) / 3.0,
      "c2": jax.random.normal(keys[1], (3, 3, 16, 32)) / 12.0,
      "d": jax.random.normal(keys[2], (7 * 7 * 32, 10)) / 40.0,
  }
  xs = jax.random.normal(keys[3], (NUM_EXAMPLES, 28, 28, 1))
  ys = jax.random.randint(keys[3], (NUM_EXAMPLES,), 0, 10)

  def conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def loss_fn(params, idx):
    h = jax.nn.relu(conv(xs[idx], params["c1"]))
    h = jax.nn.relu(conv(h, params["c2"]))
    logits = h.reshape(h.shape[0], -1) @ params["d"]
    return _xent(logits, ys[idx])

  return params, loss_fn


def make_tx(num_workers: int) -> optax.GradientTransformationExtraArgs:
  return dcasgd_optax.dcasgd(0.01, num_workers, adaptive=True, momentum=0.9)


def best_time(fn: Callable[[], Any], repeats: int) -> float:
  """Best wall time of ``fn()`` (which must block) after one warm-up call."""
  return best_and_first_time(fn, repeats)[0]


def best_and_first_time(
    fn: Callable[[], Any], repeats: int
) -> tuple[float, float]:
  """Best wall time of ``fn()`` after a warm-up call, and the warm-up's."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times), first


def time_replay(loss_fn, params, num_workers, arrivals, batches, repeats,
                strategy=None):
  """Per-gradient replay time, the plan, and the first call's time."""
  sim = Simulator(loss_fn, make_tx(num_workers), num_workers,
                  strategy=strategy)
  box = [sim.init(params)]

  def run():
    box[0], metrics = sim.replay(box[0], batches, arrivals)
    jax.block_until_ready((box[0], metrics))

  best, first = best_and_first_time(run, repeats)
  return best / len(arrivals), sim.describe(arrivals, params, batches), first


def time_round_gradients(loss_fn, params, num_workers, batches, repeats, *,
                         own_models):
  """``num_workers`` gradients at a time, at one model or at one each.

  ``own_models=False``: all at one shared model (the limit's synchronous
  gradients); ``True``: each at its own model (the floor: what an
  asynchronous replay must compute, 16 workers holding 16 models). The best
  of: a jitted scan over rounds computing a round's gradients in one vmapped
  call or in a loop (``lax.map``); and one jitted call per round from
  Python, its gradients unrolled (no loop: on XLA:CPU a convolution's
  gradient inside a loop is much slower; see harness_throughput.md). So each
  is the fastest way we know.
  """
  rounds = batches.reshape(-1, num_workers, *batches.shape[1:])
  grad_fn = jax.grad(loss_fn)
  # The models: the same one, or num_workers slightly different ones.
  models = jax.tree.map(
      lambda p: p[None] * (1.0 + 0.01 * jnp.arange(num_workers).reshape(
          -1, *[1] * p.ndim)), params)
  in_axes = 0 if own_models else None
  best = float("inf")
  for batched in (True, False):

    def round_grads(models, batch_W, batched=batched):
      if batched:
        return jax.vmap(grad_fn, in_axes=(in_axes, 0))(
            models if own_models else params, batch_W)
      if own_models:
        return jax.lax.map(lambda a: grad_fn(*a), (models, batch_W))
      return jax.lax.map(lambda b: grad_fn(params, b), batch_W)

    @jax.jit
    def run(models, rounds, round_grads=round_grads):
      # The carry is the round's gradients, so none can be skipped; summing
      # them instead would cost more than computing them on XLA:CPU.
      def body(grads_W, batch_W):
        del grads_W
        return round_grads(models, batch_W), None

      shapes = jax.eval_shape(round_grads, models, rounds[0])
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      return jax.lax.scan(body, zeros, rounds)[0]

    fn = lambda run=run: jax.block_until_ready(run(models, rounds))
    best = min(best, best_time(fn, repeats))

  unrolled = jax.jit(
      lambda models, batch_W: [
          grad_fn(
              jax.tree.map(operator.itemgetter(i), models)
              if own_models
              else params,
              batch_W[i],
          )
          for i in range(num_workers)
      ]
  )
  round_list = list(rounds)

  def host_rounds():
    jax.block_until_ready([unrolled(models, b) for b in round_list])

  best = min(best, best_time(host_rounds, repeats))
  return best / batches.shape[0]


def time_updates(params, num_workers, num_arrivals, repeats):
  """A jitted, donated scan of server updates (DC + apply + pull) alone."""
  tx = make_tx(num_workers)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  workers = jnp.arange(num_arrivals, dtype=jnp.int32) % num_workers

  def run(params, state):
    def body(carry, m):
      params, state = carry
      updates, state = tx.update(grads, state, params, worker=m)
      return (optax.apply_updates(params, updates), state), None  # pulled

    return jax.lax.scan(body, (params, state), workers)[0]

  run = jax.jit(run, donate_argnums=(0, 1))
  box = [(jax.tree.map(jnp.copy, params), tx.init(params))]

  def fn():
    box[0] = jax.block_until_ready(run(*box[0]))

  return best_time(fn, repeats) / num_arrivals


def time_updates_many(params, num_workers, num_sims, num_arrivals, repeats):
  """:func:`time_updates` vmapped over ``num_sims`` simulations (one shared
  worker order, as replay_many's shared arrivals): seconds per simulation
  and arrival."""
  tx = make_tx(num_workers)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  workers = jnp.arange(num_arrivals, dtype=jnp.int32) % num_workers

  def step(params, state, m):
    updates, state = tx.update(grads, state, params, worker=m)
    return optax.apply_updates(params, updates), state

  def run(params_N, state_N):
    def body(carry, m):
      return jax.vmap(step, in_axes=(0, 0, None))(*carry, m), None

    return jax.lax.scan(body, (params_N, state_N), workers)[0]

  run = jax.jit(run, donate_argnums=(0, 1))
  params_N = jax.tree.map(
      lambda p: jnp.broadcast_to(p, (num_sims, *p.shape)) + 0, params)
  box = [(params_N, jax.vmap(tx.init)(params_N))]

  def fn():
    box[0] = jax.block_until_ready(run(*box[0]))

  return best_time(fn, repeats) / (num_sims * num_arrivals)


def time_gradients_batched(loss_fn, params, num_models, batches, repeats):
  """Seconds per gradient of ``num_models`` gradients at as many models in
  one vmapped call (a jitted scan over groups): what a chunk of
  ``replay_many`` computes at once (S simulations x 16 slots)."""
  groups = batches.reshape(-1, num_models, *batches.shape[1:])
  grad_fn = jax.grad(loss_fn)
  models = jax.tree.map(
      lambda p: p[None] * (1.0 + 0.01 * jnp.arange(num_models).reshape(
          -1, *[1] * p.ndim)), params)

  @jax.jit
  def run(models, groups):
    def body(grads, batch_G):
      del grads
      return jax.vmap(grad_fn)(models, batch_G), None

    zeros = jax.tree.map(jnp.zeros_like, models)
    return jax.lax.scan(body, zeros, groups)[0]

  fn = lambda: jax.block_until_ready(run(models, groups))
  return best_time(fn, repeats) / batches.shape[0]


def gradient_flops(loss_fn, params, batch) -> float:
  """FLOPs of one gradient of ``loss_fn`` on ``batch`` (XLA's cost
  analysis of the compiled gradient)."""
  compiled = jax.jit(jax.grad(loss_fn)).lower(params, batch).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one per module
    analysis = analysis[0]
  return float(analysis["flops"])


def matmul_peak(repeats: int, size: int = 2048) -> float:
  """GFLOP/s of a jitted float32 ``size x size`` matrix product (all cores):
  the most this CPU computes per second in the operation gradients are made
  of."""
  a, b = (jax.random.normal(k, (size, size), jnp.float32)
          for k in jax.random.split(jax.random.key(2)))
  matmul = jax.jit(jnp.matmul)
  seconds = best_time(lambda: jax.block_until_ready(matmul(a, b)), repeats)
  return 2 * size**3 / seconds / 1e9


def add_bandwidth(num_floats: int, repeats: int) -> float:
  """GB/s of a jitted, donated ``w + g`` over ``num_floats`` float32s (3
  arrays of that size moved): the copy bandwidth for that working set."""
  add = jax.jit(jnp.add, donate_argnums=0)
  g = jnp.full((num_floats,), 1e-3, jnp.float32)
  box = [jnp.zeros((num_floats,), jnp.float32)]

  def fn():
    box[0] = jax.block_until_ready(add(box[0], g))

  return 3 * 4 * num_floats / best_time(fn, repeats) / 1e9


def time_naive(loss_fn, params, num_workers, arrivals, batches, repeats):
  """One jitted gradient and one jitted, donated update per arrival."""
  tx = make_tx(num_workers)

  @jax.jit
  def grad(state, m, batch):
    return jax.grad(loss_fn)(dcasgd_optax.worker_params(state, m), batch)

  def update(params, state, grads, m):
    updates, state = tx.update(grads, state, params, worker=m)  # and pull
    return optax.apply_updates(params, updates), state

  update = jax.jit(update, donate_argnums=(0, 1))
  box = [(jax.tree.map(jnp.copy, params), tx.init(params))]
  workers = [jnp.int32(m) for m in arrivals.tolist()]
  rows = list(batches)

  def fn():
    params, state = box[0]
    for m, batch in zip(workers, rows):
      params, state = update(params, state, grad(state, m, batch), m)
    box[0] = jax.block_until_ready((params, state))

  return best_time(fn, repeats) / len(arrivals)


def compare(name, loss_fn, params, num_workers, num_arrivals, repeats):
  """One row: replay vs its limit, its floor and the naive loop (µs)."""
  arrivals = schedules.cyclic(num_workers, num_arrivals)
  batches = jnp.asarray(np.random.default_rng(0).integers(
      0, NUM_EXAMPLES, (num_arrivals, BATCH)))
  replay, plan, first = time_replay(loss_fn, params, num_workers, arrivals,
                                    batches, repeats)
  other = "compiled" if plan["strategy"] != "compiled" else "host_chunks"
  other_replay, _, other_first = time_replay(
      loss_fn, params, num_workers, arrivals, batches, repeats, other)
  grads = time_round_gradients(loss_fn, params, num_workers, batches, repeats,
                               own_models=False)
  own = time_round_gradients(loss_fn, params, num_workers, batches, repeats,
                             own_models=True)
  updates = time_updates(params, num_workers, num_arrivals, repeats)
  naive = time_naive(loss_fn, params, num_workers, arrivals, batches, repeats)
  limit, floor = grads + updates, own + updates
  print(f"| {name} | {num_workers} | {plan['strategy']} | "
        f"{replay * 1e6:.0f} | {grads * 1e6:.0f} | {own * 1e6:.0f} | "
        f"{updates * 1e6:.0f} | {limit / replay:.2f} | {floor / replay:.2f} | "
        f"{naive * 1e6:.0f} | {naive / replay:.1f}x | "
        f"{other_replay * 1e6:.0f} ({other}) | "
        f"{first:.1f} / {other_first:.1f} |", flush=True)


def scaling(name, loss_fn, params, num_arrivals, repeats):
  """Replay time per gradient at 4, 16, 64 workers, cyclic and Gamma orders."""
  batches = jnp.asarray(np.random.default_rng(0).integers(
      0, NUM_EXAMPLES, (num_arrivals, BATCH)))
  base = None
  for num_workers in (4, 16, 64):
    row = []
    for arrivals in (
        schedules.cyclic(num_workers, num_arrivals),
        schedules.gamma_speeds(num_workers, num_arrivals, seed=0, shape=4.0),
    ):
      t, plan, _ = time_replay(loss_fn, params, num_workers, arrivals,
                               batches, repeats)
      row += [t, plan["fill_ratio"]]
    base = base or row[0]
    print(f"| {name} | {num_workers} | {row[0] * 1e6:.0f} | "
          f"{row[0] / base:.2f} | {row[2] * 1e6:.0f} | {row[3]:.2f} |",
          flush=True)


def sweep(name, loss_fn, params, num_sims, num_workers, num_arrivals,
          repeats, limits, peak):
  """``num_sims`` seeds: one ``replay_many`` against as many ``replay``s;
  appends to ``limits`` this model's row of the table of machine limits
  (``peak``: the matrix-product GFLOP/s)."""
  arrivals = schedules.cyclic(num_workers, num_arrivals)
  batches = jnp.asarray(np.random.default_rng(0).integers(
      0, NUM_EXAMPLES, (num_sims, num_arrivals, BATCH)))
  params_N = jax.tree.map(
      lambda p: p[None] * (1.0 + 0.01 * jnp.arange(num_sims).reshape(
          -1, *[1] * p.ndim)), params)
  sim = Simulator(loss_fn, make_tx(num_workers))
  box = [[sim.init(jax.tree.map(lambda x, i=i: x[i], params_N))
          for i in range(num_sims)], sim.init_many(params_N)]

  def one_by_one():
    out = [sim.replay(state, batches[i], arrivals)
           for i, state in enumerate(box[0])]
    box[0] = [state for state, _ in out]
    jax.block_until_ready(out)

  def together():
    box[1], record = sim.replay_many(box[1], batches, arrivals)
    jax.block_until_ready((box[1], record))

  separate, first_separate = best_and_first_time(one_by_one, repeats)
  many, first_many = best_and_first_time(together, repeats)
  per = num_sims * num_arrivals
  separate, many = separate / per, many / per
  # What replay_many must do at least: S x 16 gradients at as many models
  # per chunk, and S server updates per arrival, each timed alone.
  grads_many = time_gradients_batched(
      loss_fn, params, num_sims * num_workers,
      batches.reshape(-1, BATCH), repeats)
  updates_many = time_updates_many(params, num_workers, num_sims,
                                   num_arrivals, repeats)
  floor = grads_many + updates_many
  print(f"| {name} | {num_sims} | {num_workers} | {separate * 1e6:.0f} "
        f"| {many * 1e6:.0f} | {separate / many:.2f}x | "
        f"{grads_many * 1e6:.0f} + {updates_many * 1e6:.0f} = "
        f"{floor * 1e6:.0f} | {floor / many:.2f} | {separate / floor:.2f}x | "
        f"{first_separate:.1f} / {first_many:.1f} |", flush=True)
  limits.append(machine_row(name, loss_fn, params, batches[0], num_sims,
                            num_workers, num_arrivals, repeats,
                            dict(replay=separate, many=many,
                                 grads_many=grads_many,
                                 updates_many=updates_many, peak=peak)))


def machine_row(name, loss_fn, params, batches, num_sims, num_workers,
                num_arrivals, repeats, times) -> str:
  """One model's row of the limits table: achieved GFLOP/s and GB/s
  against the CPU's measured matrix-product peak and copy bandwidth."""
  flops = gradient_flops(loss_fn, params, batches[0])
  grads_one = time_round_gradients(loss_fn, params, num_workers, batches,
                                   repeats, own_models=True)
  updates_one = time_updates(params, num_workers, num_arrivals, repeats)
  model_floats = sum(x.size for x in jax.tree.leaves(params))
  moved = 9 * 4 * model_floats  # g, w, row, ms, trace in; w, ms, trace, row out
  # The sweep's server state: per simulation, params, mean square, momentum
  # and num_workers backups.
  working_set = num_sims * (3 + num_workers) * model_floats
  bandwidth = add_bandwidth(working_set, repeats)
  gflops = lambda t: flops / t / 1e9
  gbs = lambda t: moved / t / 1e9
  bound = flops / (times["peak"] * 1e9) + moved / (bandwidth * 1e9)
  return (
      f"| {name} | {flops / 1e6:.2f} | {gflops(grads_one):.0f} / "
      f"{gflops(times['grads_many']):.0f} | {gflops(times['replay']):.0f} / "
      f"{gflops(times['many']):.0f} | {times['peak']:.0f} | "
      f"{moved / 1e6:.2f} | {gbs(updates_one):.1f} / "
      f"{gbs(times['updates_many']):.1f} | {bandwidth:.1f} | "
      f"{bound * 1e6:.0f} | {times['replay'] / bound:.1f}x |")


def memory(num_params: int = 1 << 20) -> None:
  """Per-device bytes of a replay step on 1..D devices, from XLA's memory
  analysis (run with XLA_FLAGS=--xla_force_host_platform_device_count=8)."""
  params = {"w": jnp.zeros((num_params,))}
  xs = jax.random.normal(jax.random.key(0), (64, num_params // 1024))

  def loss_fn(p, idx):
    return jnp.mean((xs[idx] @ p["w"].reshape(-1, 1024)) ** 2)

  mib = lambda n: n / 2**20
  print(f"model: {num_params} float32 params ({mib(4 * num_params):.0f} MiB);"
        " DC-ASGD-a with momentum; MiB per device\n")
  print(
      "| tx | workers | devices | strategy | backups (shard) | XLA arguments "
      "| XLA temp | XLA output (aliased) |\n|---|---|---|---|---|---|---|---|"
  )
  composed = lambda m: dcasgd_optax.pull_after_push(optax.chain(
      dcasgd_optax.delay_compensation(m, 2.0, adaptive=True),
      optax.sgd(0.01, momentum=0.9)))
  for name, build, strategy, num_workers in (
      [("dcasgd", make_tx, s, m) for m in (16, 64, 6)
       for s in ("host_chunks", "compiled")]
      + [("composed", composed, "host_chunks", m) for m in (16, 64)]):
    for num_devices in sorted({1, 2, 4, len(jax.devices())}):
      sim = Simulator(loss_fn, build(num_workers),
                      devices=jax.devices()[:num_devices],
                      strategy=strategy)
      state = sim.init(params)
      arrivals = schedules.cyclic(num_workers, 2 * num_workers)
      batches = np.random.default_rng(0).integers(0, 64, (len(arrivals), 8))
      analysis = sim.lower(state, batches, arrivals).compile(
          ).memory_analysis()
      shard = [x for x in jax.tree.leaves(state.opt_state)
               if x.ndim == 2][0].addressable_shards[0].data.nbytes
      print(f"| {name} | {num_workers} | {num_devices} | {strategy} | "
            f"{mib(shard):.1f} | {mib(analysis.argument_size_in_bytes):.1f} "
            f"| {mib(analysis.temp_size_in_bytes):.1f} | "
            f"{mib(analysis.output_size_in_bytes):.1f} "
            f"({mib(analysis.alias_size_in_bytes):.1f}) |", flush=True)


def resnet20_compile(workers: list[int], batch: int = 128) -> None:
  """ResNet-20 (experiments/models.py) replays: first call and later ones."""
  # Imported here: the experiments' dependencies are optional for the rest.
  from experiments import models

  model = models.create("resnet20", image_shape=(28, 28, 1), num_classes=10,
                        seed=0)
  apply, params, model_state = models.functional(model)
  xs = jax.random.normal(jax.random.key(0), (1024, 28, 28, 1))
  ys = jax.random.randint(jax.random.key(1), (1024,), 0, 10)

  def loss_fn(params, model_state, idx):
    logits, model_state = apply(params, model_state, xs[idx], train=True)
    return _xent(logits, ys[idx]), model_state

  print("\n| workers | strategy | chunk | first replay, s | later, s per "
        "gradient |\n|---|---|---|---|---|")
  for num_workers in workers:
    sim = Simulator(loss_fn, make_tx(num_workers), num_workers,
                    has_model_state=True)
    box = [sim.init(params, model_state)]
    arrivals = schedules.cyclic(num_workers, 2 * num_workers)
    batches = jnp.asarray(np.random.default_rng(0).integers(
        0, 1024, (len(arrivals), batch)))

    def run(sim=sim, box=box, arrivals=arrivals, batches=batches):
      box[0], metrics = sim.replay(box[0], batches, arrivals)
      jax.block_until_ready((box[0], metrics))

    best, first = best_and_first_time(run, 1)
    plan = sim.describe(arrivals, params, batches, model_state)
    print(f"| {num_workers} | {plan['strategy']} | {plan['chunk']} | "
          f"{first:.1f} | {best / len(arrivals):.2f} |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arrivals", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--models", default="mlp,cnn,mlp32")
  parser.add_argument("--memory", action="store_true",
                      help="per-device bytes on 1..D (fake) devices instead "
                      "of the tables")
  parser.add_argument("--sweep", type=int, default=0,
                      help="S: time S seeds with replay_many against S "
                      "replays instead of the tables")
  parser.add_argument("--no-scaling", action="store_true",
                      help="skip the 4/16/64-worker table")
  parser.add_argument("--resnet20", default="",
                      help="worker counts, e.g. 2,8: time ResNet-20 replays "
                      "(compilation included) instead of the tables")
  args = parser.parse_args()
  if args.resnet20:
    resnet20_compile([int(w) for w in args.resnet20.split(",")])
    return
  if args.memory:
    memory()
    return
  models = {"mlp": mlp(), "cnn": cnn(), "mlp32": mlp(hidden=32)}
  models = {k: models[k] for k in args.models.split(",")}
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} x "
        f"{len(jax.devices())}, {args.arrivals} arrivals, batch {BATCH}; "
        "times in microseconds per gradient\n")
  if args.sweep:
    peak = matmul_peak(args.repeats)
    print("| model | simulations | workers | S replays | replay_many | "
          "speed-up | floor of replay_many: grads + updates | floor / "
          "replay_many | most speed-up (S replays / floor) | first call, s "
          "(replays / many) |\n|---|---|---|---|---|---|---|---|---|---|",
          flush=True)
    limits = []
    for name, (params, loss_fn) in models.items():
      sweep(name, loss_fn, params, args.sweep, 16, args.arrivals,
            args.repeats, limits, peak)
    print(f"\nmatrix-product peak {peak:.0f} GFLOP/s (f32 2048^3, jitted)\n")
    print("| model | gradient MFLOP | GFLOP/s of gradients alone (16 / "
          f"{args.sweep}x16 per call) | GFLOP/s in replay / replay_many | "
          "matmul peak | update MB moved (9 arrays) | GB/s of updates alone "
          f"(1 / {args.sweep} simulations) | copy GB/s (sweep's working set) "
          "| bound µs/gradient (peak + bandwidth) | most speed-up over a "
          "replay |\n|---|---|---|---|---|---|---|---|---|---|")
    for row in limits:
      print(row, flush=True)
    return
  print("| model | workers | strategy | replay | sync grads | own-model "
        "grads | updates | limit/replay | floor/replay | naive | naive/replay "
        "| other strategy | first call, s (this / other) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name, (params, loss_fn) in models.items():
    compare(name, loss_fn, params, 16, args.arrivals, args.repeats)
  if args.no_scaling:
    return
  print("\n| model | workers | replay, cyclic | vs 4 workers | replay, Gamma "
        "(shape 4) | Gamma fill ratio |")
  print("|---|---|---|---|---|---|")
  for name, (params, loss_fn) in models.items():
    scaling(name, loss_fn, params, args.arrivals, args.repeats)


if __name__ == "__main__":
  main()
