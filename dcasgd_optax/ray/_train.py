"""Asynchronous parameter-server training on Ray, with any optax transformation.

One parameter-server actor (:mod:`_server`) holds the params and the optax
state; worker actors (:mod:`_worker`) compute gradients on their own data;
the driver's loop (:mod:`_driver`) connects them without a barrier. This
module is the entry point, :func:`train`: it validates the arguments, starts
and stops the actors (and Ray, if needed), and returns a :class:`TrainResult`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import optax
import ray

from dcasgd_optax._src import _checks
from dcasgd_optax.ray import _cluster
from dcasgd_optax.ray import _driver
from dcasgd_optax.ray import _server
from dcasgd_optax.ray._driver import UpdateRecords
from dcasgd_optax.ray._server import ParameterServer
from dcasgd_optax.ray._worker import GradientWorker

_log = logging.getLogger(__name__)
# How long shutdown waits for the server's last checkpoint to be written.
_CLOSE_TIMEOUT_S = 300.0


class TrainResult(NamedTuple):
  """What :func:`train` returns.

  Attributes:
    params: the final params, a NumPy pytree.
    opt_state: the final optax state, a NumPy pytree.
    step: the server's step, always the ``num_updates`` asked for.
    records: an :class:`UpdateRecords` for the updates of this run (a
      resumed run records only those after the checkpoint).
    wall_time: seconds from the first pull to the last update.
    server_time: seconds the server spent applying updates and pulls.
    worker_failures: int64 ``[num_workers]``, per worker, how many of its
      gradients were lost because it died (or became unreachable) and were
      recomputed after it restarted.
  """

  params: Any
  opt_state: Any
  step: int
  records: UpdateRecords
  wall_time: float
  server_time: float
  worker_failures: np.ndarray

  @property
  def server_share(self) -> float:
    """The fraction of the wall time the server was busy."""
    return self.server_time / max(self.wall_time, 1e-12)


@dataclasses.dataclass(frozen=True)
class _Options:
  """train's keyword options that the actors and the loop need."""

  checkpoint_dir: str | None
  checkpoint_every: int | None
  resume: bool
  max_restarts: int
  restart_timeout_s: float
  server_options: dict[str, Any] | None
  worker_options: dict[str, Any] | None


def _check_args(tx, params, num_workers, num_updates, opts: _Options) -> None:
  """Validates train's arguments before any actor starts."""
  _checks.check_positive_int("num_workers", num_workers)
  _checks.check_positive_int("num_updates", num_updates)
  if opts.checkpoint_every is not None:
    _checks.check_positive_int("checkpoint_every", opts.checkpoint_every)
  if opts.checkpoint_dir is None and (
      opts.checkpoint_every is not None or opts.resume):
    raise ValueError(
        "`checkpoint_every` and `resume=True` need a `checkpoint_dir`."
    )
  restarts = opts.max_restarts
  if isinstance(restarts, bool) or not isinstance(restarts, int):
    raise TypeError(f"`max_restarts` must be an int >= 0, got {restarts!r}.")
  if restarts < 0:
    raise ValueError(f"`max_restarts` must be >= 0, got {restarts}.")
  _checks.check_scalar_range("restart_timeout_s", opts.restart_timeout_s,
                             low=0.0, low_inclusive=False)
  _server.check_tx_workers(tx, params, num_workers)


def _start_actors(tx, params, loss_fn, data_fn, num_workers, opts: _Options):
  """Creates the server and the workers (Ray starts them asynchronously)."""
  server = (
      ray.remote(ParameterServer)
      .options(max_restarts=0, **(opts.server_options or {}))
      .remote(
          tx,
          jax.device_get(params),
          num_workers,
          checkpoint_dir=opts.checkpoint_dir,
          checkpoint_every=opts.checkpoint_every,
          resume=opts.resume,
      )
  )
  worker_cls = ray.remote(GradientWorker).options(
      max_restarts=opts.max_restarts,
      max_task_retries=0,
      **(opts.worker_options or {}),
  )
  # Restarting a worker reruns its constructor: the driver keeps these refs
  # (in _driver.Driver.pinned) so its arguments stay in the object store.
  fns = ray.put(loss_fn), ray.put(data_fn)
  workers = [worker_cls.remote(m, *fns) for m in range(num_workers)]
  return server, workers, fns


def _finish(
    driver: _driver.Driver, start_time: float, num_updates: int
) -> TrainResult:
  """Collects the records, closes the server and builds the result."""
  records = driver.records(start_time)
  wall_time = float(records.time[-1]) if len(records.time) else 0.0
  server_time = ray.get(driver.server.close.remote())
  step, params, opt_state = ray.get(driver.server.result.remote())
  if step != num_updates:
    raise RuntimeError(f"The server stopped at step {step}, not {num_updates}.")
  return TrainResult(
      params=params,
      opt_state=opt_state,
      step=step,
      records=records,
      wall_time=wall_time,
      server_time=server_time,
      worker_failures=driver.failures.copy(),
  )


def _shutdown(actors: list[Any], started_ray: bool) -> None:
  """Flushes checkpoints, kills this run's actors (and Ray if train started it).

  After a failure the server (if alive) still saves its state, which is
  consistent between updates, so the run can resume from it.
  """
  if actors:
    try:
      ray.get(actors[0].close.remote(), timeout=_CLOSE_TIMEOUT_S)
    except (ray.exceptions.RayError, TimeoutError) as e:
      _log.warning("Could not close the parameter server cleanly: %s", e)
  for actor in actors:
    ray.kill(actor, no_restart=True)
  if started_ray:
    ray.shutdown()


def train(
    loss_fn: Callable[[Any, Any], Any],
    tx: optax.GradientTransformation,
    params: Any,
    data_fn: Callable[[int, int], Any],
    num_workers: int,
    num_updates: int,
    *,
    address: str | None = None,
    allow_insecure_cluster: bool = False,
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    max_restarts: int = 3,
    restart_timeout_s: float = 600.0,
    server_options: dict[str, Any] | None = None,
    worker_options: dict[str, Any] | None = None,
    init_kwargs: dict[str, Any] | None = None,
    log_every: int | None = None,
) -> TrainResult:
  r"""Trains asynchronously on Ray: one parameter server, ``num_workers`` workers.

  Worker ``m`` pulls the params, computes ``jax.grad(loss_fn)`` on
  ``data_fn(m, seq)`` and pushes it; the server applies it at once with

  .. code-block:: python

    updates, opt_state = tx.update(grads, opt_state, params, worker=m,
                                   staleness=step - step_pulled_by_m)

  and the worker pulls the result (recorded in the backups of any
  :func:`~dcasgd_optax.delay_compensation` inside ``tx``) and continues. There
  is no barrier: gradients are applied in the order they finish.

  Exactly ``num_updates - step_at_start`` gradients are applied, each once;
  only as many gradients as updates remain are computed. A worker that dies
  is restarted (up to ``max_restarts`` times) and resumes by pulling the
  current params; the gradient it was computing is recomputed with the same
  ``seq``. With ``checkpoint_dir`` the server saves params, optax state,
  step and per-worker sequence numbers with orbax every ``checkpoint_every``
  updates and at the end; ``resume=True`` continues from the latest one.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, jitted on the workers.
    tx: any optax transformation: :func:`~dcasgd_optax.dcasgd`, a chain with
      :func:`~dcasgd_optax.delay_compensation` or
      :func:`~dcasgd_optax.scale_by_inverse_staleness`, or plain optax.
    params: the initial params (ignored when resuming from a checkpoint).
    data_fn: ``data_fn(worker, seq) -> batch``: the minibatch for gradient
      number ``seq`` of ``worker``, called in the worker's process. Make it
      deterministic in its arguments, so a recomputed gradient sees the
      same data; draw randomness from e.g. ``fold_in(key, seq)``.
    num_workers: number of worker actors (>= 1).
    num_updates: the server step to stop at (a total: a resumed run goes on
      from the checkpoint's step up to it).
    address: the Ray cluster for ``ray.init(address=...)``: ``None`` (a
      running cluster if one is known, else a new local one), ``"auto"``,
      ``"local"``, or ``"host:6379"``. Ignored if Ray is already initialised.
      An existing cluster must authenticate this process (see
      :func:`~dcasgd_optax.ray.connect`).
    allow_insecure_cluster: run on an existing cluster even though it has no
      authentication (anyone who reaches it can run code there); without it
      such a cluster is refused before anything is sent to it.
    checkpoint_dir: a directory (local or shared by all nodes) for orbax
      checkpoints, or ``None`` for none.
    checkpoint_every: save every this many updates; ``None``: only at the end.
    resume: continue from the latest checkpoint in ``checkpoint_dir`` (start
      fresh if there is none). Without it a non-empty directory is an error.
    max_restarts: how many times each worker may die and be restarted.
    restart_timeout_s: fail the run if a dead worker is not back this many
      seconds later (instead of waiting forever for resources).
    server_options: Ray actor options for the server, e.g. ``{"num_cpus":
      1}`` or a node's resource.
    worker_options: Ray actor options for every worker, e.g. ``{"num_gpus":
      1}``.
    init_kwargs: extra keyword arguments for ``ray.init``.
    log_every: log the loss every this many updates (``logging.INFO``).

  Returns:
    A :class:`TrainResult`.

  Examples:
    >>> import jax.numpy as jnp, numpy as np, optax
    >>> import dcasgd_optax, dcasgd_optax.ray
    >>> def loss_fn(params, batch):  # logistic regression
    ...   x, y = batch
    ...   return optax.sigmoid_binary_cross_entropy(x @ params['w'], y).mean()
    >>> def data_fn(worker, seq):
    ...   x = np.random.default_rng([worker, seq]).normal(size=(8, 2))
    ...   return x, (x[:, 0] > x[:, 1]).astype(np.float32)
    >>> result = dcasgd_optax.ray.train(  # doctest: +SKIP
    ...     loss_fn, dcasgd_optax.dcasgd(0.1, num_workers=2),
    ...     {'w': jnp.zeros(2)}, data_fn, num_workers=2, num_updates=50)
    >>> result.step, len(result.records.staleness)  # doctest: +SKIP
    (50, 50)
  """
  opts = _Options(
      checkpoint_dir=checkpoint_dir,
      checkpoint_every=checkpoint_every,
      resume=resume,
      max_restarts=max_restarts,
      restart_timeout_s=restart_timeout_s,
      server_options=server_options,
      worker_options=worker_options,
  )
  _check_args(tx, params, num_workers, num_updates, opts)
  started_ray = _cluster.connect(
      address, allow_insecure_cluster=allow_insecure_cluster,
      **(init_kwargs or {}))
  actors = []
  try:
    server, workers, pinned = _start_actors(
        tx, params, loss_fn, data_fn, num_workers, opts
    )
    actors = [server, *workers]
    driver = _driver.Driver(server, workers, restart_timeout_s, pinned)
    progress = driver.wait_for_actors()
    start_time = time.time()
    driver.run(progress, num_updates, log_every)
    return _finish(driver, start_time, num_updates)
  finally:
    _shutdown(actors, started_ray)
