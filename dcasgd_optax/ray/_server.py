"""The parameter server: global params and optax state, one update per push.

``ParameterServer`` is a plain class; :func:`dcasgd_optax.ray.train` runs it
as a Ray actor, and tests call it directly. Its methods run one at a time
(a synchronous actor), so every update sees the result of the previous one.
Params travel as NumPy pytrees (the Ray object store reads them zero-copy).
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcasgd_optax._src import _checks
from dcasgd_optax.ray import _checkpoint
from dcasgd_optax._src.delay_compensation import num_workers_of
from dcasgd_optax._src.pull import find_states
from dcasgd_optax._src.pull import record_pull
from dcasgd_optax.ray._checkpoint import ServerState


class ApplyInfo(NamedTuple):
  """What the server did with one pushed gradient.

  Attributes:
    applied: False if the gradient was a duplicate (its ``(worker, seq)`` was
      applied before) and was ignored.
    step: the server step after this push (unchanged if not applied).
    staleness: server updates since the worker pulled the params its
      gradient was computed at.
    time: the server's ``time.time()`` when the update finished.
    seconds: time spent applying it and serving the worker's pull (the jitted
      steps and the host copy of the params; Ray's serialization of the
      returned params happens after the method returns and is not counted).
  """

  applied: bool
  step: int
  staleness: int
  time: float
  seconds: float


def check_tx_workers(tx: Any, params: Any, num_workers: int) -> None:
  """Raises unless every DelayCompensationState in ``tx`` has ``num_workers`` backups."""
  shapes = jax.eval_shape(optax.with_extra_args_support(tx).init, params)
  for state in find_states(shapes):
    if num_workers_of(state) not in (None, num_workers):
      raise ValueError(
          f"`tx` keeps backups for {num_workers_of(state)} workers, but "
          f"`num_workers` is {num_workers}; build tx with the same count."
      )


def _has_backups(tx: optax.GradientTransformation, params: Any) -> bool:
  return bool(find_states(jax.eval_shape(tx.init, params)))


def _make_steps(tx: Any, has_backups: bool) -> tuple[Callable, Callable]:
  """The jitted apply and pull steps, closing over ``tx``."""

  def apply_step(params, opt_state, grads, worker, staleness):
    updates, opt_state = tx.update(
        grads, opt_state, params, worker=worker, staleness=staleness
    )
    return optax.apply_updates(params, updates), opt_state

  def pull_step(params, opt_state, worker):
    if has_backups:  # Without backups nothing needs to know who holds what.
      opt_state = record_pull(opt_state, params, worker)
    return opt_state

  return (
      jax.jit(apply_step, donate_argnums=(0, 1)),
      jax.jit(pull_step, donate_argnums=(1,)),
  )


def _to_numpy(tree: Any) -> Any:
  # A copy, not a view: the next step donates the device buffers.
  return jax.tree.map(np.array, tree)


class ParameterServer:
  """Holds the params and the optax state; applies gradients as they arrive.

  Args:
    tx: any optax transformation. Its ``update`` gets ``params`` and the
      keywords ``worker`` and ``staleness`` (transformations that take no
      extra arguments are wrapped with ``optax.with_extra_args_support``).
      If its state holds a :class:`DelayCompensationState`, each worker's
      backup is set to the params it pulls.
    params: the initial params (ignored when resuming from a checkpoint).
    num_workers: number of workers.
    checkpoint_dir: where to save checkpoints with orbax, or None.
    checkpoint_every: save every this many updates (and at :meth:`close`).
    resume: start from the latest checkpoint in ``checkpoint_dir``.
  """

  def __init__(
      self,
      tx: optax.GradientTransformation,
      params: Any,
      num_workers: int,
      *,
      checkpoint_dir: str | None = None,
      checkpoint_every: int | None = None,
      resume: bool = False,
  ):
    num_workers = _checks.check_positive_int("num_workers", num_workers)
    check_tx_workers(tx, params, num_workers)
    self._num_workers = num_workers
    tx = optax.with_extra_args_support(tx)
    has_backups = _has_backups(tx, params)
    self._apply, self._pull = _make_steps(tx, has_backups)
    self._every = checkpoint_every
    params = jax.tree.map(jnp.asarray, params)
    self._state = ServerState(
        params=params,
        opt_state=tx.init(params),
        step=np.int64(0),
        last_seq=np.full((num_workers,), -1, np.int64),
        pulled_step=np.zeros((num_workers,), np.int64),
    )
    self._manager = None
    if checkpoint_dir is not None:
      self._manager = _checkpoint.open_manager(checkpoint_dir)
      self._start_from_checkpoint(resume)
    self.busy_seconds = 0.0

  def _start_from_checkpoint(self, resume: bool) -> None:
    latest = self._manager.latest_step()
    if latest is not None and not resume:
      raise ValueError(
          f"`checkpoint_dir` {self._manager.directory} already holds a "
          f"checkpoint (step {latest}); pass `resume=True` to continue from "
          "it, or use an empty directory."
      )
    restored = _checkpoint.restore_latest(self._manager, self._state)
    if restored is not None:
      self._state = ServerState(
          params=jax.tree.map(jnp.asarray, restored.params),
          opt_state=jax.tree.map(jnp.asarray, restored.opt_state),
          step=np.int64(restored.step),
          last_seq=np.array(restored.last_seq, np.int64),
          pulled_step=np.array(restored.pulled_step, np.int64),
      )

  def progress(self) -> tuple[int, np.ndarray]:
    """The current step and each worker's last applied sequence number."""
    return int(self._state.step), self._state.last_seq.copy()

  def pull(self, worker: int) -> tuple[int, Any]:
    """Worker ``worker`` pulls: records it and returns ``(step, params)``."""
    self._check_worker(worker)
    start = time.perf_counter()
    s = self._state
    opt_state = self._pull(s.params, s.opt_state, np.int32(worker))
    s.pulled_step[worker] = s.step
    self._state = s._replace(opt_state=opt_state)
    pulled = (int(s.step), _to_numpy(s.params))
    self.busy_seconds += time.perf_counter() - start
    return pulled

  def apply(
      self, worker: int, seq: int, grads: Any
  ) -> tuple[ApplyInfo, tuple[int, Any]]:
    """Applies worker ``worker``'s gradient number ``seq``, then it pulls.

    Returns:
      ``(info, (step, params))``: what happened, and the params the worker
      continues from. A ``seq`` at or below the last one applied from this
      worker is a duplicate: the state is left as it is (the pull is still
      recorded) and ``info.applied`` is False.
    """
    self._check_worker(worker)
    start = time.perf_counter()
    s = self._state
    staleness = int(s.step - s.pulled_step[worker])
    applied = seq > s.last_seq[worker]
    if applied:
      params, opt_state = self._apply(
          s.params, s.opt_state, grads, np.int32(worker), np.int32(staleness)
      )
      s.last_seq[worker] = seq
      self._state = s._replace(
          params=params, opt_state=opt_state, step=s.step + 1
      )
      self._maybe_checkpoint()
    self.busy_seconds += time.perf_counter() - start
    step, params = self.pull(worker)
    seconds = time.perf_counter() - start
    info = ApplyInfo(bool(applied), step, staleness, time.time(), seconds)
    return info, (step, params)

  def _check_worker(self, worker: Any) -> None:
    """Rejects a bad id before any state (donated buffers included) is touched."""
    if isinstance(worker, bool) or not isinstance(worker, (int, np.integer)):
      raise TypeError(f"`worker` must be an int, got {worker!r}.")
    if not 0 <= worker < self._num_workers:
      raise ValueError(
          f"`worker` must be in [0, {self._num_workers}), got {worker}."
      )

  def _maybe_checkpoint(self) -> None:
    if self._manager is not None and self._every:
      if int(self._state.step) % self._every == 0:
        _checkpoint.save(self._manager, self._state)

  def result(self) -> tuple[int, Any, Any]:
    """``(step, params, opt_state)`` as NumPy pytrees."""
    s = self._state
    return int(s.step), _to_numpy(s.params), _to_numpy(s.opt_state)

  def close(self) -> float:
    """Saves a final checkpoint, waits for pending saves; returns busy time."""
    if self._manager is not None:
      _checkpoint.save(self._manager, self._state)
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None
    return self.busy_seconds
