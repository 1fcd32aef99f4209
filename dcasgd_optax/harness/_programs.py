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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcasgd_optax._src.pull import find_states
from dcasgd_optax._src.pull import pull
from dcasgd_optax.harness import _devices
from dcasgd_optax.harness import _gathers
from dcasgd_optax.harness import _slots


def chunk_gradients(loss_with_state, mesh, vmap_slots, state, workers_L,
                    batch_L, *, unroll):
  """Loss, new model state and gradient of every slot, at its worker's model."""
  backups = find_states(state.opt_state)[0].backups
  dtypes = jax.tree.map(lambda p: p.dtype, state.params)
  grad_fn = jax.value_and_grad(loss_with_state, has_aux=True)

  def local(backups_W, worker_ms_W, workers_L, batch_L):
    def slot(worker, batch):
      snap = jax.tree.map(lambda b, d: b[worker].astype(d), backups_W, dtypes)
      model_state = jax.tree.map(lambda x: x[worker], worker_ms_W)
      (loss, new_ms), grads = grad_fn(snap, model_state, batch)
      return loss, new_ms, grads

    return _slots.map_slots(
        slot, (workers_L, batch_L), vmap_slots, unroll=unroll
    )

  shared = (backups, state.worker_model_states)
  return _devices.per_worker(local, mesh, shared, (workers_L, batch_L))


def _arrive(tx, tx_pulls, workers_L, grads_L, new_ms_L, k, carry):
  """The server applies slot ``k``'s gradient; its worker pulls the result.

  The pull is :func:`dcasgd_optax.pull` (the worker then holds what it
  returns, e.g. a look-ahead), done here unless ``tx_pulls``: ``tx`` did it
  inside its update already, and once is enough.
  """
  state, staleness_L = carry
  m = workers_L[k]
  tau = state.step - state.last_pull[m]
  grads = jax.tree.map(lambda g: g[k], grads_L)
  updates, opt_state = tx.update(
      grads, state.opt_state, state.params, worker=m, staleness=tau
  )
  params = optax.apply_updates(state.params, updates)
  if not tx_pulls:
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
  return state, staleness_L.at[k].set(tau)


def chunk_program(loss_with_state, tx, mesh, vmap_slots, state, workers_L,
                  batch_L, length, *, unroll, tx_pulls):
  """One chunk: its gradients, then its first ``length`` arrivals applied.

  Returns the new state, the slots' losses and staleness (0 past
  ``length``).
  """
  loss_L, new_ms_L, grads_L = chunk_gradients(
      loss_with_state, mesh, vmap_slots, state, workers_L, batch_L,
      unroll=unroll,
  )
  arrive = functools.partial(_arrive, tx, tx_pulls, workers_L, grads_L,
                             new_ms_L)
  staleness_L = jnp.zeros(workers_L.shape, jnp.int32)
  state, staleness_L = jax.lax.fori_loop(
      0, length, arrive, (state, staleness_L)
  )
  return state, loss_L, staleness_L


def replay_program(loss_with_state, tx, mesh, vmap_slots, state, batches,
                   arrivals, starts, lengths, num_chunks, *, chunk, loss_dtype,
                   tx_pulls):
  """The whole replay as one program: a loop over chunks ("compiled").

  Returns the new state, each arrival's loss and staleness.
  """
  num_arrivals = arrivals.shape[0]

  def chunk_body(c, carry):
    state, loss_A, staleness_A = carry
    start, length = starts[c], lengths[c]
    slot = jnp.arange(chunk)
    rows = jnp.minimum(start + slot, num_arrivals - 1)
    state, loss_L, staleness_L = chunk_program(
        loss_with_state, tx, mesh, vmap_slots, state, arrivals[rows],
        jax.tree.map(lambda x: x[rows], batches), length, unroll=False,
        tx_pulls=tx_pulls,
    )
    at = jnp.where(slot < length, start + slot, num_arrivals)
    loss_A = loss_A.at[at].set(loss_L.astype(loss_dtype), mode="drop")
    staleness_A = staleness_A.at[at].set(staleness_L, mode="drop")
    return state, loss_A, staleness_A

  init = (
      state,
      jnp.zeros((num_arrivals,), loss_dtype),
      jnp.zeros((num_arrivals,), jnp.int32),
  )
  state, loss_A, staleness_A = jax.lax.fori_loop(
      0, num_chunks, chunk_body, init
  )
  return state, loss_A, staleness_A


def replay_host_chunks(step, state, batches, arrivals, plan):
  """The replay as one call of ``step`` (a jitted, donating
  :func:`chunk_program`) per chunk of ``plan`` ("host_chunks").

  Returns the new state, each arrival's loss and staleness.
  """
  chunk, num_chunks = plan.chunk, plan.num_chunks
  starts, lengths = plan.starts[:num_chunks], plan.lengths[:num_chunks]
  rows_CxL = np.minimum(
      starts[:, None] + np.arange(chunk, dtype=np.int32), len(arrivals) - 1
  )
  workers_CxL = arrivals[rows_CxL]
  losses, taus = [], []
  for c, batch_L in enumerate(_gathers.split_chunks(batches, rows_CxL)):
    state, loss_L, staleness_L = step(
        state, workers_CxL[c], batch_L, lengths[c]
    )
    losses.append(loss_L)
    taus.append(staleness_L)
  # Slots past a chunk's length are padding: keep the arrivals' only.
  keep = np.flatnonzero(np.arange(chunk)[None] < lengths[:, None])
  loss, staleness = _gathers.concat_rows((losses, taus), keep)
  return state, loss, staleness
