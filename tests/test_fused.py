"""The fused full optimizers give the composed chains' numbers, in place.

``dcasgd`` and ``gap_aware_asgd`` document themselves as chains
(``pull_after_push(chain(<backups transformation>, [add_decayed_weights],
sgd))``) but run a fused update. Each is compared here, under ``jit``, with
that chain built from the public transformations over a few updates,
including one from a traced out-of-range worker. The model has a parameter
large enough for the CPU kernel (16Ki elements or more) and, with the kernel
switched off, for XLA's loop over 8Ki-element blocks (more than two blocks,
with a partial last block), and small ones.

The comparison allows a few units in the last place: XLA:CPU contracts a
multiply and an add into one rounding (FMA) where both sit in one fusion,
so even the composed chain's low bits depend on how XLA fuses it (e.g. on
whether the step also returns the updates). A wrong formula is far outside.
"""

from __future__ import annotations

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax
from dcasgd_optax._src import _cpu_kernel
from dcasgd_optax._src import _kernel_build

M = 3
WORKERS = (0, 2, 1, 2, 7)  # 7 is out of range: NaN update, state kept.


def model():
  return {
      "big": jnp.linspace(-1.0, 1.0, 140_000).reshape(2, 70_000),
      "small": jnp.arange(15.0).reshape(3, 5) / 15,
      "bias": jnp.array([0.5]),
  }


def grads_at(params, t):
  return jax.tree.map(lambda p: jnp.sin(p * (t + 1)) + 0.1 * t, params)


def composed_dcasgd(learning_rate, num_workers, *, momentum=None,
                    nesterov=False, weight_decay=0.0, backup_dtype=None,
                    adaptive=True, lambda_=None, **compensation):
  """Dcasgd as its docstring spells it, from the public transformations."""
  parts = [dcasgd_optax.delay_compensation(
      num_workers, lambda_, adaptive=adaptive, backup_dtype=backup_dtype,
      **compensation
  )]
  if callable(weight_decay) or not isinstance(weight_decay, (int, float)) \
      or weight_decay != 0:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
  return dcasgd_optax.pull_after_push(optax.chain(*parts))


def composed_gap_aware_sgd(learning_rate, num_workers, *, momentum=None,
                           step_size=None, **kwargs):
  step_size = step_size or learning_rate / (1.0 - (momentum or 0.0))
  return dcasgd_optax.pull_after_push(optax.chain(
      dcasgd_optax.gap_aware(num_workers, step_size, **kwargs),
      optax.sgd(learning_rate, momentum=momentum),
  ))


def trajectory(tx, workers=WORKERS):
  """Updates and states of a jitted, donated step over ``workers``."""

  def step(params, state, grads, worker):
    updates, state = tx.update(grads, state, params, worker=worker)
    return optax.apply_updates(params, updates), state, updates

  step = jax.jit(step, donate_argnums=(0, 1))
  params = model()
  state = tx.init(params)
  seen = []
  for t, worker in enumerate(workers):
    params, state, updates = step(params, state, grads_at(params, t),
                                  jnp.int32(worker))
    seen.append(updates)
  return params, state, seen


KERNEL_SWITCH = "DCASGD_OPTAX_CPU_KERNEL"  # "0": XLA's loop on CPU.
KERNEL_TARGET = "dcasgd_optax_sgd_update"  # The kernel's custom-call name.


def assert_same_numbers(fused, composed):
  chex.assert_trees_all_close(fused, composed, rtol=1e-6, atol=1e-6)


SCHEDULE = optax.linear_schedule(0.1, 0.01, 4)

DCASGD_CASES = {
    "a_momentum": dict(momentum=0.9),
    "a_plain_sgd": dict(),
    "a_nesterov_schedules": dict(momentum=0.9, nesterov=True,
                                 learning_rate=SCHEDULE,
                                 weight_decay=optax.constant_schedule(1e-3)),
    "c_momentum_weight_decay": dict(adaptive=False, lambda_=0.5, momentum=0.5,
                                    weight_decay=1e-3),
    "per_worker_bias_warmup": dict(momentum=0.9, per_worker_mean_square=True,
                                   bias_correction=True, lambda_warmup=3,
                                   correction_clip=0.5),
    "bf16_backups": dict(momentum=0.9, backup_dtype=jnp.bfloat16),
}


@pytest.mark.parametrize("kwargs", DCASGD_CASES.values(), ids=DCASGD_CASES)
def test_dcasgd_gives_the_composed_chains_numbers(kwargs):
  kwargs = {"learning_rate": 0.1, **kwargs}
  fused = trajectory(dcasgd_optax.dcasgd(num_workers=M, **kwargs))
  composed = trajectory(composed_dcasgd(num_workers=M, **kwargs))
  assert_same_numbers(fused, composed)


def test_gap_aware_sgd_gives_the_composed_chains_numbers():
  fused = trajectory(dcasgd_optax.gap_aware_asgd(0.1, M, momentum=0.9))
  composed = trajectory(composed_gap_aware_sgd(0.1, M, momentum=0.9))
  assert_same_numbers(fused, composed)


def test_under_inject_hyperparams_the_numbers_are_the_chains():
  def composed(learning_rate, num_workers, momentum, weight_decay, lambda_):
    return composed_dcasgd(learning_rate, num_workers, momentum=momentum,
                           weight_decay=weight_decay, lambda_=lambda_)

  def inject(make):
    return optax.inject_hyperparams(make, static_args=("num_workers",))(
        learning_rate=0.1, num_workers=M, momentum=0.9, weight_decay=1e-3,
        lambda_=1.5,
    )

  params, state, updates = trajectory(inject(dcasgd_optax.dcasgd))
  params_c, state_c, updates_c = trajectory(inject(composed))
  assert_same_numbers((params, state.inner_state, updates),
                      (params_c, state_c.inner_state, updates_c))


def test_an_out_of_range_traced_worker_gives_nan_and_keeps_the_state():
  """The documented edge, checked on the fused update itself."""
  tx = dcasgd_optax.dcasgd(0.1, M, momentum=0.9)
  update = jax.jit(lambda g, s, p, m: tx.update(g, s, p, worker=m))
  params = model()
  _, state = update(params, tx.init(params), params, jnp.int32(1))
  updates, after = update(params, state, params, jnp.int32(7))
  assert all(np.isnan(u).all() for u in jax.tree.leaves(updates))
  chex.assert_trees_all_equal(after.inner_state[0],  # Backups, ms, count.
                              state.inner_state[0])


# --- memory: every output written in place ----------------------------------

WIDE = {"w": jnp.zeros((2_000_000,)), "b": jnp.zeros((10,))}
WIDE_BYTES = sum(x.nbytes for x in jax.tree.leaves(WIDE))


def extra_bytes(tx, donate=True):
  """What the compiled step needs beyond its inputs (new outputs + temps)."""

  def step(params, state, grads, worker):
    updates, state = tx.update(grads, state, params, worker=worker)
    return optax.apply_updates(params, updates), state

  state = jax.eval_shape(tx.init, WIDE)
  jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  memory = jitted.lower(WIDE, state, WIDE, jnp.int32(0)).compile()
  memory = memory.memory_analysis()
  unaliased = memory.output_size_in_bytes - memory.alias_size_in_bytes
  return unaliased + memory.temp_size_in_bytes


@pytest.mark.parametrize("num_workers", [2, 32])
def test_with_momentum_the_update_needs_no_model_sized_buffer(num_workers):
  """Momentum, mean square, the worker's backup and params: all in place."""
  extra = extra_bytes(dcasgd_optax.dcasgd(0.1, num_workers, momentum=0.9))
  assert extra <= WIDE_BYTES // 2, (extra, WIDE_BYTES)


@pytest.mark.parametrize(
    "kwargs", [dict(momentum=0.9, nesterov=True), dict()],
    ids=["nesterov", "sgd"],
)
def test_otherwise_it_needs_one_model_sized_buffer_for_the_updates(kwargs):
  """The updates are an output of their own (they read the old backup)."""
  extra = extra_bytes(dcasgd_optax.dcasgd(0.1, 32, **kwargs))
  assert extra <= 1.5 * WIDE_BYTES, (extra, WIDE_BYTES)


def test_bf16_backups_are_not_converted_whole():
  """XLA:CPU converts a bf16 backup array whole unless written as integers."""
  tx = dcasgd_optax.dcasgd(0.1, 32, momentum=0.9, backup_dtype=jnp.bfloat16)
  backups_bytes = 32 * WIDE_BYTES // 2
  # One bf16 row (the worker's, copied out) and the blocks.
  assert extra_bytes(tx) <= WIDE_BYTES < backups_bytes


def test_without_donation_the_memory_check_sees_the_copies():
  """The checks above can fail: without donation the outputs are new arrays."""
  extra = extra_bytes(dcasgd_optax.dcasgd(0.1, 2, momentum=0.9), donate=False)
  assert extra > 2 * WIDE_BYTES


def compiled_text(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_the_adaptive_lambda_compiles_without_rsqrt(monkeypatch):
  """XLA:CPU (JAX 0.12) runs rsqrt ~5x slower inside the fused update's loop."""
  monkeypatch.setenv(KERNEL_SWITCH, "0")  # XLA's loop, not the CPU kernel.
  tx = optax.with_extra_args_support(dcasgd_optax.dcasgd(0.1, 2, momentum=0.9))

  def step(params, state, grads, worker):
    return tx.update(grads, state, params, worker=worker)

  state = jax.eval_shape(tx.init, WIDE)
  assert " rsqrt(" not in compiled_text(step, WIDE, state, WIDE, jnp.int32(0))


def test_the_rsqrt_check_can_fail():
  """``lambda / sqrt(ms + eps)``, the textbook form, compiles to rsqrt."""
  text = compiled_text(lambda x: 0.5 / jnp.sqrt(x + 1e-7), WIDE["w"])
  assert " rsqrt(" in text


def test_record_pull_of_bf16_backups_writes_one_row_in_place():
  tx = dcasgd_optax.delay_compensation(32, backup_dtype=jnp.bfloat16)
  state = jax.eval_shape(tx.init, WIDE)
  pull = jax.jit(dcasgd_optax.record_pull, donate_argnums=0)
  memory = pull.lower(state, WIDE, jnp.int32(0)).compile().memory_analysis()
  backups_bytes = 32 * WIDE_BYTES // 2
  assert memory.temp_size_in_bytes <= WIDE_BYTES  # Not 2 * backups_bytes.
  assert memory.alias_size_in_bytes >= backups_bytes


def test_record_pull_of_bf16_backups_writes_that_row_only():
  tx = dcasgd_optax.delay_compensation(4, backup_dtype=jnp.bfloat16)
  pull = jax.jit(dcasgd_optax.record_pull)
  state = pull(tx.init({"w": jnp.zeros(3)}), {"w": jnp.full(3, 1.5)},
               jnp.int32(2))
  state = pull(state, {"w": jnp.full(3, 9.0)}, jnp.int32(4))  # Out of range.
  held = state.backups["w"]
  assert held.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      held.astype(np.float32), [[0] * 3, [0] * 3, [1.5] * 3, [0] * 3]
  )


@pytest.mark.parametrize("per_worker", [False, True],
                         ids=["global_ms", "per_worker_ms"])
def test_under_vmap_each_simulation_gets_the_chains_numbers(per_worker):
  """Sweeps vmap the update over simulations, each with its own worker.

  On CPU the big parameter goes through the kernel, which then loops over
  the batch: each simulation's per-worker mean square is its own.
  """
  kwargs = dict(momentum=0.9, per_worker_mean_square=per_worker)
  fused = dcasgd_optax.dcasgd(0.1, M, **kwargs)
  composed = composed_dcasgd(0.1, M, **kwargs)
  params = jax.tree.map(lambda p: jnp.stack([p, 2 * p]), model())
  workers = jnp.array([2, 1], jnp.int32)

  def run(tx, steps=2):
    state = jax.vmap(tx.init)(params)
    update = jax.jit(jax.vmap(lambda g, s, p, m: tx.update(g, s, p, worker=m)))
    for t in range(steps):  # Worker 2, then 1: rows other than 0.
      updates, state = update(grads_at(params, t), state, params, workers - t)
    return updates, state, update.lower(
        grads_at(params, 0), state, params, workers).as_text()

  updates, state, text = run(fused)
  if jax.default_backend() == "cpu" and kernel_available():
    assert KERNEL_TARGET in text
  assert_same_numbers((updates, state), run(composed)[:2])


# --- the CPU kernel ---------------------------------------------------------


def kernel_available():
  """Whether a C++ compiler is found (then the kernel must build and load)."""
  try:
    _kernel_build.compiler()
  except RuntimeError:
    return False
  return True


def require_kernel(monkeypatch):
  """Skips without a CPU or a compiler; fails if the kernel did not load."""
  if jax.default_backend() != "cpu":
    pytest.skip("the kernel is CPU only")
  if not kernel_available():
    pytest.skip("no C++ compiler: the kernel cannot be built")
  monkeypatch.setenv(KERNEL_SWITCH, "1")
  assert _cpu_kernel.enabled(), "the CPU kernel did not build or load"


def step_text(tx, params):
  """The compiled text of a jitted step of ``tx`` on ``params``."""
  tx = optax.with_extra_args_support(tx)
  state = jax.eval_shape(tx.init, params)
  return compiled_text(
      lambda g, s, p, m: tx.update(g, s, p, worker=m),
      params, state, params, jnp.int32(0),
  )


@pytest.mark.parametrize("switch", ["1", "0"])
def test_on_cpu_the_kernel_computes_dcasgd_unless_switched_off(
    monkeypatch, switch):
  """One custom call per large parameter (``model()``'s "big"), none if off."""
  if jax.default_backend() != "cpu":
    pytest.skip("the kernel is CPU only")
  monkeypatch.setenv(KERNEL_SWITCH, switch)
  text = step_text(dcasgd_optax.dcasgd(0.1, M, momentum=0.9), model())
  calls = text.count(f'custom_call_target="{KERNEL_TARGET}"')
  assert calls == (1 if switch == "1" else 0), calls


def test_gap_aware_sgd_keeps_xlas_path():
  text = step_text(dcasgd_optax.gap_aware_asgd(0.1, M, momentum=0.9), model())
  assert KERNEL_TARGET not in text


KERNEL_CASES = {
    "a_momentum_bf16": dict(momentum=0.9, backup_dtype=jnp.bfloat16),
    "c_nesterov_clip": dict(adaptive=False, lambda_=0.5, momentum=0.9,
                            nesterov=True, correction_clip=0.5,
                            weight_decay=1e-3),
}


@pytest.mark.parametrize("kwargs", KERNEL_CASES.values(), ids=KERNEL_CASES)
def test_the_kernel_and_xlas_loop_give_the_same_numbers(monkeypatch, kwargs):
  """Both CPU paths, over updates including an out-of-range worker."""
  require_kernel(monkeypatch)
  tx = dcasgd_optax.dcasgd(0.1, M, **kwargs)
  assert KERNEL_TARGET in step_text(tx, model())  # Not XLA against itself.
  by_kernel = trajectory(tx)
  monkeypatch.setenv(KERNEL_SWITCH, "0")
  assert KERNEL_TARGET not in step_text(tx, model())
  assert_same_numbers(by_kernel, trajectory(tx))


def test_xlas_blocked_loop_keeps_a_mean_square_per_worker(monkeypatch):
  """The loop used without a compiler, with the kernel off, or in float64."""
  monkeypatch.setenv(KERNEL_SWITCH, "0")
  kwargs = dict(learning_rate=0.1, **DCASGD_CASES["per_worker_bias_warmup"])
  fused = dcasgd_optax.dcasgd(num_workers=M, **kwargs)
  assert "while" in step_text(fused, model())  # The blocked loop.
  assert_same_numbers(trajectory(fused),
                      trajectory(composed_dcasgd(num_workers=M, **kwargs)))


def ffi_operands(n=64, rows=2, **dtypes):
  """The kernel's operands for DC-ASGD-a with momentum, dtypes overridden."""
  dtype = lambda k: dtypes.get(k, jnp.float32)
  return dict(
      g=jnp.ones(n, dtype("g")), w=jnp.ones(n, dtype("w")),
      backups=jnp.zeros((rows, n), dtype("backups")),
      ms=jnp.zeros(n, dtype("ms")), trace=jnp.zeros(n, dtype("trace")),
  )


FFI_CASES = {  # A direct ffi_call that gets a dtype or a size wrong.
    "bf16_ms": (dict(ms=jnp.bfloat16), {}, "ms or trace: dtype"),
    "f16_trace": (dict(trace=jnp.float16), {}, "ms or trace: dtype"),
    "bf16_g": (dict(g=jnp.bfloat16), {}, "decode all FFI handler operands"),
    "bf16_backups": (dict(backups=jnp.bfloat16), {}, "backups: sizes or dtype"),
    "small_ms_result": ({}, dict(ms=(32,)), "results: dtype or size"),
    "small_backups_result": ({}, dict(backups=(1, 64)),
                             "results: dtype or size"),
    "bf16_updates_result": ({}, dict(updates=jnp.bfloat16),
                            "updates: dtype or size"),
}


@pytest.mark.parametrize("dtypes, results, error", FFI_CASES.values(),
                         ids=FFI_CASES)
def test_the_kernel_refuses_wrong_dtypes_and_sizes(monkeypatch, dtypes,
                                                   results, error):
  """An error from the call, not a write past the end of a buffer."""
  require_kernel(monkeypatch)
  x = ffi_operands(**dtypes)
  flags = _cpu_kernel.Flags.ADAPTIVE | _cpu_kernel.Flags.MOMENTUM
  shapes = {k: jax.ShapeDtypeStruct(x[k].shape, x[k].dtype)
            for k in ("backups", "ms", "trace")}
  shapes["updates"] = jax.ShapeDtypeStruct((0,), jnp.float32)
  for k, v in results.items():
    s = shapes[k]
    shapes[k] = (jax.ShapeDtypeStruct(v, s.dtype) if isinstance(v, tuple)
                 else jax.ShapeDtypeStruct(s.shape, v))
  aliased = not results  # A result of another shape cannot be aliased.
  call = jax.ffi.ffi_call(
      KERNEL_TARGET, list(shapes.values()),
      input_output_aliases={2: 0, 3: 1, 4: 2} if aliased else None,
  )
  scalars = jnp.ones(len(_cpu_kernel.Scalars._fields), jnp.float32)
  with pytest.raises(Exception, match=error):
    jax.block_until_ready(jax.jit(
        lambda *a: call(*a, scalars, jnp.int32(0), flags=np.int64(flags))
    )(x["g"], x["w"], x["backups"], x["ms"], x["trace"]))


def test_the_kernel_accepts_the_right_dtypes_and_sizes(monkeypatch):
  """The refusals above are for what they change, not for every call."""
  require_kernel(monkeypatch)
  x = ffi_operands()
  flags = _cpu_kernel.Flags.ADAPTIVE | _cpu_kernel.Flags.MOMENTUM
  scalars = jnp.ones(len(_cpu_kernel.Scalars._fields), jnp.float32)
  _, backups, _, _ = jax.jit(lambda *a: _cpu_kernel.leaf_update(
      *a, scalars, jnp.int32(1), flags))(
          x["g"], x["w"], x["backups"], x["ms"], x["trace"])
  assert np.isfinite(np.asarray(backups[1])).all()


NO_COMPILER = """
import warnings
import jax, jax.numpy as jnp, dcasgd_optax
tx = dcasgd_optax.dcasgd(0.1, 2, momentum=0.9)
params = {"w": jnp.ones(100_000)}
update = lambda g, s, p: tx.update(g, s, p, worker=jnp.int32(1))
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  for _ in range(2):  # Two traces, one warning.
    text = jax.jit(update).lower(params, tx.init(params), params).as_text()
    updates, _ = jax.jit(update)(params, tx.init(params), params)
print(sum("CPU kernel" in str(w.message) for w in caught),
      "%s" in text, float(updates["w"][0]))
"""


def test_without_a_compiler_dcasgd_warns_once_and_keeps_xlas_loop(tmp_path):
  """A fresh process that finds no C++ compiler (and no cached build)."""
  env = dict(os.environ, CXX="", PATH=os.path.dirname(sys.executable),
             DCASGD_OPTAX_CACHE_DIR=str(tmp_path))
  env.pop(KERNEL_SWITCH, None)
  done = subprocess.run(
      [sys.executable, "-c", NO_COMPILER % KERNEL_TARGET], env=env,
      capture_output=True, text=True, check=True,
  )
  assert done.stdout.split() == [
      "1",
      "False",
      str(float(np.float32(-0.1))),
  ], done


# --- the worker's model as an explicit input (held_params) ------------------


def is_dc(x):
  return isinstance(x, dcasgd_optax.DelayCompensationState)


def map_backups(fn, *states):
  """``states[0]`` with its backups replaced by ``fn`` of every state's."""
  return jax.tree.map(
      lambda s, *o: s._replace(backups=fn(s.backups, *(x.backups for x in o)))
      if is_dc(s) else s, *states, is_leaf=is_dc)


def told_trajectory(tx, workers=WORKERS):
  """:func:`trajectory`, each update reading a NaN stand-in for the backups
  and told the worker's model by ``held_params`` (as the sharded simulator
  does); the pull written to the stand-in's row is kept, the rest dropped."""

  def step(params, state, grads, worker):
    held = dcasgd_optax.worker_params(state, worker)
    nan = lambda b: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), b)
    updates, after = tx.update(grads, map_backups(nan, state), params,
                               worker=worker, held_params=held)
    rows = lambda x: (jnp.arange(x.shape[0]) == worker).reshape(
        (-1,) + (1,) * (x.ndim - 1))
    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(rows(o), n, o), new, old)
    after = map_backups(keep, after, state)
    return optax.apply_updates(params, updates), after, updates

  step = jax.jit(step)
  params = model()
  state = tx.init(params)
  seen = []
  for t, worker in enumerate(workers):
    params, state, updates = step(params, state, grads_at(params, t),
                                  jnp.int32(worker))
    seen.append(updates)
  return params, state, seen


HELD_CASES = {
    "kernel_a_momentum": ("1", dict(momentum=0.9)),
    "kernel_per_worker_bf16": (
        "1",
        dict(
            momentum=0.9, backup_dtype=jnp.bfloat16, per_worker_mean_square=True
        ),
    ),
    "xla_loop_per_worker": ("0", dict(per_worker_mean_square=True)),
    "xla_loop_c_nesterov": (
        "0",
        dict(adaptive=False, lambda_=0.5, momentum=0.9, nesterov=True),
    ),
}


@pytest.mark.parametrize("switch, kwargs", HELD_CASES.values(),
                         ids=HELD_CASES)
def test_told_the_workers_model_dcasgd_reads_no_row_of_the_backups(
    monkeypatch, switch, kwargs):
  """``held_params`` is what the compensation compares with: told it, the
  fused update (kernel and XLA's loop) and the chain give the numbers of
  reading the real backups, from a state whose backups are all NaN."""
  monkeypatch.setenv(KERNEL_SWITCH, switch)
  want = trajectory(composed_dcasgd(0.1, M, **kwargs))
  assert_same_numbers(told_trajectory(dcasgd_optax.dcasgd(0.1, M, **kwargs)),
                      want)
  assert_same_numbers(told_trajectory(composed_dcasgd(0.1, M, **kwargs)), want)


def test_told_the_workers_model_gap_aware_sgd_reads_no_row_of_the_backups():
  want = trajectory(composed_gap_aware_sgd(0.1, M, momentum=0.9))
  assert_same_numbers(
      told_trajectory(dcasgd_optax.gap_aware_asgd(0.1, M, momentum=0.9)), want)
  assert_same_numbers(
      told_trajectory(composed_gap_aware_sgd(0.1, M, momentum=0.9)), want)


def test_held_params_of_another_structure_is_an_error():
  tx = dcasgd_optax.dcasgd(0.1, M)
  params = model()
  with pytest.raises(ValueError, match="held_params"):
    tx.update(params, tx.init(params), params, worker=0,
              held_params={"big": params["big"]})


def test_no_ambient_state_decides_a_trace():
  """No contextvar or module-level switch steers what a transformation
  traces: what the harness knows is passed to ``update`` (``held_params``)."""
  import pathlib
  root = pathlib.Path(dcasgd_optax.__file__).parent
  for path in root.rglob("*.py"):
    text = path.read_text()
    assert "contextvars" not in text and "ContextVar" not in text, path
