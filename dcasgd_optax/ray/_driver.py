"""The driver: starts the workers' loops, watches them, stops them.

It is on no gradient's or parameter's path: workers push to the shards and
take the new params from their replies (:mod:`_worker`). The driver asks the
shards for every worker's first pull (so all start at the same step), starts
one :meth:`GradientWorker.run` per worker, restarts the loop of a worker
that died (Ray restarts the actor), and, every ``checkpoint_every`` updates,
lets the workers' loops run dry (the first shard stops granting tickets),
saves every shard at that same step and starts them again. Around the run,
:func:`restore` resumes the shards from their checkpoints, :func:`finish`
collects the result and :func:`shutdown` stops every actor, whatever
happened.
"""

from __future__ import annotations

from collections.abc import Sequence
import logging
import time
from typing import Any

import numpy as np
import optax
import ray

from dcasgd_optax.ray import _layout
from dcasgd_optax.ray import _records
from dcasgd_optax.ray._records import TrainResult

_log = logging.getLogger(__name__)
# How often the driver looks at the run when nothing finishes.
_POLL_S = 1.0
# How long shutdown waits for the shards' last checkpoints to be written.
_CLOSE_TIMEOUT_S = 300.0


class ShardDiedError(RuntimeError):
  """A server shard died; the run must resume from a checkpoint."""


class Driver:
  """Watches one run: the shards, the workers and their loops.

  Args:
    shards: the server shards' actor handles (shard 0 grants tickets).
    workers: the workers' actor handles.
    restart_timeout_s: fail if a dead worker is not back this much later.
    pinned: object refs the workers' constructors need (kept alive so Ray
      can restart them).
  """

  def __init__(self, shards, workers, restart_timeout_s: float,
               pinned: Any = ()):
    self.shards = shards
    self.workers = workers
    self.restart_timeout_s = restart_timeout_s
    self.pinned = pinned
    self.failures = np.zeros(len(workers), np.int64)
    self.loops: dict[Any, int] = {}  # run() ref -> worker
    self.restarting: dict[Any, tuple[int, float]] = {}  # ready ref -> ...
    self.log_every: int | None = None
    self._logged = 0

  def wait_for_actors(self) -> tuple[int, np.ndarray]:
    """Waits for every actor to start; returns the shards' common progress."""
    ray.get([w.ready.remote() for w in self.workers])
    return self.progress()

  def progress(self) -> tuple[int, np.ndarray]:
    """``(step, last_seq)`` of the shards; raises if they disagree."""
    try:
      states = ray.get([s.progress.remote() for s in self.shards])
    except ray.exceptions.RayActorError as e:
      raise self._shard_died() from e
    step, last_seq = states[0]
    for k, (other_step, other_seq) in enumerate(states[1:], 1):
      if other_step != step or not np.array_equal(other_seq, last_seq):
        raise RuntimeError(
            f"Shards 0 and {k} disagree (steps {step} and {other_step}); "
            "this is a bug."
        )
    return step, last_seq

  def _shard_died(self) -> ShardDiedError:
    dead = []
    for k, s in enumerate(self.shards):
      try:
        ray.get(s.progress.remote(), timeout=30)
      except (ray.exceptions.RayError, TimeoutError):
        dead.append(k)
    return ShardDiedError(
        f"Server shard(s) {dead} died; rerun `train` with the same "
        "`checkpoint_dir` and `resume=True` to continue from the last step "
        "that every shard saved."
    )

  def start(self, progress: tuple[int, np.ndarray]) -> None:
    """Every worker pulls from every shard, then its loop starts."""
    _, last_seq = progress
    pulls = [[s.pull.remote(m) for s in self.shards]
             for m in range(len(self.workers))]
    # All first pulls happen before any push (fetch_local: data stays put).
    flat = [r for refs in pulls for r in refs]
    ray.wait(flat, num_returns=len(flat), fetch_local=False)
    for m, refs in enumerate(pulls):
      run = self.workers[m].run.remote(0, int(last_seq[m]) + 1, *refs)
      self.loops[run] = m

  def resume_loops(self) -> None:
    """Starts every worker's loop again (after a checkpoint)."""
    for m, w in enumerate(self.workers):
      self.loops[w.run.remote(int(self.failures[m]))] = m

  def wait_loops(self) -> None:
    """Returns when every worker's loop has run out of tickets."""
    while self.loops or self.restarting:
      pending = [*self.loops, *self.restarting]
      ready, _ = ray.wait(pending, num_returns=1, timeout=_POLL_S)
      if not ready and self.log_every:
        self._log_progress()
      for ref in ready:
        if ref in self.loops:
          self._loop_ended(ref, self.loops.pop(ref))
        else:
          self._restarted(ref, *self.restarting.pop(ref))
      self._check_restarts()

  def _loop_ended(self, ref: Any, worker: int) -> None:
    try:
      ray.get(ref)
    except ray.exceptions.RayTaskError as e:
      # Raised inside the loop: a shard died or rejected a push, or the
      # user's loss_fn or data_fn raised.
      if isinstance(e, ray.exceptions.RayActorError):
        raise self._shard_died() from e
      raise RuntimeError(f"Worker {worker} failed: {e}") from e
    except ray.exceptions.RayActorError as e:  # The worker itself died.
      self.failures[worker] += 1
      _log.warning("Worker %d died (%s); it restarts and resumes.", worker,
                   type(e).__name__)
      ready = self.workers[worker].ready.options(max_task_retries=-1).remote()
      self.restarting[ready] = (worker, time.monotonic())

  def _restarted(self, ref: Any, worker: int, _: float) -> None:
    try:
      ray.get(ref)
    except ray.exceptions.RayActorError as e:
      raise RuntimeError(
          f"Worker {worker} died and could not be restarted (it failed "
          f"{self.failures[worker]} times; see `max_restarts`)."
      ) from e
    run = self.workers[worker].run.remote(int(self.failures[worker]))
    self.loops[run] = worker

  def _log_progress(self) -> None:
    every = self.log_every
    assert every is not None  # Only called with logging on.
    step, loss = ray.get(self.shards[0].recent_loss.remote(every))
    if step // every > self._logged // every:
      _log.info("update %d: mean loss of the last %d %.4f", step,
                self.log_every, loss)
      self._logged = step

  def _check_restarts(self) -> None:
    for worker, since in self.restarting.values():
      if time.monotonic() - since > self.restart_timeout_s:
        raise RuntimeError(
            f"Worker {worker} failed and has not restarted within "
            f"`restart_timeout_s`={self.restart_timeout_s:g} s (no node with "
            "free resources for it?)."
        )

  def run(self, num_updates: int, checkpoint_every: int | None,
          progress: tuple[int, np.ndarray]) -> None:
    """Runs until each shard has applied exactly ``num_updates`` gradients."""
    step = progress[0]
    while True:
      limit = num_updates
      if checkpoint_every:
        limit = min(limit, (step // checkpoint_every + 1) * checkpoint_every)
      ray.get(self.shards[0].set_limit.remote(limit))
      if step == progress[0]:
        self.start(progress)
      else:
        self.resume_loops()
      self.wait_loops()
      step, _ = self.progress()
      if step != limit:
        raise RuntimeError(f"The shards stopped at step {step}, not {limit}; "
                           "this is a bug.")
      if step == num_updates:
        return
      self.save()

  def save(self) -> None:
    """Every shard saves its state (at the same step: nothing is in flight)."""
    try:
      ray.get([s.save.remote() for s in self.shards])
    except ray.exceptions.RayActorError as e:
      raise self._shard_died() from e


def restore(driver: Driver, resume: bool) -> None:
  """Restores every shard from the latest step all of them saved."""
  steps = ray.get([s.checkpoint_steps.remote() for s in driver.shards])
  saved = [set(s) for s in steps if s]
  if saved and not resume:
    raise ValueError(
        "`checkpoint_dir` already holds checkpoints (steps "
        f"{sorted(set().union(*saved))}); pass `resume=True` to continue from "
        "them, or use an empty directory."
    )
  if not saved:
    return
  common = set.intersection(*saved) if len(saved) == len(steps) else set()
  if not common:
    raise ValueError(
        "`checkpoint_dir` holds no step that every shard saved (were they "
        f"written with another `num_shards`?): {steps}."
    )
  step = max(common)
  ray.get([s.restore.remote(step) for s in driver.shards])


def finish(driver: Driver, start_time: float, num_updates: int,
            tx: Any, layout: _layout.Layout, checkpointing: bool
            ) -> TrainResult:
  """Saves, collects the traces and the final state, closes the shards."""
  shards = driver.shards
  if checkpointing:
    driver.save()
  traces = ray.get([s.trace.remote() for s in shards])
  records = _records.merge(traces, start_time)
  for trace in traces:
    trace["time"] = trace["time"] - start_time
  wall_time = float(records.time[-1]) if len(records.time) else 0.0
  shard_times = np.array(ray.get([s.close.remote() for s in shards]))
  results = ray.get([s.result.remote() for s in shards])
  steps = {r[0] for r in results}
  if steps != {num_updates}:
    raise RuntimeError(f"The shards stopped at steps {steps}, not "
                       f"{num_updates}.")
  params = _layout.join(layout, [r[1] for r in results])
  if layout.num_shards == 1:
    opt_state = results[0][2]
  else:
    init = optax.with_extra_args_support(tx).init
    opt_state = layout.join_states(init, [r[2] for r in results])
  return TrainResult(
      params=params, opt_state=opt_state, step=num_updates, records=records,
      wall_time=wall_time, server_time=float(shard_times.max()),
      worker_failures=driver.failures.copy(),
      shard_records=tuple(traces), shard_times=shard_times,
  )


def _save_if_consistent(shards: Sequence[Any]) -> None:
  """After a failure: saves the shards' state if they agree on it.

  Shards that processed different gradients (a push cut short) are not
  saved: their last common checkpoint stays the one to resume from.
  """
  try:
    states = ray.get([s.progress.remote() for s in shards],
                     timeout=_CLOSE_TIMEOUT_S)
    if all(st[0] == states[0][0] and np.array_equal(st[1], states[0][1])
           for st in states):
      ray.get([s.save.remote() for s in shards], timeout=_CLOSE_TIMEOUT_S)
  except (ray.exceptions.RayError, ValueError) as e:
    _log.warning("Could not save the shards' state after the failure: %s", e)


def shutdown(shards: Sequence[Any], workers: Sequence[Any], failed: bool,
              checkpointing: bool, started_ray: bool) -> None:
  """Saves what it can, kills the run's actors (and Ray if train started it)."""
  for w in workers:  # First, so no push lands after the last save.
    ray.kill(w, no_restart=True)
  if failed and checkpointing and shards:
    _save_if_consistent(shards)
  try:
    ray.get([s.close.remote() for s in shards], timeout=_CLOSE_TIMEOUT_S)
  except (ray.exceptions.RayError, TimeoutError) as e:
    _log.warning("Could not close the server shards cleanly: %s", e)
  for s in shards:
    ray.kill(s, no_restart=True)
  if started_ray:
    ray.shutdown()
