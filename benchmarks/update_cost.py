"""Cost of one DC-ASGD-a update against SGD with momentum, in one process.

A jitted step (update + apply, params and state donated) on a tree of about
25M float32 parameters, for ``optax.sgd(momentum=0.9)`` (the baseline) and
``dcasgd(..., momentum=0.9)`` (DC-ASGD-a, worker id traced) at 1 and 64
workers, with float32 and bfloat16 backups, by its CPU kernel (the default
on CPU) and by XLA's blocked loop (its fallback, ``DCASGD_OPTAX_CPU_KERNEL=0``),
and the same optimizer composed as a chain
(``pull_after_push(chain(delay_compensation, sgd))``, what ``dcasgd`` was
before its update was fused).

Each configuration is timed in its own phase, interleaved with the baseline
(so both see the same machine), and only that phase's buffers are alive. The
baseline is first timed alone; the script exits with status 1 if its timing
inside any phase drifts from that by more than the noise (``--tolerance``,
or twice the spread of the standalone samples if larger): the interleaved
figures would then not be what a user gets.

Besides ms/step and the ratio to the baseline it prints the achieved
bandwidth: the bytes a step must move at least (the baseline reads g, w,
momentum and writes w, momentum: 5 model-sized arrays; DC-ASGD-a with
momentum also reads and writes the worker's backup row and the mean
square: 9, so a bandwidth-bound step costs 9/5 = 1.8x) over its time, next
to the copy bandwidth measured here (a jitted, donated ``w + g``: 3 arrays;
and the same add as the fused update's loop over 8Ki-element blocks, which
XLA:CPU runs on one thread), the CPU time per step (all threads) against
the baseline's, and the peak memory of the compiled step from XLA's memory
analysis.

With ``--crossover`` it instead times one parameter of 1Ki to 4Mi elements
both ways (the CPU kernel, and XLA's path below it), which sets the kernel's
``MIN_SIZE``.

Run: python benchmarks/update_cost.py [--params 25_000_000] [--repeats 9]
     python benchmarks/update_cost.py --crossover
Results and the machine: benchmarks/update_cost.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import contextlib
import os
import resource
import statistics
import sys
import time
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

import dcasgd_optax
from dcasgd_optax._src import _cpu_kernel

_TRAFFIC_BOUND = 9 / 5
_KERNEL_TARGET = "dcasgd_optax_sgd_update"  # The fused update's CPU kernel.
_TARGET = 2.0


def make_params(num_params: int) -> dict[str, jax.Array]:
  """Two matrices and a vector totalling about ``num_params`` float32s."""
  side = int(np.sqrt(num_params * 2 / 3))
  shapes = {"w1": (side, side), "w2": (side // 2, side), "b": (1024,)}
  keys = jax.random.split(jax.random.key(0), len(shapes))
  return {
      k: jax.random.normal(key, s, jnp.float32)
      for key, (k, s) in zip(keys, shapes.items())
  }


class Config(NamedTuple):
  """One optimizer to time.

  Attributes:
    name: the table's row label.
    make: builds the optimizer.
    num_workers: worker ids cycle through ``range(num_workers)``.
    arrays_moved: model-sized arrays a step must read plus write at least.
    cpu_kernel: False traces the step with ``DCASGD_OPTAX_CPU_KERNEL=0``
      (XLA's blocked loop instead of the CPU kernel).
  """

  name: str
  make: Callable[[], Any]
  num_workers: int
  arrays_moved: float
  cpu_kernel: bool = True


@contextlib.contextmanager
def _kernel_switch(on: bool):
  """Within it, the fused update is traced with the CPU kernel on or off."""
  name = "DCASGD_OPTAX_CPU_KERNEL"
  before = os.environ.get(name)
  os.environ[name] = "1" if on else "0"
  try:
    yield
  finally:
    if before is None:
      del os.environ[name]
    else:
      os.environ[name] = before


class Runner:
  """One optimizer's live buffers, its jitted donated step, and its timings."""

  def __init__(self, config: Config, params, grads):
    self.config = config
    tx = optax.with_extra_args_support(config.make())

    def step(params, state, grads, worker):
      updates, state = tx.update(grads, state, params, worker=worker)
      return optax.apply_updates(params, updates), state

    self.params = jax.tree.map(jnp.copy, params)
    self.state = tx.init(self.params)
    self.grads = grads
    worker = jnp.int32(0)
    with _kernel_switch(config.cpu_kernel):
      self.step = jax.jit(step, donate_argnums=(0, 1)).lower(
          self.params, self.state, grads, worker
      ).compile()
    self.memory = self.step.memory_analysis()
    self.by_kernel = _KERNEL_TARGET in self.step.as_text()
    self.k = 0
    self.cpu_samples = []
    self.run(2)  # Warm up.
    self.cpu_samples = []

  def run(self, steps: int) -> float:
    """Seconds per step over ``steps`` back-to-back steps."""
    workers = [
        jnp.int32((self.k + i) % self.config.num_workers)
        for i in range(steps)
    ]
    self.k += steps
    cpu, start = _cpu_seconds(), time.perf_counter()
    for worker in workers:
      self.params, self.state = self.step(
          self.params, self.state, self.grads, worker
      )
    jax.block_until_ready((self.params, self.state))
    self.cpu_samples.append((_cpu_seconds() - cpu) / steps)
    return (time.perf_counter() - start) / steps

  def state_mib(self) -> float:
    return sum(x.nbytes for x in jax.tree.leaves(self.state)) / 2**20

  def extra_mib(self) -> float:
    """Memory the step needs beyond its inputs (new outputs, temporaries)."""
    m = self.memory
    new_outputs = m.output_size_in_bytes - m.alias_size_in_bytes
    return (new_outputs + m.temp_size_in_bytes) / 2**20

  def peak_mib(self) -> float:
    """Arguments + outputs not aliased to them + XLA temporaries, in MiB."""
    m = self.memory
    new_outputs = m.output_size_in_bytes - m.alias_size_in_bytes
    return (
        m.argument_size_in_bytes + new_outputs + m.temp_size_in_bytes
    ) / 2**20


class Row(NamedTuple):
  config: Config
  seconds: float  # per step
  baseline: float  # the baseline's seconds per step in the same phase
  cpu: float  # CPU seconds per step (all threads; > seconds if parallel)
  state_mib: float
  peak_mib: float
  extra_mib: float  # peak beyond the step's inputs (params, state, grads)
  by_kernel: bool  # the compiled step calls the CPU kernel


def _cpu_seconds() -> float:
  """This process's CPU time (all threads, user + system)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _add_bandwidth(add, params, grads, repeats: int) -> float:
  """GB/s of a jitted, donated ``add(w, g)`` (3 model-sized arrays moved),
  from the median of ``repeats`` timed calls after a warm-up."""
  w = jax.tree.map(jnp.copy, params)
  w = jax.block_until_ready(add(w, grads))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    w = jax.block_until_ready(add(w, grads))
    times.append(time.perf_counter() - start)
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  return 3 * model_bytes / statistics.median(times) / 1e9


def copy_bandwidth(params, grads, repeats: int) -> float:
  """GB/s of a jitted, donated ``w + g`` over the params (3 arrays moved)."""
  add = jax.jit(lambda w, g: jax.tree.map(jnp.add, w, g), donate_argnums=0)
  return _add_bandwidth(add, params, grads, repeats)


def blocked_copy_bandwidth(params, grads, repeats: int) -> float:
  """GB/s of the same ``w + g`` as a loop over 8Ki-element blocks.

  The loop the fused update runs on CPU (same block size), with nothing but
  the add in it: what one such loop can reach here (XLA:CPU runs a loop's
  iterations on one thread).
  """
  block = 1 << 13

  def add(w, g):
    if w.size < 2 * block:
      return w + g
    shape, w, g = w.shape, w.reshape(-1), g.reshape(-1)
    starts = np.arange(0, w.size, block)
    starts[-1] = w.size - block  # The last block overlaps the one before.

    def body(i, w):
      start = jnp.asarray(starts)[i]
      new = (lax.dynamic_slice_in_dim(w, start, block)
             + lax.dynamic_slice_in_dim(g, start, block))
      return lax.dynamic_update_slice_in_dim(w, new, start, 0)

    return lax.fori_loop(0, len(starts), body, w).reshape(shape)

  step = jax.jit(lambda w, g: jax.tree.map(add, w, g), donate_argnums=0)
  return _add_bandwidth(step, params, grads, repeats)


def time_interleaved(runners: list[Runner], repeats: int, steps: int):
  """Per-step medians, the runners alternating to share the machine's noise."""
  samples = [[] for _ in runners]
  for _ in range(repeats):
    for s, r in zip(samples, runners):
      s.append(r.run(steps))
  return [statistics.median(s) for s in samples], samples


def relative_spread(samples: list[float]) -> float:
  """Interquartile range over the median."""
  q1, _, q3 = statistics.quantiles(samples, n=4)
  return (q3 - q1) / statistics.median(samples)


def configs(lr: float = 0.01) -> list[Config]:
  def fused(workers, dtype=None):
    return lambda: dcasgd_optax.dcasgd(
        lr, workers, momentum=0.9, backup_dtype=dtype
    )

  def composed(workers):
    return lambda: dcasgd_optax.pull_after_push(optax.chain(
        dcasgd_optax.delay_compensation(workers, adaptive=True),
        optax.sgd(lr, momentum=0.9),
    ))

  return [
      Config("dcasgd-a, 1 worker", fused(1), 1, 9),
      Config("dcasgd-a, 64 workers", fused(64), 64, 9),
      Config("dcasgd-a, 64 workers, bf16 backups", fused(64, jnp.bfloat16),
             64, 8),
      Config("dcasgd-a, 64 workers, XLA loop", fused(64), 64, 9,
             cpu_kernel=False),
      Config("dcasgd-a, 64 workers, bf16 backups, XLA loop",
             fused(64, jnp.bfloat16), 64, 8, cpu_kernel=False),
      Config("gap_aware_asgd, 64 workers",
             lambda: dcasgd_optax.gap_aware_asgd(lr, 64, momentum=0.9), 64, 9),
      Config("composed chain, 1 worker", composed(1), 1, 9),
      Config("composed chain, 64 workers", composed(64), 64, 9),
      # The secant compensation keeps three per-worker copies (19 GB at 64
      # workers of 25M parameters): 16 workers, beside the composed chain at
      # 16. Moved: g, w, momentum, the worker's backup, previous backup and
      # previous gradient rows, the two running means (read), and all but g
      # written: 15 arrays.
      Config("composed chain, 16 workers", composed(16), 16, 9),
      Config("secant_dcasgd, 16 workers",
             lambda: dcasgd_optax.secant_dcasgd(lr, 16, momentum=0.9), 16, 15),
  ]


def crossover(repeats: int) -> None:
  """Per-step time of one parameter of each size, by the kernel and by XLA.

  ``dcasgd(0.1, 8, momentum=0.9)``, jitted and donated, many steps per
  sample so that dispatch is amortised; the kernel's size threshold is
  lifted for the measurement.
  """
  print(f"jax {jax.__version__}; current MIN_SIZE {_cpu_kernel.MIN_SIZE}")
  print("\n| elements | XLA us/step | kernel us/step | kernel / XLA |")
  print("|---|---|---|---|")
  threshold, _cpu_kernel.MIN_SIZE = _cpu_kernel.MIN_SIZE, 0
  try:
    for log2 in range(10, 23, 2):
      size = 1 << log2
      steps = max(20, min(2000, (1 << 26) // (16 * size)))
      xla, kernel = (_one_leaf_seconds(size, on, steps, repeats)
                     for on in (False, True))
      print(f"| {size:,} | {xla * 1e6:.1f} | {kernel * 1e6:.1f} | "
            f"{kernel / xla:.2f} |")
  finally:
    _cpu_kernel.MIN_SIZE = threshold


def _one_leaf_seconds(size: int, kernel: bool, steps: int,
                      repeats: int) -> float:
  config = Config("one leaf", lambda: dcasgd_optax.dcasgd(
      0.1, 8, momentum=0.9), 8, 9, cpu_kernel=kernel)
  params = {"w": jnp.ones((size,))}
  runner = Runner(config, params, {"w": jnp.full((size,), 1e-3)})
  assert runner.by_kernel == kernel, (size, kernel)
  return statistics.median(runner.run(steps) for _ in range(repeats))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=int, default=25_000_000)
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument(
      "--tolerance", type=float, default=0.15,
      help="smallest relative drift of the in-phase baseline that fails the "
      "run (twice the standalone spread if larger)",
  )
  parser.add_argument(
      "--only", default="",
      help="comma-separated substrings: time only the matching rows",
  )
  parser.add_argument(
      "--crossover", action="store_true",
      help="time one parameter of each size by the kernel and by XLA",
  )
  args = parser.parse_args()
  if args.crossover:
    crossover(args.repeats)
    return 0

  params = make_params(args.params)
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  n = sum(x.size for x in jax.tree.leaves(params))
  model_gb = sum(x.nbytes for x in jax.tree.leaves(params)) / 1e9
  print(f"device: {jax.devices()[0].device_kind}, params: {n / 1e6:.1f}M, "
        f"jax {jax.__version__}, optax {optax.__version__}")

  copy_gbs = copy_bandwidth(params, grads, args.repeats)
  baseline = Config(
      "sgd(momentum=0.9)", lambda: optax.sgd(0.01, momentum=0.9), 1, 5
  )
  base = Runner(baseline, params, grads)
  (alone,), (alone_samples,) = time_interleaved([base], args.repeats,
                                                args.steps)
  blocked_gbs = blocked_copy_bandwidth(params, grads, args.repeats)
  print(f"copy bandwidth (jitted donated w + g): {copy_gbs:.1f} GB/s; "
        f"as a loop over 8Ki-element blocks: {blocked_gbs:.1f} GB/s")
  print(f"baseline alone: {alone * 1e3:.1f} ms/step "
        f"(spread {relative_spread(alone_samples):.0%})")

  rows = [Row(baseline, alone, alone, statistics.median(base.cpu_samples),
              base.state_mib(), base.peak_mib(), base.extra_mib(), False)]
  drifts = []
  wanted = [s for s in args.only.split(",") if s]
  for config in configs():
    if wanted and not any(s in config.name for s in wanted):
      continue
    runner = Runner(config, params, grads)
    (t_base, t), _ = time_interleaved([base, runner], args.repeats,
                                      args.steps)
    drifts.append((config.name, t_base / alone - 1))
    rows.append(Row(config, t, t_base, statistics.median(runner.cpu_samples),
                    runner.state_mib(), runner.peak_mib(), runner.extra_mib(),
                    runner.by_kernel))
    del runner  # Free its buffers before the next phase.

  print("\n| optimizer | CPU kernel | ms/step | GB/s | % of copy | "
        "vs baseline | baseline in phase, ms | CPU ms/step | CPU vs baseline | "
        "state MiB | peak MiB | beyond inputs MiB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  base_cpu = rows[0].cpu
  for r in rows:
    gbs = r.config.arrays_moved * model_gb / r.seconds
    print(f"| {r.config.name} | {'yes' if r.by_kernel else 'no'} | "
          f"{r.seconds * 1e3:.1f} | {gbs:.1f} | "
          f"{gbs / copy_gbs:.0%} | {r.seconds / r.baseline:.2f}x | "
          f"{r.baseline * 1e3:.1f} | {r.cpu * 1e3:.1f} | "
          f"{r.cpu / base_cpu:.2f}x | {r.state_mib:,.0f} | "
          f"{r.peak_mib:,.0f} | {r.extra_mib:,.1f} |")
  print(f"\ncopy bandwidth: {copy_gbs:.1f} GB/s (blocked loop "
        f"{blocked_gbs:.1f} GB/s); memory-traffic bound for "
        f"DC-ASGD-a+momentum: {_TRAFFIC_BOUND:.1f}x (target <= {_TARGET}x)")
  ratio = {r.config.name: r.seconds / r.baseline for r in rows}
  one, many = "dcasgd-a, 1 worker", "dcasgd-a, 64 workers"
  if one in ratio and many in ratio:
    print(f"growth with workers (64 vs 1): {ratio[many] / ratio[one]:.2f}x "
          "(target <= 1.1x)")
  bf16 = "dcasgd-a, 64 workers, bf16 backups"
  if bf16 in ratio and many in ratio:
    print(f"bfloat16 against float32 backups (64 workers): "
          f"{ratio[bf16] / ratio[many]:.2f}x (target <= 1.0x)")
  # The noise: the larger of --tolerance and twice the standalone spread.
  tolerance = max(args.tolerance, 2 * relative_spread(alone_samples))
  return _check_baseline(drifts, tolerance)


def _check_baseline(drifts: list[tuple[str, float]], tolerance: float) -> int:
  bad = [(name, d) for name, d in drifts if abs(d) > tolerance]
  if not bad:
    worst = max((abs(d) for _, d in drifts), default=0.0)
    print(f"baseline check: in-phase baseline within {worst:.0%} of its "
          f"standalone timing (tolerance {tolerance:.0%})")
    return 0
  for name, d in bad:
    print(
        f"BASELINE DRIFT: while timing '{name}' the baseline took {d:+.0%} "
        f"vs its standalone timing (tolerance {tolerance:.0%}). The machine "
        "is too noisy (check `uptime`) or the phases disturb each other; "
        "these ratios are not what a user gets.",
        file=sys.stderr,
    )
  return 1


if __name__ == "__main__":
  sys.exit(main())
