"""The driver's loop: one gradient in flight per worker, no barrier.

It takes whichever gradient is ready first (``ray.wait``), has the server
apply it with that worker's id, and hands the new params straight to that
worker (an ``ObjectRef`` the worker resolves itself, so params never pass
through the driver). It also restarts failed workers and collects the
records of every update.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import numpy as np
import ray

from dcasgd_optax.ray._server import ApplyInfo
from dcasgd_optax.ray._worker import GradientMeta

_log = logging.getLogger(__name__)
# How often the loop checks on restarting workers.
_POLL_S = 1.0
# The loop fetches the server's ApplyInfos in batches of about this many.
_COLLECT_EVERY = 512


class UpdateRecords(NamedTuple):
  """One entry per update applied in this run, in the server's order.

  Attributes:
    step: int64 ``[U]``, the server step after the update (1, 2, ...).
    worker: int64 ``[U]``, whose gradient it was.
    seq: int64 ``[U]``, that worker's gradient number (0, 1, ...).
    staleness: int64 ``[U]``, server updates between the worker's pull and
      this update (0 for a fresh gradient).
    loss: float32 ``[U]``, the worker's minibatch loss at the params it
      pulled.
    time: float64 ``[U]``, seconds from the start of the run to the update
      (the server's wall clock against the driver's).
    compute_time: float64 ``[U]``, seconds the worker spent loading the batch
      and computing the gradient.
    server_time: float64 ``[U]``, seconds the server spent applying it and
      serving the worker's pull.
  """

  step: np.ndarray
  worker: np.ndarray
  seq: np.ndarray
  staleness: np.ndarray
  loss: np.ndarray
  time: np.ndarray
  compute_time: np.ndarray
  server_time: np.ndarray


class Driver:
  """The asynchronous loop: one gradient in flight per worker, no barrier.

  ``inflight`` maps each pending ref to ``(worker, seq, grads)``: the ``meta``
  ref of a gradient being computed (``grads`` its ref), or, after a worker
  failed, the ref of its ``ready`` call (``grads`` None), which Ray retries
  until the restarted actor answers; only then does the worker pull.
  """

  def __init__(self, server, workers, restart_timeout_s: float,
               pinned: Any = ()):
    self.server = server
    self.workers = workers
    self.restart_timeout_s = restart_timeout_s
    self.pinned = pinned  # Object refs the workers' constructors need.
    self.failures = np.zeros(len(workers), np.int64)
    self.inflight: dict[Any, tuple[int, int, Any]] = {}
    self.restarting: dict[int, float] = {}  # worker -> when it failed
    # Updates sent to the server: ApplyInfo refs, fetched in batches.
    self.pending: list[tuple[Any, GradientMeta]] = []
    self.applied: list[tuple[ApplyInfo, GradientMeta]] = []

  @property
  def num_sent(self) -> int:
    return len(self.applied) + len(self.pending)

  def collect(self, keep: int = 0) -> None:
    """Fetches the ApplyInfos of all but the last ``keep`` updates sent."""
    done, self.pending = self.pending[:len(self.pending) - keep], (
        self.pending[len(self.pending) - keep:])
    try:
      infos = ray.get([info for info, _ in done])
    except ray.exceptions.RayActorError:
      self.check_server()
      raise
    if not all(i.applied for i in infos):
      raise RuntimeError("A gradient was pushed twice; this is a bug.")
    self.applied += [(i, meta) for i, (_, meta) in zip(infos, done)]

  def submit(self, worker: int, seq: int, pulled: Any) -> None:
    """Has ``worker`` compute gradient ``seq`` at ``pulled`` (a ref)."""
    compute = self.workers[worker].compute.options(num_returns=2)
    meta, grads = compute.remote(seq, pulled)
    self.inflight[meta] = (worker, seq, grads)

  def check_server(self) -> None:
    """Raises a RuntimeError saying how to resume if the server is dead."""
    try:
      ray.get(self.server.progress.remote())
    except ray.exceptions.RayActorError as e:
      raise RuntimeError(
          "The parameter server died; rerun `train` with the same "
          "`checkpoint_dir` and `resume=True` to continue from its last "
          "checkpoint."
      ) from e

  def failed(self, worker: int, seq: int, error: Exception) -> None:
    """After ``worker``'s gradient ``seq`` was lost: wait for its restart."""
    self.check_server()  # A dead server fails every worker's next task too.
    self.failures[worker] += 1
    _log.warning("Worker %d failed (%s); it restarts, pulls and resumes.",
                 worker, error)
    ready = self.workers[worker].ready.options(max_task_retries=-1).remote()
    self.inflight[ready] = (worker, seq, None)
    self.restarting[worker] = time.monotonic()

  def check_restarts(self) -> None:
    """Raises if a failed worker has not come back in time."""
    for worker, since in self.restarting.items():
      if time.monotonic() - since > self.restart_timeout_s:
        raise RuntimeError(
            f"Worker {worker} failed and has not restarted within "
            f"`restart_timeout_s`={self.restart_timeout_s:g} s (no node with "
            "free resources for it?)."
        )

  def wait_for_actors(self) -> tuple[int, np.ndarray]:
    """Waits for all actors to start; returns the server's progress."""
    ray.get([w.ready.remote() for w in self.workers])
    return ray.get(self.server.progress.remote())

  def next_gradient(self) -> tuple[int, int, Any, GradientMeta] | None:
    """The first gradient to finish, or None if something else happened."""
    ready, _ = ray.wait(list(self.inflight), num_returns=1,
                        timeout=_POLL_S if self.restarting else None)
    if not ready:
      self.check_restarts()
      return None
    worker, seq, grads = self.inflight.pop(ready[0])
    try:
      meta = ray.get(ready[0])
    except ray.exceptions.RayActorError as e:
      if grads is None:  # The worker's restarts are used up.
        raise RuntimeError(
            f"Worker {worker} died and could not be restarted (it failed "
            f"{self.failures[worker]} times; see `max_restarts`)."
        ) from e
      self.failed(worker, seq, e)
      return None
    if grads is None:  # Restarted: pull the current params and go on.
      del self.restarting[worker]
      self.submit(worker, seq, self.server.pull.remote(worker))
      return None
    return worker, seq, grads, meta

  def run(self, progress: tuple[int, np.ndarray], num_updates: int,
          log_every: int | None) -> None:
    """Applies gradients until the server's step is exactly ``num_updates``."""
    step, last_seq = progress
    remaining = num_updates - step
    for m in range(min(len(self.workers), remaining)):
      self.submit(m, int(last_seq[m]) + 1, self.server.pull.remote(m))
    while self.num_sent < remaining:
      got = self.next_gradient()
      if got is None:
        continue
      worker, seq, grads, meta = got
      info, pulled = self.server.apply.options(num_returns=2).remote(
          worker, seq, grads)
      self.pending.append((info, meta))
      if self.num_sent + len(self.inflight) < remaining:
        self.submit(worker, seq + 1, pulled)
      if len(self.pending) >= 2 * _COLLECT_EVERY:
        self.collect(keep=_COLLECT_EVERY)  # Those are long done.
      if log_every and self.num_sent % log_every == 0:
        _log.info("update %d: worker %d loss %.4f", step + self.num_sent,
                  worker, meta.loss)
    self.collect()

  def records(self, start_time: float) -> UpdateRecords:
    """The records of every update applied."""
    infos = [info for info, _ in self.applied]
    metas = [meta for _, meta in self.applied]
    return UpdateRecords(
        step=np.array([i.step for i in infos], np.int64),
        worker=np.array([m.worker for m in metas], np.int64),
        seq=np.array([m.seq for m in metas], np.int64),
        staleness=np.array([i.staleness for i in infos], np.int64),
        loss=np.array([m.loss for m in metas], np.float32),
        time=np.array([i.time - start_time for i in infos], np.float64),
        compute_time=np.array([m.seconds for m in metas], np.float64),
        server_time=np.array([i.seconds for i in infos], np.float64),
    )
