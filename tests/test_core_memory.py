"""The backups are updated in place: one update costs the same for any num_workers.

No timing: XLA's own accounting of the compiled step is compared across
``num_workers``. With the state donated, the bytes the step reads and writes
(``cost_analysis``) and the bytes it allocates beyond its aliased inputs
(``memory_analysis``) must not grow with the number of backups, the backups
must be aliased input-to-output, and the HLO must hold no copy of a
``[num_workers, ...]`` buffer. The same checks are shown to fail on a step
that does copy (no donation) and on one that rewrites every backup.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import dcasgd_optax

SMALL, LARGE = 2, 16


def params_tree():
  return {"kernel": jnp.zeros((128, 256)), "bias": jnp.zeros(256)}


MODEL_BYTES = sum(x.nbytes for x in jax.tree.leaves(params_tree()))


def dcasgd_step(num_workers, adaptive=True):
  tx = dcasgd_optax.dcasgd(0.1, num_workers, adaptive=adaptive, momentum=0.9)

  def step(params, state, grads, worker):
    updates, state = tx.update(grads, state, params, worker=worker)
    return optax.apply_updates(params, updates), state

  return tx, step


def user_pull_step(num_workers):
  """delay_compensation in a user's chain, with a pull by another worker."""
  tx = optax.chain(
      dcasgd_optax.delay_compensation(num_workers, 0.04), optax.sgd(0.1)
  )

  def step(params, state, grads, worker):
    updates, state = tx.update(grads, state, params, worker=worker)
    params = optax.apply_updates(params, updates)
    puller = (worker + 1) % num_workers
    return params, dcasgd_optax.record_pull(state, params, puller)

  return tx, step


def full_rewrite_step(num_workers):
  """A deliberately wrong pull: rewrites every backup through a select."""
  tx = optax.chain(
      dcasgd_optax.delay_compensation(num_workers, 0.04), optax.sgd(0.1)
  )

  def step(params, state, grads, worker):
    updates, state = tx.update(grads, state, params, worker=worker)
    params = optax.apply_updates(params, updates)
    dc = state[0]
    one_hot = jnp.arange(num_workers) == worker
    backups = jax.tree.map(
        lambda b, p: jnp.where(
            one_hot.reshape((num_workers,) + (1,) * p.ndim), p[None], b
        ),
        dc.backups,
        params,
    )
    return params, (dc._replace(backups=backups),) + tuple(state[1:])

  return tx, step


STEPS = {
    "dcasgd_a": dcasgd_step,
    "dcasgd_c": lambda n: dcasgd_step(n, adaptive=False),
    "user_pull": user_pull_step,
}


def compile_step(make_step, num_workers, donate):
  tx, step = make_step(num_workers)
  params = params_tree()
  state = tx.init(params)
  jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  compiled = jitted.lower(params, state, params, jnp.int32(0)).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return compiled, cost, compiled.memory_analysis()


def backup_copies(compiled, num_workers):
  """HLO `copy` instructions whose result has a leading num_workers axis."""
  pattern = re.compile(rf"= \w+\[{num_workers},[^\]]*\]\S* copy\(")
  return [line for line in compiled.as_text().splitlines() if pattern.search(line)]


def growth(make_step, donate):
  """How much bytes accessed / extra allocation grow from SMALL to LARGE."""
  small = compile_step(make_step, SMALL, donate)
  large = compile_step(make_step, LARGE, donate)

  def unaliased(memory):
    return memory.output_size_in_bytes - memory.alias_size_in_bytes

  return dict(
      bytes_accessed=large[1]["bytes accessed"] - small[1]["bytes accessed"],
      unaliased_output=unaliased(large[2]) - unaliased(small[2]),
      temp=large[2].temp_size_in_bytes - small[2].temp_size_in_bytes,
  )


@pytest.mark.parametrize("make_step", STEPS.values(), ids=STEPS)
def test_donated_update_cost_does_not_grow_with_num_workers(make_step):
  grown = growth(make_step, donate=True)
  # A copy of the extra backups would add (LARGE - SMALL) models' worth.
  for what, extra in grown.items():
    assert abs(extra) < 0.1 * MODEL_BYTES, (what, extra, MODEL_BYTES)


@pytest.mark.parametrize("make_step", STEPS.values(), ids=STEPS)
def test_donated_update_aliases_the_backups_and_never_copies_them(make_step):
  compiled, _, memory = compile_step(make_step, LARGE, donate=True)
  backups_bytes = LARGE * MODEL_BYTES
  assert memory.alias_size_in_bytes >= backups_bytes
  assert backup_copies(compiled, LARGE) == []


@pytest.mark.parametrize("make_step", STEPS.values(), ids=STEPS)
def test_without_donation_the_same_checks_see_the_copy(make_step):
  """The checks above can fail: without donation XLA must copy the backups."""
  grown = growth(make_step, donate=False)
  extra_backups = (LARGE - SMALL) * MODEL_BYTES
  assert grown["bytes_accessed"] >= extra_backups
  assert grown["unaliased_output"] >= extra_backups
  compiled, _, memory = compile_step(make_step, LARGE, donate=False)
  assert memory.alias_size_in_bytes == 0
  assert backup_copies(compiled, LARGE)


def test_a_pull_that_rewrites_every_backup_is_caught_even_when_donated():
  """An O(num_workers) pull (select over all backups) fails the cost check."""
  grown = growth(full_rewrite_step, donate=True)
  assert grown["bytes_accessed"] >= (LARGE - SMALL) * MODEL_BYTES


def test_donated_record_pull_alone_writes_one_slice():
  def compile_pull(num_workers):
    state = dcasgd_optax.delay_compensation(num_workers).init(params_tree())
    jitted = jax.jit(dcasgd_optax.record_pull, donate_argnums=0)
    compiled = jitted.lower(state, params_tree(), jnp.int32(0)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, cost["bytes accessed"]

  (_, small_bytes), (large, large_bytes) = map(compile_pull, (SMALL, LARGE))
  assert abs(large_bytes - small_bytes) < 0.1 * MODEL_BYTES
  # Reading the new params, then one slice read-modify-written: about three
  # models' worth, against LARGE models for a copy of the backups.
  assert large_bytes < 4 * MODEL_BYTES
  assert backup_copies(large, LARGE) == []
