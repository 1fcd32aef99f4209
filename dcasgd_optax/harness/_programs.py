"""The traced pieces of an asynchronous replay, and its two ways to run.

A chunk is up to ``S`` arrivals of one run (no worker repeats): their
gradients are computed together, each at its worker's model on the device
that holds that worker's backup (``_plan``), then applied one by one, in
arrival order. ``"compiled"`` runs every chunk inside one program (a loop
over chunks); ``"host_chunks"`` calls one jitted program per chunk from
Python, in which the gradients are unrolled, not looped (see
:func:`_protocol.cpu_strategy`), with the state donated from call to call
so the backups are updated in place.

On one device ``tx`` updates the state itself, in place, and the worker's
pull (:func:`dcasgd_optax.pull`) is made once per arrival: by ``tx`` if its
state says that its update pulls (:func:`dcasgd_optax.extend.pulls_in_update`:
a :class:`dcasgd_optax.PullAfterPushState`, also under wrappers), else by
the simulator. On several devices the backups are sharded by worker and ``tx``
sees a stand-in: the arriving worker's row (brought from the device that
holds it) broadcast to all ``num_workers`` rows, which XLA does not
materialise as long as ``tx`` reads only that row by a dynamic slice and
what it writes to the stand-in is dropped. ``tx.update`` also gets that row
itself as the keyword extra argument ``held_params`` (what the worker
holds), so the library's transformations read no row of the stand-in: the
fused CPU update of :func:`dcasgd_optax.dcasgd`, which otherwise carries the
whole backups through its loop over blocks, then loops over that row alone.
After the update the pull is written to the worker's row on the device that
holds it.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcasgd_optax import extend
from dcasgd_optax import pull
from dcasgd_optax.harness import _devices
from dcasgd_optax.harness import _diagnostics
from dcasgd_optax.harness import _exact
from dcasgd_optax.harness import _gathers
from dcasgd_optax.harness import _per_example
from dcasgd_optax.harness import _slots
from dcasgd_optax.harness import _state


class Replay(NamedTuple):
  """What the traced replay closes over (static, built once per simulator)."""

  loss_with_state: Callable[..., Any]
  tx: Any  # the server's transformation (keeps the backups)
  mesh: Any
  vmap_slots: int | None
  diagnostics: _diagnostics.Diagnostics | None
  exact: float | None = None  # the exact compensation's lambda (_exact)
  push_grad_sq: bool = False  # workers push grad_sq too (_per_example)


class Chunk(NamedTuple):
  """One chunk's inputs and gradients, as the in-order updates read them."""

  workers: jax.Array  # int32 [S]: each slot's worker (replicated)
  arrival_slots: jax.Array  # int32 [S]: the slot of the k-th arrival
  sampled: jax.Array | None  # bool [S]: arrival k diagnosed
  batch: Any  # leaves [S, ...] (replicated)
  # Split over the devices, each slot on the device that computed it:
  loss: jax.Array  # [S]
  new_model_states: Any  # leaves [S, ...]
  grads: Any  # leaves [S, ...]


def _rows_per_device(tree_R: Any, mesh: Any) -> int:
  leaves = jax.tree.leaves(tree_R)
  return leaves[0].shape[0] // mesh.size if leaves else 1


def chunk_gradients(replay: Replay, state, workers_S, batch_S, *, unroll,
                    by_row=False):
  """Loss, new model state and gradient of every slot, each computed on the
  device that holds its worker, at the model it holds (its backup row).

  ``by_row``: slot ``j`` is the worker of row ``j`` (``_plan``), so the
  gradients are taken at the backups as they lie, with no gather.
  """
  backups = _state.backups_of(state.opt_state)
  rows = _rows_per_device(backups, replay.mesh)
  dtypes = jax.tree.map(lambda p: p.dtype, state.params)
  grad_fn = jax.value_and_grad(replay.loss_with_state, has_aux=True)

  def at(held, model_state, batch):
    params = jax.tree.map(lambda h, d: h.astype(d), held, dtypes)
    (loss, new_ms), grads = grad_fn(params, model_state, batch)
    if replay.push_grad_sq:
      grads = _per_example.push(replay.loss_with_state, params, model_state,
                                batch, grads)
    return loss, new_ms, grads

  def local(ids, backups_R, worker_ms_R, workers_S, batch_S):
    if by_row:
      return _slots.map_slots(at, (backups_R, worker_ms_R, batch_S),
                              replay.vmap_slots, unroll=unroll)

    def slot(worker, batch):
      row = worker - ids[0] * rows
      return at(jax.tree.map(lambda b: b[row], backups_R),
                jax.tree.map(lambda x: x[row], worker_ms_R), batch)

    return _slots.map_slots(
        slot, (workers_S, batch_S), replay.vmap_slots, unroll=unroll
    )

  split = (_devices.device_ids(replay.mesh), backups,
           state.worker_model_states, workers_S, batch_S)
  return _devices.spread(local, replay.mesh, (), split)


def write_rows(mesh: Any, tree_R: Any, value: Any, worker: jax.Array) -> Any:
  """``tree_R`` with row ``worker`` set to ``value``, on the device holding it.

  An in-place dynamic update (a device not holding the row writes back what
  it has), not a scatter: it stays a slice update when vmapped over
  simulations that share ``worker``.
  """
  rows = _rows_per_device(tree_R, mesh)
  if mesh.size == 1:
    return jax.tree.map(
        lambda x, v: jax.lax.dynamic_update_index_in_dim(
            x, v.astype(x.dtype), worker, 0), tree_R, value)

  def local(value, worker, ids, tree_R):
    row = worker - ids[0] * rows
    holds = jnp.logical_and(row >= 0, row < rows)
    row = jnp.clip(row, 0, rows - 1)

    def put(x, v):
      old = jax.lax.dynamic_index_in_dim(x, row, keepdims=False)
      new = jnp.where(holds, v.astype(x.dtype), old)
      return jax.lax.dynamic_update_index_in_dim(x, new, row, 0)

    return jax.tree.map(put, tree_R, value)

  return _devices.spread(local, mesh, (value, worker),
                         (_devices.device_ids(mesh), tree_R))


def _stand_in(held: Any, num_workers: int) -> Any:
  """Backups whose every row is ``held`` (a broadcast, never materialised)."""
  return jax.tree.map(
      lambda h: jnp.broadcast_to(h[None], (num_workers, *h.shape)), held
  )


def _server_view(replay: Replay, opt_state: Any, worker: jax.Array,
                 num_workers: int) -> tuple[Any, Any]:
  """The optimizer state ``tx.update`` sees, and what the worker holds if
  ``tx`` is to be told: on one device the state itself and None (``tx``
  reads the worker's row in place); on several, a stand-in for the backups
  sharded by worker and the arriving worker's row, brought from the device
  that holds it."""
  if replay.mesh.size == 1:
    return opt_state, None
  held = _devices.take(replay.mesh, _state.backups_of(opt_state), worker)
  return _state.with_backups(opt_state, _stand_in(held, num_workers)), held


def _extra_args(worker: jax.Array, tau: jax.Array, held: Any) -> dict:
  """The keyword extra arguments of ``tx.update`` for one arrival."""
  extra = dict(worker=worker, staleness=tau)
  if held is not None:  # The backups are a stand-in: here is the real row.
    extra["held_params"] = held
  return extra


def _pull(replay: Replay, before: Any, after: Any, params: Any,
          worker: jax.Array) -> Any:
  """The worker's pull of ``params``, once: on one device into ``after``
  itself (unless ``tx`` did it, as its state's structure says); on several,
  written to the worker's row of the real backups (``before``'s), on the
  device holding it."""
  if replay.mesh.size == 1:
    if not extend.pulls_in_update(after):
      _, after = pull(after, params, worker)
    return after
  pulled, after = pull(after, params, worker)
  backups = write_rows(replay.mesh, _state.backups_of(before), pulled, worker)
  return _state.with_backups(after, backups)


def _arrive(replay: Replay, chunk: Chunk, k, carry):
  """The server applies the chunk's ``k``-th arrival; its worker pulls."""
  state, record = carry
  slot = chunk.arrival_slots[k]
  pick = functools.partial(_devices.take, replay.mesh, index=slot)
  m = chunk.workers[slot]
  tau = state.step - state.last_pull[m]
  grads, pushed = _per_example.split(pick(chunk.grads))
  # No worker repeats in a chunk: its row is what it held when the chunk
  # began, unchanged until its own pull below.
  view, held = _server_view(replay, state.opt_state, m,
                             state.last_pull.shape[0])
  extra = _extra_args(m, tau, held) | pushed  # pushed: maybe grad_sq
  batch = jax.tree.map(lambda x: x[slot], chunk.batch)
  compensated = grads
  if replay.exact is not None:  # g + lambda H(held) (w - held), exactly
    if held is None:  # One device: the worker's row of the real backups.
      held = jax.tree.map(lambda b: b[m], _state.backups_of(view))
    compensated = _exact.compensate(replay.exact, replay.loss_with_state,
                                    held, state.params, batch, grads)
  entry = {"loss": pick(chunk.loss), "staleness": tau}
  if replay.diagnostics is not None:
    assert chunk.sampled is not None  # Passed whenever diagnostics are on.
    entry.update(_diagnostics.measure(
        replay.diagnostics, replay.loss_with_state,
        state._replace(opt_state=view), grads, batch, extra,
        chunk.sampled[k], compensated,
    ))
  updates, opt_state = replay.tx.update(compensated, view, state.params,
                                        **extra)
  params = optax.apply_updates(state.params, updates)
  model_state = pick(chunk.new_model_states)
  step = state.step + 1
  state = state._replace(
      params=params,
      opt_state=_pull(replay, state.opt_state, opt_state, params, m),
      model_state=model_state, step=step,
      worker_model_states=write_rows(
          replay.mesh, state.worker_model_states, model_state, m),
      last_pull=state.last_pull.at[m].set(step),
  )
  record = {key: record[key].at[k].set(v) for key, v in entry.items()}
  return state, record


def _empty_record(replay: Replay, size: int, loss_dtype) -> dict[str, Any]:
  """The per-arrival record before any arrival: diagnostics NaN."""
  record = {"loss": jnp.zeros((size,), loss_dtype),
            "staleness": jnp.zeros((size,), jnp.int32)}
  if replay.diagnostics is not None:
    record.update(_diagnostics.not_measured(size, replay.diagnostics))
  return record


def chunk_program(replay: Replay, state, workers_S, batch_S, arrival_slots_S,
                  length, sampled_S=None, *, unroll, by_row=False):
  """One chunk: its gradients, then its first ``length`` arrivals applied.

  Returns the new state and the record of the chunk's arrivals (entry ``k``
  for its ``k``-th arrival; entries past ``length`` are padding).
  """
  loss, new_ms, grads = chunk_gradients(
      replay, state, workers_S, batch_S, unroll=unroll, by_row=by_row
  )
  chunk = Chunk(workers_S, arrival_slots_S, sampled_S, batch_S, loss, new_ms,
                grads)
  record = _empty_record(replay, workers_S.shape[0], loss.dtype)
  return jax.lax.fori_loop(
      0, length, functools.partial(_arrive, replay, chunk), (state, record)
  )


def replay_program(replay: Replay, state, batches, starts, lengths,
                   num_chunks, slot_rows, slot_workers, arrival_slots,
                   sampled=None, *, loss_dtype, by_row=False):
  """The whole replay as one program: a loop over chunks ("compiled").

  Returns the new state and the record, one entry per arrival.
  """
  num_arrivals, num_slots = slot_rows.shape
  slot = jnp.arange(num_slots)

  def chunk_body(c, carry):
    state, record_A = carry
    start, length = starts[c], lengths[c]
    rows = jnp.minimum(start + slot, num_arrivals - 1)
    state, record = chunk_program(
        replay, state, slot_workers[c],
        jax.tree.map(lambda x: x[slot_rows[c]], batches), arrival_slots[c],
        length, None if sampled is None else sampled[rows], unroll=False,
        by_row=by_row,
    )
    at = jnp.where(slot < length, start + slot, num_arrivals)
    record_A = {
        key: x.at[at].set(record[key].astype(x.dtype), mode="drop")
        for key, x in record_A.items()
    }
    return state, record_A

  record_A = _empty_record(replay, num_arrivals, loss_dtype)
  return jax.lax.fori_loop(0, num_chunks, chunk_body, (state, record_A))


def replay_host_chunks(step, state, batches, plan, sampled=None, *,
                       many=False):
  """The replay as one call of ``step`` (a jitted, donating
  :func:`chunk_program`, vmapped over simulations if ``many``) per chunk of
  ``plan`` ("host_chunks").

  Returns the new state and the record, one entry per arrival (``[N, A]``
  per key if ``many``).
  """
  num_chunks, num_slots = plan.num_chunks, plan.chunk
  lengths = plan.lengths[:num_chunks]
  batched = many and plan.slot_rows.shape[0] > 1  # one order per simulation
  pick = (lambda a: a[:, :num_chunks]) if batched else (
      lambda a: a[0, :num_chunks])
  rows, workers, slots = (pick(plan.slot_rows), pick(plan.slot_workers),
                          pick(plan.arrival_slots))
  if many and not batched:  # the same rows of every simulation's batches
    num_sims = jax.tree.leaves(batches)[0].shape[0]
    rows = np.broadcast_to(rows, (num_sims, *rows.shape))
  if sampled is not None:
    at = np.minimum(plan.starts[:num_chunks, None] + np.arange(num_slots),
                    len(sampled) - 1)
    sampled = sampled[at]
  records = []
  for c, batch_S in enumerate(_gathers.split_chunks(batches, rows)):
    of_chunk = operator.itemgetter((slice(None), c) if batched else c)
    state, record = step(
        state, of_chunk(workers), batch_S, of_chunk(slots), lengths[c],
        None if sampled is None else sampled[c], by_row=plan.by_row,
    )
    records.append(record)
  # Entries past a chunk's length are padding: keep the arrivals' only.
  keep = np.flatnonzero(np.arange(num_slots)[None] < lengths[:, None])
  keys = list(records[0])
  joined = _gathers.concat_rows(
      tuple([r[key] for r in records] for key in keys), keep,
      axis=1 if many else 0,
  )
  return state, dict(zip(keys, joined))


def _sims_axis(shared: bool) -> int | None:
  """The simulations' axis of the per-slot arrays: none when all share them."""
  return None if shared else 0


def replay_many_program(replay: Replay, states, batches, starts, lengths,
                        num_chunks, slot_rows, slot_workers, arrival_slots,
                        sampled=None, *, loss_dtype, shared, by_row=False):
  """:func:`replay_program` for ``N`` simulations: their states and batches
  have a leading axis ``N``, the slot arrays too unless ``shared`` (one
  arrival order for all, so the workers' rows are read and written with
  plain slices); the chunks are shared, each a :func:`chunk_many_program`.
  """
  num_sims = jax.tree.leaves(batches)[0].shape[0]
  num_arrivals, num_slots = slot_rows.shape[-2:]
  slot = jnp.arange(num_slots)
  sims = _sims_axis(shared)
  take = jax.vmap(lambda b, r: jax.tree.map(lambda x: x[r], b),
                  in_axes=(0, sims))

  def chunk_body(c, carry):
    states, record_NA = carry
    start, length = starts[c], lengths[c]
    rows = jnp.minimum(start + slot, num_arrivals - 1)
    of = (lambda a: a[c]) if shared else (lambda a: a[:, c])
    states, record = chunk_many_program(
        replay, states, of(slot_workers), take(batches, of(slot_rows)),
        of(arrival_slots), length,
        None if sampled is None else sampled[rows], unroll=False,
        shared=shared, by_row=by_row,
    )
    at = jnp.where(slot < length, start + slot, num_arrivals)
    record_NA = {
        key: x.at[:, at].set(record[key].astype(x.dtype), mode="drop")
        for key, x in record_NA.items()
    }
    return states, record_NA

  record_NA = jax.tree.map(
      lambda x: jnp.broadcast_to(x, (num_sims, *x.shape)),
      _empty_record(replay, num_arrivals, loss_dtype))
  return jax.lax.fori_loop(0, num_chunks, chunk_body, (states, record_NA))


def chunk_many_program(replay: Replay, states, workers_S, batch_NxS,
                       arrival_slots_S, length, sampled_S=None, *, unroll,
                       shared, by_row=False):
  """:func:`chunk_program` for ``N`` simulations (shared length; see
  :func:`replay_many_program` for ``shared``).

  The ``N x S`` gradients are one vmapped call; then each simulation's
  arrivals are applied in turn (a loop over simulations), not vmapped: so
  each one's server state stays in cache through its arrivals, where
  vmapped updates would stream all ``N`` states through it per arrival.
  """
  sims = _sims_axis(shared)
  gradients = functools.partial(chunk_gradients, replay, unroll=unroll,
                                by_row=by_row)
  loss, new_ms, grads = jax.vmap(gradients, in_axes=(0, sims, 0))(
      states, workers_S, batch_NxS)
  num_sims = loss.shape[0]
  record = _empty_record(replay, loss.shape[1], loss.dtype)
  records = jax.tree.map(
      lambda x: jnp.broadcast_to(x, (num_sims, *x.shape)), record)

  def simulation(n, carry):
    states, records = carry
    of = lambda tree: jax.tree.map(lambda x: x[n], tree)
    per_sim = (lambda a: a) if shared else of
    chunk = Chunk(per_sim(workers_S), per_sim(arrival_slots_S), sampled_S,
                  of(batch_NxS), loss[n], of(new_ms), of(grads))
    state, record_n = jax.lax.fori_loop(
        0, length, functools.partial(_arrive, replay, chunk),
        (of(states), record))
    put = lambda tree, value: jax.tree.map(
        lambda x, v: jax.lax.dynamic_update_index_in_dim(x, v, n, 0),
        tree, value)
    return put(states, state), put(records, record_n)

  return jax.lax.fori_loop(0, num_sims, simulation, (states, records))
