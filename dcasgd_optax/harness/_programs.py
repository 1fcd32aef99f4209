"""The traced pieces of an asynchronous replay, and its two ways to run.

A chunk is up to ``L`` arrivals of one run (no worker repeats): their ``L``
gradients are computed together, each at its worker's model, then applied
one by one, in arrival order. ``"compiled"`` runs every chunk inside one
program (a loop over chunks); ``"host_chunks"`` calls one jitted program per
chunk from Python, in which the ``L`` gradients are unrolled, not looped (see
:func:`_protocol.default_strategy`), with the state donated from call
to call so the backups are updated in place.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcasgd_optax._src.pull import find_states
from dcasgd_optax._src.pull import pull
from dcasgd_optax.harness import _devices
from dcasgd_optax.harness import _diagnostics
from dcasgd_optax.harness import _gathers
from dcasgd_optax.harness import _slots


class Replay(NamedTuple):
  """What the traced replay closes over (static, built once per simulator)."""

  loss_with_state: Callable[..., Any]
  tx: Any  # the server's transformation (keeps the backups)
  mesh: Any
  vmap_slots: int | None
  tx_pulls: bool  # tx pulls inside its update (a PullAfterPush)
  diagnostics: _diagnostics.Diagnostics | None


def chunk_gradients(replay: Replay, state, workers_L, batch_L, *, unroll):
  """Loss, new model state and gradient of every slot, at its worker's model."""
  backups = find_states(state.opt_state)[0].backups
  dtypes = jax.tree.map(lambda p: p.dtype, state.params)
  grad_fn = jax.value_and_grad(replay.loss_with_state, has_aux=True)

  def local(backups_W, worker_ms_W, workers_L, batch_L):
    def slot(worker, batch):
      snap = jax.tree.map(lambda b, d: b[worker].astype(d), backups_W, dtypes)
      model_state = jax.tree.map(lambda x: x[worker], worker_ms_W)
      (loss, new_ms), grads = grad_fn(snap, model_state, batch)
      return loss, new_ms, grads

    return _slots.map_slots(
        slot, (workers_L, batch_L), replay.vmap_slots, unroll=unroll
    )

  shared = (backups, state.worker_model_states)
  return _devices.per_worker(local, replay.mesh, shared, (workers_L, batch_L))


def _arrive(replay: Replay, workers_L, grads_L, new_ms_L, batch_L, k, carry):
  """The server applies slot ``k``'s gradient; its worker pulls the result.

  The pull is :func:`dcasgd_optax.pull` (the worker then holds what it
  returns, e.g. a look-ahead), done here unless ``replay.tx_pulls``: ``tx``
  did it inside its update already, and once is enough. Slot ``k``'s
  staleness (and diagnostics) go into the per-slot ``record_L``.
  """
  state, record_L = carry
  m = workers_L[k]
  tau = state.step - state.last_pull[m]
  grads = jax.tree.map(lambda g: g[k], grads_L)
  record = {"staleness": tau}
  if replay.diagnostics is not None:
    record.update(_diagnostics.measure(
        replay.diagnostics, replay.loss_with_state, state, grads,
        jax.tree.map(lambda x: x[k], batch_L), m, tau,
    ))
  updates, opt_state = replay.tx.update(
      grads, state.opt_state, state.params, worker=m, staleness=tau
  )
  params = optax.apply_updates(state.params, updates)
  if not replay.tx_pulls:
    _, opt_state = pull(opt_state, params, m)
  model_state = jax.tree.map(lambda x: x[k], new_ms_L)
  worker_ms = jax.tree.map(
      lambda w, x: w.at[m].set(x), state.worker_model_states, model_state
  )
  step = state.step + 1
  state = state._replace(
      params=params, opt_state=opt_state, model_state=model_state,
      worker_model_states=worker_ms, step=step,
      last_pull=state.last_pull.at[m].set(step),
  )
  record_L = {key: record_L[key].at[k].set(v) for key, v in record.items()}
  return state, record_L


def _empty_record(replay: Replay, num_slots: int) -> dict[str, jax.Array]:
  """The per-slot record before any arrival: staleness 0, diagnostics NaN."""
  record = {"staleness": jnp.zeros((num_slots,), jnp.int32)}
  if replay.diagnostics is not None:
    record.update(_diagnostics.not_measured(num_slots))
  return record


def chunk_program(replay: Replay, state, workers_L, batch_L, length, *,
                  unroll):
  """One chunk: its gradients, then its first ``length`` arrivals applied.

  Returns the new state and the per-slot record (``"loss"``,
  ``"staleness"``, the diagnostics; past ``length`` slots are padding).
  """
  loss_L, new_ms_L, grads_L = chunk_gradients(
      replay, state, workers_L, batch_L, unroll=unroll
  )
  arrive = functools.partial(
      _arrive, replay, workers_L, grads_L, new_ms_L, batch_L
  )
  record_L = _empty_record(replay, workers_L.shape[0])
  state, record_L = jax.lax.fori_loop(0, length, arrive, (state, record_L))
  return state, {"loss": loss_L, **record_L}


def replay_program(replay: Replay, state, batches, arrivals, starts, lengths,
                   num_chunks, *, chunk, loss_dtype):
  """The whole replay as one program: a loop over chunks ("compiled").

  Returns the new state and the record, one entry per arrival.
  """
  num_arrivals = arrivals.shape[0]

  def chunk_body(c, carry):
    state, record_A = carry
    start, length = starts[c], lengths[c]
    slot = jnp.arange(chunk)
    rows = jnp.minimum(start + slot, num_arrivals - 1)
    state, record_L = chunk_program(
        replay, state, arrivals[rows],
        jax.tree.map(lambda x: x[rows], batches), length, unroll=False,
    )
    at = jnp.where(slot < length, start + slot, num_arrivals)
    record_A = {
        key: x.at[at].set(record_L[key].astype(x.dtype), mode="drop")
        for key, x in record_A.items()
    }
    return state, record_A

  record_A = {"loss": jnp.zeros((num_arrivals,), loss_dtype),
              **_empty_record(replay, num_arrivals)}
  return jax.lax.fori_loop(0, num_chunks, chunk_body, (state, record_A))


def replay_host_chunks(step, state, batches, arrivals, plan):
  """The replay as one call of ``step`` (a jitted, donating
  :func:`chunk_program`) per chunk of ``plan`` ("host_chunks").

  Returns the new state and the record, one entry per arrival.
  """
  chunk, num_chunks = plan.chunk, plan.num_chunks
  starts, lengths = plan.starts[:num_chunks], plan.lengths[:num_chunks]
  rows_CxL = np.minimum(
      starts[:, None] + np.arange(chunk, dtype=np.int32), len(arrivals) - 1
  )
  workers_CxL = arrivals[rows_CxL]
  records = []
  for c, batch_L in enumerate(_gathers.split_chunks(batches, rows_CxL)):
    state, record_L = step(state, workers_CxL[c], batch_L, lengths[c])
    records.append(record_L)
  # Slots past a chunk's length are padding: keep the arrivals' only.
  keep = np.flatnonzero(np.arange(chunk)[None] < lengths[:, None])
  keys = list(records[0])
  joined = _gathers.concat_rows(
      tuple([r[key] for r in records] for key in keys), keep
  )
  return state, dict(zip(keys, joined))
