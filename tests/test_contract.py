"""The optax contract, shared by every exported optimizer.

One parametrized suite: each case is a way to build a transformation that
keeps per-worker backups (``delay_compensation`` in both variants,
``dcasgd``, ``pull_after_push``, ``gap_aware``, ``gap_aware_asgd``,
``dana_dcasgd``, ``delayed_nesterov_dcasgd``, ``fisher_compensation``,
``fisher_dcasgd``, ``secant_compensation``, ``secant_dcasgd``,
``delayed_nesterov_secant_dcasgd``), and
every test checks one promise
an optax user relies on: jit, vmap, the usual wrappers, extra args, no
recompilation per worker, dtypes, and finding the state with
``record_pull``/``worker_params``. A second, smaller suite holds the chain
pieces that keep no backups (``scale_by_staleness`` in each rule,
``scale_by_pipemare``, ``delayed_nesterov``, ``look_ahead_momentum`` in
both forms, ``look_ahead_adam``) to the same promises: jit,
bf16 in and out, inside a chain, ``inject_hyperparams``, extra args.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcasgd_optax

from helpers import NUM_WORKERS
from helpers import dc_state
from helpers import grads_like
from helpers import shifted
from helpers import stale_state
from helpers import update_step

TOL = dict(rtol=1e-6, atol=1e-6)  # float32 round-off


def user_chain(num_workers, lambda_=0.5, learning_rate=0.1, backup_dtype=None):
  """pull_after_push around a user's chain (a factory: inject_hyperparams)."""
  return dcasgd_optax.pull_after_push(
      optax.chain(
          dcasgd_optax.delay_compensation(
              num_workers, lambda_, backup_dtype=backup_dtype
          ),
          optax.clip_by_global_norm(100.0),
          optax.sgd(learning_rate, momentum=0.5, nesterov=True),
      )
  )


def feeding_grad_sq(factory):
  """``factory``'s transformation, fed ``grad_sq = g * g + 0.25`` when an
  update gets none: the contract's tests call ``update(g, state, params,
  worker=m)`` (through every wrapper), and the Fisher-diagonal compensation
  needs the worker's curvature with each gradient (test_fisher.py checks
  its numbers and the loud error without it)."""

  @functools.wraps(factory)
  def build(**kwargs):
    tx = factory(**kwargs)

    def update(updates, state, params=None, **extra):
      extra.setdefault(
          "grad_sq", jax.tree.map(lambda g: g * g + 0.25, updates))
      return tx.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(tx.init, update)

  return build


def with_secant_history(factory):
  """``factory``'s transformation, whose ``init`` returns a state in which
  every worker has already pushed once: each worker's previous backup is
  the initial model plus 0.25, its previous gradient zero, and both running
  means one. The contract's tests push once or a few times on a fresh (or
  ``stale_state``) state, where the secant compensation would have no
  estimate yet and correct nothing; with this history it corrects from the
  first push (test_secant.py checks the numbers from a true start)."""
  is_secant = lambda x: isinstance(x, dcasgd_optax.SecantCompensationState)

  def pushed_once(state):
    if not is_secant(state):
      return state
    return state._replace(
        previous_backups=jax.tree.map(
            lambda b: (b + 0.25).astype(b.dtype), state.previous_backups),
        seen=jnp.ones_like(state.seen),
        numerator=jax.tree.map(jnp.ones_like, state.numerator),
        denominator=jax.tree.map(jnp.ones_like, state.denominator),
    )

  @functools.wraps(factory)
  def build(**kwargs):
    tx = factory(**kwargs)

    def init(params):
      return jax.tree.map(pushed_once, tx.init(params), is_leaf=is_secant)

    return optax.GradientTransformationExtraArgs(init, tx.update)

  return build


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any]
  static_args: tuple[str, ...]
  pulls_after_push: bool  # does update() record the pull itself?
  adaptive: bool  # keeps a mean square (DC-ASGD-a, gap-aware)?
  # The hyperparameter that turns the correction off, and its off value.
  knob: str = "lambda_"
  off: float = 0.0
  look_ahead: bool = False  # does a pull send a prediction?

  def make(self, **overrides):
    return self.factory(**{**self.kwargs, **overrides})

  def make_off(self):
    return self.make(**{self.knob: self.off})


CASES = [
    Case(
        "delay_compensation_c",
        dcasgd_optax.delay_compensation,
        dict(num_workers=NUM_WORKERS, lambda_=0.5),
        ("num_workers", "adaptive"),
        False,
        False,
    ),
    Case(
        "delay_compensation_a",
        dcasgd_optax.delay_compensation,
        dict(num_workers=NUM_WORKERS, lambda_=2.0, adaptive=True),
        ("num_workers", "adaptive"),
        False,
        True,
    ),
    Case(
        "dcasgd",
        dcasgd_optax.dcasgd,
        dict(
            learning_rate=0.1,
            num_workers=NUM_WORKERS,
            lambda_=0.5,
            momentum=0.9,
            weight_decay=1e-2,
        ),
        ("num_workers", "adaptive", "nesterov"),
        True,
        True,  # dcasgd's default is DC-ASGD-a
    ),
    Case(
        "pull_after_push",
        user_chain,
        dict(num_workers=NUM_WORKERS, lambda_=0.5),
        ("num_workers", "backup_dtype"),
        True,
        False,
    ),
    Case(
        "gap_aware",
        dcasgd_optax.gap_aware,
        dict(num_workers=NUM_WORKERS, step_size=0.05, decay=0.5),
        ("num_workers",),
        False,
        True,
        knob="step_size",
        off=1e30,
    ),
    Case(
        "gap_aware_asgd",
        dcasgd_optax.gap_aware_asgd,
        dict(learning_rate=0.1, num_workers=NUM_WORKERS, momentum=0.9,
             weight_decay=1e-2, step_size=0.05, decay=0.5),
        ("num_workers",),
        True,
        True,
        # C grows so large that 1 + gap / C rounds to 1: no penalty.
        knob="step_size",
        off=1e30,
    ),
    Case(
        "dana_dcasgd",
        dcasgd_optax.dana_dcasgd,
        dict(learning_rate=0.1, num_workers=NUM_WORKERS, lambda_=0.5,
             momentum=0.9),
        ("num_workers",),
        True,
        True,
        look_ahead=True,
    ),
    Case(
        "delayed_nesterov_dcasgd",
        dcasgd_optax.delayed_nesterov_dcasgd,
        dict(learning_rate=0.1, num_workers=NUM_WORKERS, lambda_=0.5,
             period=2, momentum_activation=0.25),
        ("num_workers", "period"),
        True,
        True,
    ),
    Case(
        "fisher_compensation",
        feeding_grad_sq(dcasgd_optax.fisher_compensation),
        dict(num_workers=NUM_WORKERS, lambda_=0.5),
        ("num_workers", "adaptive"),
        False,
        False,
    ),
    Case(
        "fisher_compensation_a",
        feeding_grad_sq(dcasgd_optax.fisher_compensation),
        dict(num_workers=NUM_WORKERS, lambda_=2.0, adaptive=True),
        ("num_workers", "adaptive"),
        False,
        True,
    ),
    Case(
        "fisher_dcasgd",
        feeding_grad_sq(dcasgd_optax.fisher_dcasgd),
        dict(learning_rate=0.1, num_workers=NUM_WORKERS, lambda_=0.5,
             momentum=0.9, weight_decay=1e-2),
        ("num_workers", "adaptive", "nesterov"),
        True,
        True,
    ),
    Case(
        "secant_compensation",
        with_secant_history(dcasgd_optax.secant_compensation),
        dict(num_workers=NUM_WORKERS, lambda_=0.5),
        ("num_workers",),
        False,
        False,
    ),
    Case(
        "secant_dcasgd",
        with_secant_history(dcasgd_optax.secant_dcasgd),
        dict(learning_rate=0.1, num_workers=NUM_WORKERS, lambda_=0.5,
             momentum=0.9, weight_decay=1e-2),
        ("num_workers", "nesterov"),
        True,
        False,
    ),
    Case(
        "delayed_nesterov_secant_dcasgd",
        with_secant_history(dcasgd_optax.delayed_nesterov_secant_dcasgd),
        dict(learning_rate=0.1, num_workers=NUM_WORKERS, lambda_=0.5,
             period=2, momentum_activation=0.25, weight_decay=1e-2),
        ("num_workers", "period"),
        True,
        False,
    ),
]

case_params = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)


def make_params(dtype=jnp.float32):
  params = {
      "dense": {
          "kernel": jnp.arange(6.0).reshape(2, 3) / 6,
          "bias": jnp.ones(3),
      },
      "scale": jnp.array(0.5),
  }
  return jax.tree.map(lambda x: x.astype(dtype), params)


def run(tx, params, state, steps=((0, 0), (2, 1), (1, 2))):
  """Applies a few (worker, grad seed) pushes without moving params."""
  outs = []
  for worker, seed in steps:
    updates, state = tx.update(
        grads_like(params, seed), state, params, worker=worker
    )
    outs.append(updates)
  return outs, state


@case_params
def test_compensation_changes_a_stale_gradient(case):
  """Guards the suite: with stale backups the update differs from lambda_=0."""
  params = make_params()
  tx, tx0 = case.make(), case.make_off()
  (u,), _ = run(tx, params, stale_state(tx, params), steps=((1, 0),))
  (u0,), _ = run(tx0, params, stale_state(tx0, params), steps=((1, 0),))
  diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), u, u0)
  assert max(jax.tree.leaves(diffs)) > 1e-3


@case_params
def test_update_under_jit_matches_eager(case):
  params = make_params()
  tx = case.make()
  state = stale_state(tx, params)
  eager, eager_state = run(tx, params, state)
  jitted_tx = optax.GradientTransformationExtraArgs(
      jax.jit(tx.init), jax.jit(tx.update)
  )
  jitted, jitted_state = run(jitted_tx, params, state)
  chex.assert_trees_all_close(jitted, eager, **TOL)
  chex.assert_trees_all_close(jitted_state, eager_state, **TOL)


def assert_a_donated_step_runs_from_init(tx, params, **extra):
  """``init``'s state owns each buffer once: a jitted update that donates it
  (as the Ray server and a training loop do) runs, and equals the plain
  update. Two leaves sharing one buffer fail with "donate the same buffer
  twice"."""
  state = tx.init(params)
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)
              if isinstance(x, jax.Array) and x.size]
  assert len(pointers) == len(set(pointers)), "init shares a buffer"
  want = tx.update(grads_like(params, 0), tx.init(params), params, **extra)
  step = jax.jit(lambda s, g: tx.update(g, s, params, **extra),
                 donate_argnums=0)
  got = step(state, grads_like(params, 0))
  chex.assert_trees_all_close(got, want, **TOL)


@case_params
def test_a_donated_update_runs_from_init(case):
  assert_a_donated_step_runs_from_init(case.make(), make_params(), worker=1)


@case_params
def test_vmap_over_independent_states_matches_a_loop(case):
  tx = case.make()
  batch = [shifted(make_params(), 0.2 * i) for i in range(3)]
  states = [stale_state(tx, p) for p in batch]
  grads = [grads_like(p, i) for i, p in enumerate(batch)]
  workers = jnp.array([0, 2, 1])
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  update = lambda g, s, p, w: tx.update(g, s, p, worker=w)
  got, got_state = jax.jit(jax.vmap(update))(
      stack(grads), stack(states), stack(batch), workers
  )
  want = [
      update(g, s, p, int(w))
      for g, s, p, w in zip(grads, states, batch, workers)
  ]
  chex.assert_trees_all_close(got, stack([u for u, _ in want]), **TOL)
  chex.assert_trees_all_close(got_state, stack([s for _, s in want]), **TOL)
  # vmap of init gives one independent state per example.
  chex.assert_trees_all_close(
      jax.vmap(tx.init)(stack(batch)), stack([tx.init(p) for p in batch]), **TOL
  )


@case_params
def test_inside_chain_matches_alone(case):
  params = make_params()
  tx = case.make()
  chained = optax.chain(optax.identity(), tx, optax.scale(2.0))
  state = stale_state(chained, params)
  got, got_state = run(chained, params, state)
  want, want_state = run(tx, params, state[1])
  chex.assert_trees_all_close(got, jax.tree.map(lambda u: 2 * u, want), **TOL)
  chex.assert_trees_all_close(got_state[1], want_state, **TOL)


@case_params
def test_inside_named_chain_matches_alone(case):
  params = make_params()
  tx = case.make()
  chained = optax.named_chain(("dc", tx), ("clip", optax.clip(1e6)))
  state = stale_state(chained, params)
  got, got_state = jax.jit(
      lambda s: run(chained, params, s)
  )(state)
  want, want_state = run(tx, params, state["dc"])
  chex.assert_trees_all_close(got, want, **TOL)
  chex.assert_trees_all_close(got_state["dc"], want_state, **TOL)


@case_params
def test_inject_hyperparams_strength_changes_behaviour(case):
  params = make_params()
  injected = optax.inject_hyperparams(
      case.factory, static_args=case.static_args
  )(**case.kwargs)
  state = stale_state(injected, params)
  assert set(state.hyperparams) >= {case.knob}
  chex.clear_trace_counter()
  step = jax.jit(
      chex.assert_max_traces(lambda s: run(injected, params, s), n=1)
  )
  got, _ = step(state)
  want, _ = run(case.make(), params, stale_state(case.make(), params))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  # Changing the hyperparameter in the state changes the behaviour, with
  # no rebuild: the off value gives the uncorrected updates.
  state.hyperparams[case.knob] = jnp.full_like(
      state.hyperparams[case.knob], case.off)
  got0, _ = step(state)
  want0, _ = run(case.make_off(), params, stale_state(case.make(), params))
  chex.assert_trees_all_close(got0, want0, rtol=1e-5, atol=1e-6)


@case_params
def test_multisteps_compensates_the_mean_gradient_every_k_steps(case):
  params = make_params()
  tx = case.make()
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  state = multi.init(params)
  state = state._replace(inner_opt_state=stale_state(tx, params))
  g1, g2 = grads_like(params, 1), grads_like(params, 2)
  step = jax.jit(lambda g, s, w: multi.update(g, s, params, worker=w))
  first, state1 = step(g1, state, 1)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(first))
  chex.assert_trees_all_equal(state1.inner_opt_state, state.inner_opt_state)
  second, state2 = step(g2, state1, 1)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  want, want_state = tx.update(mean, stale_state(tx, params), params, worker=1)
  chex.assert_trees_all_close(second, want, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(
      state2.inner_opt_state, want_state, rtol=1e-5, atol=1e-6
  )


@case_params
def test_apply_if_finite_skips_a_non_finite_gradient(case):
  params = make_params()
  tx = case.make()
  safe = optax.apply_if_finite(tx, max_consecutive_errors=5)
  state = safe.init(params)
  state = state._replace(inner_state=stale_state(tx, params))
  step = jax.jit(lambda g, s: safe.update(g, s, params, worker=1))
  bad = jax.tree.map(lambda g: g.at[...].set(jnp.nan), grads_like(params, 0))
  skipped, state1 = step(bad, state)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(skipped))
  assert int(state1.notfinite_count) == 1
  chex.assert_trees_all_equal(state1.inner_state, state.inner_state)
  good, state2 = step(grads_like(params, 0), state1)
  want, want_state = tx.update(
      grads_like(params, 0), state.inner_state, params, worker=1
  )
  chex.assert_trees_all_close(good, want, **TOL)
  chex.assert_trees_all_close(state2.inner_state, want_state, **TOL)


@case_params
def test_masked_compensates_and_records_only_masked_in_leaves(case):
  params = make_params()
  mask = {"dense": {"kernel": True, "bias": False}, "scale": True}
  tx = case.make()
  masked = optax.masked(tx, mask)
  state = masked.init(params)
  backups = dc_state(state).backups
  assert isinstance(backups["dense"]["bias"], optax.MaskedNode)
  # record_pull reaches into the masked state and writes masked-in leaves.
  state = dcasgd_optax.record_pull(state, shifted(params, -0.2), 2)
  held = dcasgd_optax.worker_params(state, 2)
  assert isinstance(held["dense"]["bias"], optax.MaskedNode)
  chex.assert_trees_all_close(held["scale"], params["scale"] - 0.2, **TOL)
  chex.assert_trees_all_close(
      held["dense"]["kernel"], params["dense"]["kernel"] - 0.2, **TOL
  )
  g = grads_like(params, 3)
  got, new_state = jax.jit(lambda s: masked.update(g, s, params, worker=2))(
      state
  )
  # Masked-out leaves pass through untouched; masked-in ones match tx alone
  # run on the masked-in part of the model.
  np.testing.assert_array_equal(got["dense"]["bias"], g["dense"]["bias"])
  sub = lambda t: {"kernel": t["dense"]["kernel"], "scale": t["scale"]}
  alone = tx.init(sub(params))
  alone = dcasgd_optax.record_pull(alone, sub(shifted(params, -0.2)), 2)
  want, want_state = tx.update(sub(g), alone, sub(params), worker=2)
  chex.assert_trees_all_close(sub(got), want, **TOL)
  got_backups = dc_state(new_state).backups
  assert isinstance(got_backups["dense"]["bias"], optax.MaskedNode)
  chex.assert_trees_all_close(
      sub(got_backups), dc_state(want_state).backups, **TOL
  )


@case_params
def test_accepts_unrelated_extra_args(case):
  params = make_params()
  tx = case.make()
  state = stale_state(tx, params)
  g = grads_like(params, 0)
  want, want_state = tx.update(g, state, params, worker=1)
  got, got_state = tx.update(
      g,
      state,
      params,
      worker=1,
      value=jnp.array(3.0),
      loss=1.5,
      key=jax.random.key(0),
  )
  chex.assert_trees_all_equal(got, want)
  chex.assert_trees_all_equal(got_state, want_state)


@case_params
def test_no_recompilation_when_only_the_worker_changes(case):
  params = make_params()
  tx = case.make()

  def make_step():
    return jax.jit(chex.assert_max_traces(update_step(tx), n=1))

  # Python ints and int32 arrays are different (weak vs strong) jit
  # signatures, so each kind gets its own jitted function.
  for ids in ((0, 2, 1, 2), tuple(jnp.int32(m) for m in (0, 2, 1, 2))):
    chex.clear_trace_counter()
    jitted = make_step()
    state = stale_state(tx, params)
    outs = set()
    for worker in ids:
      new_params, state = jitted(params, state, grads_like(params, 0), worker)
      outs.add(float(new_params["scale"]))
    assert len(outs) > 1  # the worker id did change the result


@case_params
def test_bf16_params_give_bf16_updates_and_f32_mean_square(case):
  params = make_params(jnp.bfloat16)
  tx = case.make()
  state = stale_state(tx, params)
  (u,), state = jax.jit(lambda s: run(tx, params, s, steps=((1, 0),)))(state)
  assert {x.dtype for x in jax.tree.leaves(u)} == {jnp.dtype(jnp.bfloat16)}
  dc = dc_state(state)
  assert {x.dtype for x in jax.tree.leaves(dc.backups)} == {
      jnp.dtype(jnp.bfloat16)
  }
  for x in jax.tree.leaves(dc.mean_square):
    assert x.dtype == jnp.float32
  assert (dc.mean_square == ()) == (not case.adaptive)
  f32 = dc_state(tx.init(make_params(jnp.float32))).mean_square
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(f32))


@case_params
def test_bf16_backups_stay_close_to_f32_backups(case):
  params = make_params()
  tx32 = case.make()
  tx16 = case.make(backup_dtype=jnp.bfloat16)
  s16 = tx16.init(params)
  assert {x.dtype for x in jax.tree.leaves(dc_state(s16).backups)} == {
      jnp.dtype(jnp.bfloat16)
  }
  u32, st32 = run(tx32, params, stale_state(tx32, params))
  u16, st16 = run(tx16, params, stale_state(tx16, params))
  assert {x.dtype for x in jax.tree.leaves(u16)} == {jnp.dtype(jnp.float32)}
  chex.assert_trees_all_close(u16, u32, rtol=2e-2, atol=2e-2)
  chex.assert_trees_all_close(
      dc_state(st16).backups, dc_state(st32).backups, rtol=1e-2, atol=1e-2
  )


@case_params
def test_record_pull_finds_the_state_nested_anywhere(case):
  params = make_params()
  tx = case.make()
  nested = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  wrapped = optax.MultiSteps(
      optax.chain(optax.named_chain(("inner", tx), ("opt", nested))), 2
  )
  state = wrapped.init(params)
  outer = {"a": [state, (jnp.ones(2),)], "b": None}
  outer = dcasgd_optax.record_pull(outer, shifted(params, 1.0), 1)
  held = dcasgd_optax.worker_params(outer, 1)
  chex.assert_trees_all_close(held, shifted(params, 1.0), **TOL)
  chex.assert_trees_all_close(
      dcasgd_optax.worker_params(outer, 0), params, **TOL
  )
  chex.assert_trees_all_close(outer["a"][1], (jnp.ones(2),), **TOL)


@case_params
def test_worker_params_returns_what_was_recorded(case):
  params = make_params()
  tx = case.make()
  state = tx.init(params)
  for m in range(NUM_WORKERS):
    chex.assert_trees_all_equal(dcasgd_optax.worker_params(state, m), params)
  recorded = shifted(params, 0.25)
  state = jax.jit(dcasgd_optax.record_pull)(state, recorded, jnp.int32(1))
  chex.assert_trees_all_equal(dcasgd_optax.worker_params(state, 1), recorded)
  for m in (0, 2):
    chex.assert_trees_all_equal(dcasgd_optax.worker_params(state, m), params)
  traced = jax.jit(dcasgd_optax.worker_params)(state, jnp.int32(1))
  chex.assert_trees_all_equal(traced, recorded)


@case_params
def test_update_records_the_pull_only_when_pulling_after_push(case):
  params = make_params()
  tx = case.make()
  state = stale_state(tx, params)
  before = dcasgd_optax.worker_params(state, 1)
  updates, state = tx.update(grads_like(params, 0), state, params, worker=1)
  held = dcasgd_optax.worker_params(state, 1)
  new_params = optax.apply_updates(params, updates)
  if case.look_ahead:  # The worker holds the prediction a pull sends.
    ahead, _ = dcasgd_optax.pull(state, new_params, 1)
    chex.assert_trees_all_equal(held, ahead)
    assert not np.allclose(ahead["scale"], new_params["scale"])
  elif case.pulls_after_push:
    chex.assert_trees_all_equal(held, new_params)
  else:
    chex.assert_trees_all_equal(held, before)
  for m in (0, 2):  # nobody else's backup moves
    chex.assert_trees_all_equal(
        dcasgd_optax.worker_params(state, m), shifted(params, -0.1 * m)
    )


def test_inject_hyperparams_dcasgd_with_zero_weight_decay_runs_under_jit():
  """weight_decay=0 becomes an array under inject_hyperparams; the chain's
  structure must not depend on whether that array is concrete (init) or
  traced (a jitted update)."""
  params = make_params()
  tx = optax.inject_hyperparams(
      dcasgd_optax.dcasgd, static_args=("num_workers", "adaptive")
  )(learning_rate=0.1, num_workers=NUM_WORKERS, lambda_=0.5)
  state = stale_state(tx, params)
  got, _ = jax.jit(lambda s: run(tx, params, s))(state)
  plain = dcasgd_optax.dcasgd(0.1, NUM_WORKERS, lambda_=0.5)
  want, _ = run(plain, params, stale_state(plain, params))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  state.hyperparams["weight_decay"] = jnp.asarray(0.5)
  decayed, _ = jax.jit(lambda s: run(tx, params, s))(state)
  plain = dcasgd_optax.dcasgd(0.1, NUM_WORKERS, lambda_=0.5, weight_decay=0.5)
  want, _ = run(plain, params, stale_state(plain, params))
  chex.assert_trees_all_close(decayed, want, rtol=1e-5, atol=1e-6)


# --- Chain pieces: the transformations that keep no backups ------------------
# scale_by_staleness, delayed_nesterov and look_ahead_momentum go after the
# backups-holding transformation in a chain; each keeps the same promises.


@dataclasses.dataclass(frozen=True)
class Piece:
  name: str
  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any]
  static_args: tuple[str, ...] = ()
  knob: str | None = None  # a numeric hyperparameter, and another value of it
  other: float = 0.0

  def make(self, **overrides):
    return self.factory(**{**self.kwargs, **overrides})


PIECES = [
    Piece("staleness_inverse", dcasgd_optax.scale_by_staleness,
          dict(rule="inverse")),
    Piece("staleness_sqrt", dcasgd_optax.scale_by_staleness,
          dict(rule="sqrt")),
    Piece("staleness_delay_adaptive", dcasgd_optax.scale_by_staleness,
          dict(rule="delay_adaptive", num_workers=2), ("num_workers",)),
    Piece("delayed_nesterov", dcasgd_optax.delayed_nesterov,
          dict(learning_rate=0.1, period=2, momentum=0.9,
               momentum_activation=0.25), ("period",), "momentum", 0.5),
    Piece("look_ahead_momentum", dcasgd_optax.look_ahead_momentum,
          dict(learning_rate=0.1, momentum=0.9, horizon=3), (),
          "learning_rate", 0.05),
    Piece("look_ahead_nesterov", dcasgd_optax.look_ahead_momentum,
          dict(learning_rate=0.1, momentum=0.99, horizon=3, nesterov=True),
          ("nesterov",), "momentum", 0.9),
    Piece("look_ahead_adam", dcasgd_optax.look_ahead_adam,
          dict(learning_rate=0.1, horizon=3), ("nesterov",),
          "learning_rate", 0.05),
    Piece("pipemare", dcasgd_optax.scale_by_pipemare, dict(num_steps=3),
          ("num_steps",)),
]

piece_params = pytest.mark.parametrize("piece", PIECES, ids=lambda p: p.name)


def run_piece(tx, params, state, staleness=(0, 3, 5, 1)):
  """Updates with fresh and stale gradients; returns the updates and state."""
  outs = []
  for seed, tau in enumerate(staleness):
    g = grads_like(params, seed)
    updates, state = tx.update(g, state, params, staleness=tau, worker=seed % 2)
    outs.append(updates)
  return outs, state


@piece_params
def test_piece_under_jit_matches_eager_and_keeps_bf16(piece):
  tx = piece.make()
  for dtype in (jnp.float32, jnp.bfloat16):
    params = make_params(dtype)
    eager, eager_state = run_piece(tx, params, tx.init(params))
    jitted, jitted_state = jax.jit(
        lambda s, p=params: run_piece(tx, p, s))(tx.init(params))
    tol = TOL if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
    chex.assert_trees_all_close(jitted, eager, **tol)
    chex.assert_trees_all_close(jitted_state, eager_state, **tol)
    assert {u.dtype for u in jax.tree.leaves(jitted)} == {jnp.dtype(dtype)}


@piece_params
def test_piece_a_donated_update_runs_from_init(piece):
  assert_a_donated_step_runs_from_init(piece.make(), make_params(),
                                       staleness=3, worker=1)


@piece_params
def test_piece_inside_chain_after_compensation_matches_alone(piece):
  params = make_params()
  tx = piece.make()
  dc = dcasgd_optax.delay_compensation(NUM_WORKERS, 0.0)
  chained = optax.chain(dc, tx, optax.scale(2.0))
  got, got_state = run_piece(chained, params, chained.init(params))
  want, want_state = run_piece(tx, params, tx.init(params))
  doubled = [jax.tree.map(lambda u: 2 * u, w) for w in want]
  chex.assert_trees_all_close(got, doubled, **TOL)
  chex.assert_trees_all_close(got_state[1], want_state, **TOL)


@piece_params
def test_piece_under_inject_hyperparams_is_the_plain_build(piece):
  params = make_params()
  injected = optax.inject_hyperparams(
      piece.factory, static_args=piece.static_args)(**piece.kwargs)
  state = injected.init(params)
  chex.clear_trace_counter()
  steps = jax.jit(chex.assert_max_traces(
      lambda s: run_piece(injected, params, s), n=1))
  got, _ = steps(state)
  plain = piece.make()
  want, _ = run_piece(plain, params, plain.init(params))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  if piece.knob is None:
    return
  # Changing the hyperparameter in the state changes the updates, no retrace.
  state.hyperparams[piece.knob] = jnp.full_like(
      state.hyperparams[piece.knob], piece.other)
  got, _ = steps(state)
  plain = piece.make(**{piece.knob: piece.other})
  want_other, _ = run_piece(plain, params, plain.init(params))
  chex.assert_trees_all_close(got, want_other, rtol=1e-5, atol=1e-6)
  assert not np.allclose(got[-1]["scale"], want[-1]["scale"])


@piece_params
def test_piece_accepts_unrelated_extra_args(piece):
  params = make_params()
  tx = piece.make()
  g = grads_like(params, 0)
  want, want_state = tx.update(g, tx.init(params), params, staleness=2)
  got, got_state = tx.update(g, tx.init(params), params, staleness=2,
                             worker=1, loss=1.5, key=jax.random.key(0))
  chex.assert_trees_all_equal(got, want)
  chex.assert_trees_all_equal(got_state, want_state)
