"""The public API as users call it, type-checked by `make typecheck`.

Not a pytest module (nothing here runs): mypy reads it, so an annotation of
the library that is too narrow for ordinary use (a schedule, an array under
``optax.inject_hyperparams``, a bfloat16 backup dtype) fails the check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import dcasgd_optax
from dcasgd_optax import harness


def _loss(params: dict[str, jax.Array], batch: jax.Array) -> jax.Array:
  return jnp.sum(params["w"] * batch)


def transformations() -> list[optax.GradientTransformationExtraArgs]:
  schedule = optax.linear_schedule(0.1, 0.01, 100)
  return [
      dcasgd_optax.dcasgd(
          0.1, 4, lambda_=0.04, momentum=0.9, backup_dtype=jnp.bfloat16
      ),
      dcasgd_optax.dcasgd(schedule, 4, weight_decay=schedule),
      dcasgd_optax.gap_aware_asgd(0.1, 4, step_size=jnp.asarray(0.1)),
      dcasgd_optax.dana_dcasgd(0.1, 4, momentum=0.9, horizon=4),
      dcasgd_optax.delayed_nesterov_dcasgd(0.1, 4, period=4),
      dcasgd_optax.delay_compensation(
          4, jnp.asarray(2.0), adaptive=True, correction_clip=1.0
      ),
      dcasgd_optax.gap_aware(4, 0.1, backup_dtype="bfloat16"),
      dcasgd_optax.delayed_nesterov(schedule, 4, momentum=jnp.asarray(0.9)),
      dcasgd_optax.look_ahead_momentum(0.1, 0.9, 4),
      dcasgd_optax.scale_by_staleness("sqrt", num_workers=4),
      dcasgd_optax.scale_by_inverse_staleness(),
      dcasgd_optax.pull_after_push(optax.sgd(0.1)),
      dcasgd_optax.secant_compensation(
          4,
          jnp.asarray(0.5),
          decay=0.9,
          correction_clip=None,
          backup_dtype=jnp.bfloat16,
      ),
      dcasgd_optax.secant_dcasgd(schedule, 4, momentum=0.9),
  ]


def server_steps() -> optax.Params:
  params: optax.Params = {"w": jnp.zeros(3)}
  tx = dcasgd_optax.dcasgd(0.1, 4)
  state = tx.init(params)
  updates, state = tx.update(params, state, params, worker=1)
  params = optax.apply_updates(params, updates)
  pulled, state = dcasgd_optax.pull(state, params, 1)
  state = dcasgd_optax.record_pull(state, pulled, jnp.int32(2))
  return dcasgd_optax.worker_params(state, 2)


def simulation() -> dict[str, jax.Array]:
  params: optax.Params = {"w": jnp.zeros(3)}
  sim = harness.Simulator(_loss, dcasgd_optax.dcasgd(0.1, 4), 4)
  arrivals = harness.schedules.cyclic(4, 8)
  state, records = sim.replay(sim.init(params), jnp.ones((8, 3)), arrivals)
  del state
  return records
