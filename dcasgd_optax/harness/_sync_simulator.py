"""Synchronous SGD (SSGD), the baseline beside the asynchronous simulator."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcasgd_optax import record_pull
from dcasgd_optax.extend import find_states
from dcasgd_optax.harness import _checks
from dcasgd_optax.harness import _devices
from dcasgd_optax.harness import _gathers
from dcasgd_optax.harness import _plan
from dcasgd_optax.harness import _protocol
from dcasgd_optax.harness import _slots
from dcasgd_optax.harness._state import SimState


def _average_state(new_ms_W: Any) -> Any:
  """Floating leaves averaged over workers; others taken from worker 0."""

  def average(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      return jnp.mean(x, axis=0).astype(x.dtype)
    return x[0]

  return jax.tree.map(average, new_ms_W)


def _group_gradients(loss_with_state, mesh, vmap_slots, params, model_state,
                     batch_G, weights_G, *, unroll):
  """Losses, new model states and ``weights_G``-weighted sum of a group's
  gradients, all at ``params``."""
  grad_fn = jax.value_and_grad(loss_with_state, has_aux=True)

  def local(params, model_state, batch_G):
    def slot(batch):
      (loss, new_ms), grads = grad_fn(params, model_state, batch)
      return loss, new_ms, grads

    return _slots.map_slots(slot, (batch_G,), vmap_slots, unroll=unroll)

  shared = (params, model_state)
  loss_G, ms_G, grads_G = _devices.spread(local, mesh, shared, (batch_G,))
  # The sum as a contraction: XLA:CPU reduces a leading axis much slower.
  grads = jax.tree.map(
      lambda g: jnp.tensordot(weights_G.astype(g.dtype), g, axes=1), grads_G
  )
  return loss_G, ms_G, grads


def _apply(tx, num_workers, state, grads_N, ms_N):
  """The server's update with the sum of the groups' ``grads_N``; the new
  model state averages the workers' (the first ``num_workers`` slots)."""
  grads = jax.tree.map(lambda *g: functools.reduce(jnp.add, g), *grads_N)
  updates, opt_state = tx.update(
      grads, state.opt_state, state.params, worker=0, staleness=0
  )
  params = optax.apply_updates(state.params, updates)
  if find_states(opt_state):
    opt_state = record_pull(opt_state, params, 0)
  ms_S = jax.tree.map(lambda *x: jnp.concatenate(x)[:num_workers], *ms_N)
  step = state.step + 1
  last_pull = jnp.full((num_workers,), step, jnp.int32)
  return SimState(params, opt_state, _average_state(ms_S), (), step, last_pull)


def _sync_program(loss_with_state, tx, mesh, vmap_slots, num_workers, state,
                  batches, rows_RxNxG, weights_NxG):
  """A scan over rounds, each a scan over its groups summing the gradients.

  Returns the new state and every slot's loss, round-major (``[R*N*G]``).
  """

  def round_body(state, rows_NxG):
    def group_body(grads_sum, xs):
      rows_G, weights_G = xs
      loss_G, ms_G, grads = _group_gradients(
          loss_with_state, mesh, vmap_slots, state.params, state.model_state,
          jax.tree.map(lambda x: x[rows_G], batches), weights_G, unroll=False,
      )
      return jax.tree.map(jnp.add, grads_sum, grads), (loss_G, ms_G)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (loss_NxG, ms_NxG) = jax.lax.scan(
        group_body, zeros, (rows_NxG, weights_NxG)
    )
    ms_S = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), ms_NxG)
    state = _apply(tx, num_workers, state, [grads], [ms_S])
    return state, loss_NxG.reshape(-1)

  state, loss_RxS = jax.lax.scan(round_body, state, rows_RxNxG)
  return state, loss_RxS.reshape(-1)


def _fresh_by_construction(step_before_A: jax.Array, every: int,
                           curvature: bool = False) -> dict[str, jax.Array]:
  """SSGD's diagnostics: every gradient is the fresh one, so on sampled
  arrivals ``stale_cosine`` is 1 and ``stale_error`` 0 (no gradient is
  computed for them); ``applied_*`` are NaN, as the server transforms the
  round's mean, not each worker's gradient."""
  sampled = step_before_A % every == 0
  nan = jnp.full(step_before_A.shape, jnp.nan, jnp.float32)
  out = {
      "stale_cosine": jnp.where(sampled, 1.0, nan),
      "applied_cosine": nan,
      "stale_error": jnp.where(sampled, 0.0, nan),
      "applied_error": nan,
  }
  if curvature:  # no delay, no compensation term: k = 0 / 0
    out["curvature_ratio"] = nan
  return out


class SyncSimulator(_protocol.SimulatorBase):
  r"""Synchronous data-parallel SGD (SSGD) with the Simulator's interface.

  In each round all ``M`` workers compute a gradient at the same params, each
  on its own batch; the server applies one update with their mean:

  .. math::
    w \leftarrow w + \mathrm{tx.update}\Big(\frac{1}{M}\sum_{m} g_m(w)\Big)

  It has :class:`Simulator`'s interface: the same constructor arguments,
  ``tx``, ``init``, ``replay(state, batches, arrivals)``, ``describe`` and
  metric keys. Here ``arrivals`` says which worker computes which batch:
  each block of ``M`` consecutive arrivals is one round and holds every
  worker once (``None``: worker ``j`` computes batch ``r * M + j``). The
  update does not depend on the order inside a round (the gradients are
  summed in worker order), so ``arrivals`` only labels the metrics.

  A round's gradients are computed in groups of at most ``max_parallel``,
  each one batched call spread over ``devices``. ``tx`` is used as a plain
  optax optimizer; if it holds a DelayCompensationState (e.g.
  :func:`dcasgd_optax.dcasgd`, so one ``tx`` serves every method) it is
  called with ``worker=0`` and worker 0's backup is then set to the new
  params (:func:`dcasgd_optax.record_pull`: SSGD's workers compute at the
  server's model, never at a look-ahead), so the compensation term is zero
  and the update is exactly ``tx``'s SGD part;
  ``M`` is then read from its backups as in :class:`Simulator`.

  Stateful models (``has_model_state=True``): the model-state policy is the
  one of synchronous data parallelism with the buffers all-reduced after
  each step: every worker computes with the server's model state, and the
  new state is the round's workers' mean (floating leaves, e.g. BatchNorm
  running statistics) or worker 0's (other leaves, e.g. counters). Why: a
  round's ``M`` states all start from the same one and each saw one batch,
  so their mean uses every batch the update used (worker 0's alone would
  drop ``M - 1`` of them). :class:`Simulator` keeps the latest push instead
  (it has no rounds); both evaluate with ``state.model_state``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or the stateful form, see
      :class:`Simulator`).
    tx: an optax transformation.
    num_workers: workers per round (>= 1); optional when ``tx`` keeps
      per-worker backups (see :class:`Simulator`).
    devices: devices to spread a round's gradients over (default:
      ``jax.devices()``, those of every process).
    has_model_state: whether ``loss_fn`` takes and returns a model state.
    max_parallel: most gradients computed at once, per group of a round
      (default as in :class:`Simulator`); it never changes results beyond
      float rounding.
    vmap_slots: gradients per vmapped call on a device (see
      :class:`Simulator`); default all on GPU/TPU, one on CPU.
    donate: donate the input state to ``replay``.
    strategy: ``"compiled"``: one program, a scan over rounds (and over a
      round's groups). ``"host_chunks"``: Python loops over rounds; a
      round's groups are computed outside any loop, one jitted call each,
      then one jitted update (state donated). Default ``"host_chunks"`` on
      CPU (for every loss function: not measured per model as for
      :class:`Simulator`), ``"compiled"`` elsewhere.
    diagnostics, diagnostics_every, first_transform: as in
      :class:`Simulator`, so one caller builds both. SSGD's gradients are
      fresh by construction: sampled arrivals (a round is sampled when its
      server step before the update is a multiple of ``diagnostics_every``)
      report ``stale_cosine`` 1 and ``stale_error`` 0 with no extra
      gradient, and ``applied_*`` NaN, as the server transforms the round's
      mean, not each worker's gradient.
    diagnose_curvature: as in :class:`Simulator`; SSGD's gradients have no
      delay, so ``curvature_ratio`` is NaN.
    process_timeout: as in :class:`Simulator` (multi-process programs).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from dcasgd_optax.harness import SyncSimulator
    >>> loss_fn = lambda p, x: jnp.mean((x - p['w']) ** 2)
    >>> sim = SyncSimulator(loss_fn, optax.sgd(0.25), num_workers=2)
    >>> state = sim.init({'w': jnp.zeros(())})
    >>> batches = jnp.array([1.0, 3.0, 1.0, 3.0])
    >>> state, metrics = sim.replay(state, batches, [0, 1, 1, 0])
    >>> state.params['w'], metrics['staleness'].tolist()
    (Array(1.5, dtype=float32), [0, 0, 0, 0])
    >>> metrics['worker'].tolist(), metrics['step'].tolist()
    ([0, 1, 1, 0], [1, 1, 2, 2])
  """

  _per_worker = False

  def _server_tx(self, tx, num_workers):
    del num_workers
    return optax.with_extra_args_support(tx)

  def _make_programs(self) -> None:
    """The jitted programs, for one simulation and vmapped over ``N``."""
    program = functools.partial(
        _sync_program, self._loss_with_state, self.tx, self.mesh,
        self._vmap_slots)
    group_step = functools.partial(
        _group_gradients, self._loss_with_state, self.mesh, self._vmap_slots,
        unroll=True)
    apply_step = functools.partial(_apply, self.tx)
    donate = (1,) if self._donate else ()
    self._program = jax.jit(program, static_argnums=(0,),
                            donate_argnums=donate)
    self._group_step = jax.jit(group_step)
    self._apply_step = jax.jit(apply_step, static_argnums=(0,),
                               donate_argnums=(1,))
    # N simulations: states and batches with a leading axis N, one schedule.
    self._program_many = jax.jit(
        lambda m, *args: jax.vmap(functools.partial(program, m),
                                  in_axes=(0, 0, None, None))(*args),
        static_argnums=(0,), donate_argnums=donate)
    self._group_step_many = jax.jit(
        jax.vmap(group_step, in_axes=(0, 0, 0, None)))
    self._apply_step_many = jax.jit(
        lambda m, *args: jax.vmap(functools.partial(apply_step, m))(*args),
        static_argnums=(0,), donate_argnums=(1,))

  def _rounds(self, arrivals, params, num_workers) -> _plan.Rounds:
    limit = self._slot_limit(num_workers, params)
    return _plan.plan_rounds(arrivals, num_workers, limit, self.mesh.size)

  def describe(self, arrivals: Any, params: optax.Params, batches: Any = None,
               model_state: Any = None) -> dict[str, Any]:
    """How ``replay`` computes ``arrivals``' rounds for ``params``.

    ``num_runs`` is the number of rounds, each computed as groups of
    ``chunk`` slots (``num_chunks`` groups in all); ``fill_ratio`` is
    arrivals / slots computed; ``strategy`` is how the groups run.
    ``batches`` and ``model_state`` are accepted as by
    :meth:`Simulator.describe` and not needed (the strategy does not depend
    on ``loss_fn`` here).
    """
    del batches, model_state
    num_workers = self.workers_for(params)
    arrivals = _plan.check_rounds(arrivals, num_workers, 0)
    rounds = self._rounds(arrivals, params, num_workers)
    num_rounds, num_groups, group = rounds.rows_RxNxG.shape
    return dict(
        num_arrivals=len(arrivals), num_runs=num_rounds, chunk=group,
        num_chunks=num_rounds * num_groups,
        fill_ratio=len(arrivals) / rounds.rows_RxNxG.size,
        strategy=self.strategy,
    )

  def replay(
      self, state: SimState, batches: Any, arrivals: Any = None
  ) -> tuple[SimState, dict[str, jax.Array]]:
    """Runs ``R`` rounds of ``M`` gradients, one update each.

    Args:
      state: from :meth:`init` or a previous ``replay``.
      batches: a pytree whose leaves have leading axis ``len(arrivals)``
        (``R * M``); arrival ``k`` uses ``batches[k]``.
      arrivals: concrete 1-D integer array of worker ids, ``R`` rounds of
        ``M`` in which every worker arrives once; ``None`` (the default):
        worker ``j`` computes batch ``r * M + j``.

    Returns:
      ``(state, metrics)``, with :class:`Simulator`'s keys, one entry per
      arrival: ``"worker"``, ``"staleness"`` (all zeros), ``"loss"`` (each
      worker's loss at the round's params) and ``"step"`` (the server step
      after its round's update, 1-based); with diagnostics also their four
      keys (see ``diagnostics``).
    """
    return self._run(state, batches, arrivals, num_sims=None)

  def replay_many(
      self, states: SimState, batches: Any, arrivals: Any = None
  ) -> tuple[SimState, dict[str, jax.Array]]:
    """:meth:`replay` for ``N`` simulations as one program (as
    :meth:`Simulator.replay_many`; states from :meth:`init_many`).

    Args:
      states: every leaf with a leading axis ``N``.
      batches: leaves with leading axes ``[N, R * M]``.
      arrivals: one schedule of rounds for all simulations (``None``: worker
        ``j`` computes batch ``r * M + j``).

    Returns:
      ``(states, metrics)``, each metric ``[N, R * M]``.
    """
    return self._run(states, batches, arrivals,
                     num_sims=_checks.leading_axis("state", states))

  def _run(self, state, batches, arrivals, *, num_sims):
    many = num_sims is not None
    num_workers = self._check_state(state, num_sims)
    leaves = jax.tree.leaves(batches)
    num = np.shape(leaves[0])[int(many)] if leaves and np.ndim(
        leaves[0]) > int(many) else 0
    arrivals = _plan.check_rounds(arrivals, num_workers, num)
    one = state if not many else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state)
    self._check_batches(one, batches, len(arrivals),
                        leading=(num_sims,) if many else ())
    rounds = self._rounds(arrivals, one.params, num_workers)
    self._same_on_every_process(
        "replay_many" if many else "replay", arrivals=arrivals,
        batches=batches, state=state)
    batches = _devices.replicate(batches, self.mesh)
    if self.strategy == "compiled":
      program = self._program_many if many else self._program
      state, loss_slots = program(
          num_workers, state, batches, rounds.rows_RxNxG, rounds.weights_NxG
      )
    else:
      state, loss_slots = self._replay_host(state, batches, rounds,
                                            num_workers, num_sims)
    num_rounds = rounds.rows_RxNxG.shape[0]
    steps_A = np.repeat(np.arange(1 - num_rounds, 1), num_workers)
    final = state.step[:, None] if many else state.step
    if many:
      steps_A = steps_A[None]
    record = {
        "loss": loss_slots[..., rounds.loss_at],
        "staleness": jnp.zeros(loss_slots.shape[:-1] + (len(arrivals),),
                               jnp.int32),
    }
    if self._diagnostics is not None:
      record.update(_fresh_by_construction(
          final + jnp.asarray(steps_A - 1), self._diagnostics.every,
          self._diagnostics.curvature,
      ))
    if many:
      arrivals = np.broadcast_to(arrivals, (num_sims, arrivals.shape[-1]))
    return state, _protocol.stream_metrics(final, steps_A, arrivals, record)

  def _replay_host(self, state, batches, rounds, num_workers, num_sims):
    """``"host_chunks"``: per round, a jitted call per group, one update
    (each vmapped over the ``num_sims`` simulations, if not None)."""
    num_rounds, num_groups, group = rounds.rows_RxNxG.shape
    rows = rounds.rows_RxNxG.reshape(-1, group)
    many = num_sims is not None
    if many:
      rows = np.broadcast_to(rows, (num_sims, *rows.shape))
    group_step = self._group_step_many if many else self._group_step
    apply_step = self._apply_step_many if many else self._apply_step
    groups = _gathers.split_chunks(batches, rows)
    if not self._donate:
      state = _gathers.copy_tree(state)
    losses = []
    for r in range(num_rounds):
      outs = [
          group_step(
              state.params, state.model_state, groups[r * num_groups + g],
              rounds.weights_NxG[g],
          )
          for g in range(num_groups)
      ]
      losses += [loss_G for loss_G, _, _ in outs]
      state = apply_step(
          num_workers, state, [grads for *_, grads in outs],
          [ms for _, ms, _ in outs],
      )
    (loss,) = _gathers.concat_rows(
        (losses,), np.arange(len(losses) * group), axis=int(many))
    return state, loss
