"""Synchronous SGD (SSGD), the baseline beside the asynchronous simulator."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcasgd_optax._src.pull import find_states
from dcasgd_optax._src.pull import record_pull
from dcasgd_optax.harness import _checks
from dcasgd_optax.harness import _devices
from dcasgd_optax.harness import _gathers
from dcasgd_optax.harness import _setup
from dcasgd_optax.harness import _slots
from dcasgd_optax.harness import _state
from dcasgd_optax.harness._state import SimState


def _average_state(new_ms_W: Any) -> Any:
  """Floating leaves averaged over workers; others taken from worker 0."""

  def average(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      return jnp.mean(x, axis=0).astype(x.dtype)
    return x[0]

  return jax.tree.map(average, new_ms_W)


def _group_gradients(loss3, mesh, vmap_slots, unroll, params, model_state,
                     batch_G, weights_G):
  """Losses, new model states and ``weights_G``-weighted sum of a group's
  gradients, all at ``params``."""
  grad_fn = jax.value_and_grad(loss3, has_aux=True)

  def local(params, model_state, batch_G):
    def slot(batch):
      (loss, new_ms), grads = grad_fn(params, model_state, batch)
      return loss, new_ms, grads

    return _slots.map_slots(slot, (batch_G,), vmap_slots, unroll)

  shared = (params, model_state)
  loss_G, ms_G, grads_G = _devices.per_worker(local, mesh, shared, (batch_G,))
  # The sum as a contraction: XLA:CPU reduces a leading axis 40x slower.
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


def _weights(num_workers: int, slots: int) -> np.ndarray:
  """``1 / num_workers`` for the workers' slots, 0 for padding."""
  return np.where(np.arange(slots) < num_workers, 1.0 / num_workers, 0.0)


def _sync_program(loss3, tx, mesh, vmap_slots, num_workers, slots, state,
                  batches):
  """A scan over rounds; round ``r`` uses batches ``r*W .. r*W + W - 1``."""
  num_rounds = jax.tree.leaves(batches)[0].shape[0] // num_workers
  batches_RW = jax.tree.map(
      lambda x: x.reshape(num_rounds, num_workers, *x.shape[1:]), batches
  )
  rows = np.minimum(np.arange(slots), num_workers - 1)
  weights_S = jnp.asarray(_weights(num_workers, slots), jnp.float32)

  def body(state, batch_W):
    batch_S = jax.tree.map(lambda x: x[rows], batch_W)
    loss_S, ms_S, grads = _group_gradients(
        loss3, mesh, vmap_slots, False, state.params, state.model_state,
        batch_S, weights_S,
    )
    state = _apply(tx, num_workers, state, [grads], [ms_S])
    return state, loss_S[:num_workers]

  state, loss_RW = jax.lax.scan(body, state, batches_RW)
  loss = loss_RW.reshape(-1)
  return state, {"loss": loss, "staleness": jnp.zeros(loss.shape, jnp.int32)}


class SyncSimulator:
  r"""Synchronous data-parallel SGD (SSGD) with the Simulator's interface.

  In each round all ``num_workers`` workers compute a gradient at the same
  params, each on its own batch; the server applies one update with their
  mean:

  .. math::
    w \leftarrow w + \mathrm{tx.update}\Big(\frac{1}{M}\sum_{m} g_m(w)\Big)

  A round's gradients are one batched call spread over ``devices``. ``tx`` is
  used as a plain optax optimizer; if it holds a DelayCompensationState (e.g.
  :func:`dcasgd_optax.dcasgd`, so one ``tx`` serves every method) it is
  called with ``worker=0`` and worker 0's pull is recorded, so the
  compensation term is zero and the update is exactly ``tx``'s SGD part.

  Stateful models (``has_model_state=True``): every worker computes with the
  server's model state; the new state is the workers' mean (floating leaves)
  or worker 0's (other leaves).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or the stateful form, see
      :class:`Simulator`).
    tx: an optax transformation.
    num_workers: workers per round (>= 1).
    devices: devices to spread a round's gradients over (default: all local).
    has_model_state: whether ``loss_fn`` takes and returns a model state.
    vmap_slots: gradients per vmapped call on a device (see
      :class:`Simulator`); default all on GPU/TPU, one on CPU.
    donate: donate the input state to ``replay``.
    strategy: ``"compiled"``: one program, a scan over rounds.
      ``"host_chunks"``: Python loops over rounds; a round's gradients are
      computed outside any loop, in jitted calls of at most 8 per device,
      then one jitted update (state donated). Default ``"host_chunks"`` on
      CPU, ``"compiled"`` elsewhere (see :class:`Simulator`).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from dcasgd_optax.harness import SyncSimulator
    >>> loss_fn = lambda p, x: jnp.mean((x - p['w']) ** 2)
    >>> sim = SyncSimulator(loss_fn, optax.sgd(0.25), num_workers=2)
    >>> state = sim.init({'w': jnp.zeros(())})
    >>> state, metrics = sim.replay(state, jnp.array([1.0, 3.0, 1.0, 3.0]))
    >>> state.params['w'], metrics['staleness'].tolist()
    (Array(1.5, dtype=float32), [0, 0, 0, 0])
  """

  def __init__(
      self,
      loss_fn: Callable[..., Any],
      tx: optax.GradientTransformation,
      num_workers: int,
      *,
      devices: Sequence[Any] | None = None,
      has_model_state: bool = False,
      vmap_slots: int | None = None,
      donate: bool = True,
      strategy: str | None = None,
  ):
    s = _setup.setup(loss_fn, tx, num_workers, devices, has_model_state,
                     vmap_slots, strategy)
    self.num_workers, self._loss3, self.mesh = s.num_workers, s.loss3, s.mesh
    vmap_slots, self.strategy = s.vmap_slots, s.strategy
    self._has_model_state = has_model_state
    self.tx = optax.with_extra_args_support(tx)
    slots = _devices.round_up(self.num_workers, self.mesh.size)
    self._donate = donate
    self._program = jax.jit(
        functools.partial(
            _sync_program, self._loss3, self.tx, self.mesh, vmap_slots,
            self.num_workers, slots,
        ),
        donate_argnums=(0,) if donate else (),
    )
    # "host_chunks": rounds of ``_num_groups`` equal groups of ``_group``
    # slots, each at most the cap, padded as little as possible.
    cap = _setup.HOST_SLOTS_PER_DEVICE * self.mesh.size
    self._num_groups = -(-slots // cap)
    self._group = _devices.round_up(-(-slots // self._num_groups), self.mesh.size)
    self._group_step = jax.jit(functools.partial(
        _group_gradients, self._loss3, self.mesh, vmap_slots, True
    ))
    self._apply_step = jax.jit(
        functools.partial(_apply, self.tx, self.num_workers),
        donate_argnums=(0,),
    )
    self._loss_checked: dict[Any, Any] = {}

  def init(self, params: Any, model_state: Any = None) -> SimState:
    """The initial state (no ``worker_model_states``: all hold the server's)."""
    model_state = _checks.check_model_state(model_state, self._has_model_state)
    return _state.initial_state(
        SimState, self.tx, self.num_workers, self.mesh, params, model_state,
        per_worker_model_state=False,
    )

  def replay(
      self, state: SimState, batches: Any
  ) -> tuple[SimState, dict[str, jax.Array]]:
    """Runs ``R`` rounds, where ``R * num_workers`` is the batches' length.

    Args:
      state: from :meth:`init` or a previous ``replay``.
      batches: a pytree whose leaves have leading axis ``R * num_workers``;
        round ``r`` gives worker ``j`` batch ``r * num_workers + j``.

    Returns:
      ``(state, metrics)``; ``metrics["loss"]`` (length ``R * num_workers``,
      round-major) is each worker's loss at the round's params and
      ``metrics["staleness"]`` is all zeros.
    """
    leaves = jax.tree.leaves(batches)
    num = np.shape(leaves[0])[0] if leaves and np.ndim(leaves[0]) else 0
    if num == 0 or num % self.num_workers:
      raise ValueError(
          "`batches` leaves need a leading axis of R * num_workers "
          f"(num_workers={self.num_workers}, R >= 1), got {num}."
      )
    _checks.check_batches(batches, num, "R * num_workers")
    _state.check_state(state, SimState, self.num_workers)
    want = jax.tree.structure(jax.eval_shape(self.tx.init, state.params))
    if jax.tree.structure(state.opt_state) != want:
      raise ValueError(
          "`state.opt_state` does not match this SyncSimulator's optimizer "
          "(a state from a Simulator, or another tx?); make it with `init`."
      )
    _checks.check_loss_fn_cached(
        self._loss_checked, self._loss3, state.params, state.model_state,
        batches,
    )
    batches = _devices.replicate(batches, self.mesh)
    if self.strategy == "compiled":
      return self._program(state, batches)
    return self._replay_host(state, batches, num // self.num_workers)

  def _replay_host(self, state, batches, num_rounds):
    """``"host_chunks"``: per round, a jitted call per group, one update."""
    num_workers, size, n = self.num_workers, self._group, self._num_groups
    rows_S = np.minimum(np.arange(n * size), num_workers - 1)
    rows = np.arange(num_rounds)[:, None] * num_workers + rows_S[None]
    groups = _gathers.split_chunks(batches, rows.reshape(-1, size))
    weights = _weights(num_workers, n * size).astype(np.float32)
    weights = weights.reshape(n, size)
    if not self._donate:
      state = _gathers.copy_tree(state)
    losses = []
    for r in range(num_rounds):
      outs = [
          self._group_step(
              state.params, state.model_state, groups[r * n + g], weights[g]
          )
          for g in range(n)
      ]
      losses += [loss_G for loss_G, _, _ in outs]
      state = self._apply_step(
          state, [grads for *_, grads in outs], [ms for _, ms, _ in outs]
      )
    keep = np.flatnonzero(np.tile(rows_S == np.arange(n * size), num_rounds))
    (loss,) = _gathers.concat_rows((losses,), keep)
    return state, {"loss": loss, "staleness": jnp.zeros(loss.shape, jnp.int32)}
