"""Asynchronous parameter-server training on Ray, with any optax transformation.

``num_shards`` server actors (:mod:`_server`) each hold a part of the params
and of the optax state (:mod:`_layout`); worker actors (:mod:`_worker`)
compute gradients on their own data and push each shard its piece directly;
the driver (:mod:`_driver`) starts, watches and stops them. This module is
the entry point, :func:`train`: it validates the arguments (before any actor
starts), starts the actors (and Ray, if needed), lets the driver run, finish
and stop them, and returns a :class:`~_records.TrainResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import time
from typing import Any

import jax
import numpy as np
import optax
import ray

from dcasgd_optax import extend
from dcasgd_optax.ray import _cluster
from dcasgd_optax.ray import _driver
from dcasgd_optax.ray import _layout
from dcasgd_optax.ray import _steps
from dcasgd_optax.ray._records import TrainResult
from dcasgd_optax.ray._server import ParameterServer
from dcasgd_optax.ray._worker import GradientWorker


@dataclasses.dataclass(frozen=True)
class _Options:
  """train's keyword options that the actors and the driver need."""

  num_shards: int
  wire_dtype: np.dtype | None
  shared_memory: bool
  checkpoint_dir: str | None
  checkpoint_every: int | None
  resume: bool
  max_restarts: int
  restart_timeout_s: float
  server_options: Any
  worker_options: dict[str, Any] | None
  push_grad_sq: bool = False


def _check_options(opts: _Options) -> None:
  if not isinstance(opts.shared_memory, bool):
    raise TypeError(
        f"`shared_memory` must be a bool, got {opts.shared_memory!r}.")
  if opts.checkpoint_every is not None:
    extend.check_positive_int("checkpoint_every", opts.checkpoint_every)
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
  extend.check_scalar_range("restart_timeout_s", opts.restart_timeout_s,
                             low=0.0, low_inclusive=False)
  options = opts.server_options
  if isinstance(options, (list, tuple)) and len(options) != opts.num_shards:
    raise ValueError(
        f"`server_options` is a list of {len(options)}, but `num_shards` is "
        f"{opts.num_shards}: give one dict for all shards or one per shard."
    )


def _check_data(loss_fn: Callable, params: Any, data_fn: Callable,
                push_grad_sq: bool = False) -> None:
  """Checks ``loss_fn(params, data_fn(0, 0))`` is a scalar, abstractly (and,
  with ``push_grad_sq``, that per-example gradients of it can be taken)."""
  try:
    batch = data_fn(0, 0)
  except Exception as e:
    raise ValueError(f"`data_fn(0, 0)` raised {type(e).__name__}: {e}") from e
  try:
    loss = jax.eval_shape(loss_fn, params, batch)
  except Exception as e:
    raise ValueError(
        "`loss_fn(params, data_fn(0, 0))` fails: the batch from `data_fn` "
        f"does not fit `loss_fn` ({type(e).__name__}: {e})."
    ) from e
  if not (hasattr(loss, "shape") and loss.shape == () and
          jax.numpy.issubdtype(loss.dtype, jax.numpy.floating)):
    raise ValueError(
        "`loss_fn(params, batch)` must return a float scalar, got "
        f"{getattr(loss, 'shape', loss)!r} "
        f"{getattr(loss, 'dtype', type(loss).__name__)}."
    )
  if push_grad_sq:
    try:
      jax.eval_shape(lambda p, b: extend.mean_square_grads(loss_fn, p, b),
                     params, batch)
    except Exception as e:
      raise ValueError(
          "`push_grad_sq=True`: the per-example gradients of `loss_fn` on "
          "`data_fn(0, 0)` (each example a batch of one, along the leading "
          f"axis of every leaf) fail ({type(e).__name__}: {e})."
      ) from e


def _check_args(loss_fn, tx, params, data_fn, num_workers, num_updates,
                opts: _Options) -> tuple[int, _layout.Layout]:
  """Validates train's arguments before any actor starts."""
  num_workers = _steps.resolve_num_workers(tx, params, num_workers)
  if num_updates is None:
    raise TypeError("`num_updates` is required.")
  extend.check_positive_int("num_updates", num_updates)
  _check_options(opts)
  layout = _layout.make_layout(params, opts.num_shards)
  if opts.num_shards > 1:
    _layout.check_shardable(optax.with_extra_args_support(tx).init, params,
                            layout)
  _steps.check_push_grad_sq(tx, params, opts.push_grad_sq)
  _check_data(loss_fn, params, data_fn, opts.push_grad_sq)
  return num_workers, layout


def _shard_options(opts: _Options, shard: int) -> dict[str, Any]:
  options = opts.server_options or {}
  if isinstance(options, (list, tuple)):
    options = options[shard] or {}
  return dict(options)


def _start_actors(tx, params, loss_fn, data_fn, num_workers, layout,
                  opts: _Options):
  """Creates the shards and the workers (Ray starts them asynchronously)."""
  params_ref = ray.put(jax.device_get(params))
  shards = [
      ray.remote(ParameterServer)
      .options(max_restarts=0, **_shard_options(opts, k))
      .remote(tx, params_ref, num_workers, shard=k,
              num_shards=opts.num_shards, wire_dtype=opts.wire_dtype,
              checkpoint_dir=opts.checkpoint_dir,
              push_grad_sq=opts.push_grad_sq)
      for k in range(opts.num_shards)
  ]
  worker_cls = ray.remote(GradientWorker).options(
      max_restarts=opts.max_restarts,
      max_task_retries=0,
      **(opts.worker_options or {}),
  )
  # Restarting a worker reruns its constructor: the driver keeps these refs
  # (Driver.pinned) so its arguments stay in the object store.
  pinned = ray.put(loss_fn), ray.put(data_fn), ray.put(layout)
  workers = [worker_cls.remote(m, *pinned, shards, opts.wire_dtype,
                               opts.shared_memory, opts.push_grad_sq)
             for m in range(num_workers)]
  return shards, workers, pinned


def train(
    loss_fn: Callable[[Any, Any], Any],
    tx: optax.GradientTransformation,
    params: optax.Params,
    data_fn: Callable[[int, int], Any],
    num_workers: int | None = None,
    num_updates: int | None = None,
    *,
    num_shards: int = 1,
    wire_dtype: jax.typing.DTypeLike | None = None,
    shared_memory: bool = True,
    push_grad_sq: bool = False,
    address: str | None = None,
    allow_insecure_cluster: bool = False,
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    max_restarts: int = 3,
    restart_timeout_s: float = 600.0,
    server_options: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    worker_options: dict[str, Any] | None = None,
    init_kwargs: dict[str, Any] | None = None,
    log_every: int | None = None,
) -> TrainResult:
  r"""Trains asynchronously on Ray: ``num_shards`` shards, ``num_workers``
  workers.

  Worker ``m`` computes ``jax.value_and_grad(loss_fn)`` on ``data_fn(m,
  seq)`` at the params it holds and pushes each shard its piece of the
  gradient; each shard applies its piece at once with

  .. code-block:: python

    updates, opt_state = tx.update(grads, opt_state, params, worker=m,
                                   staleness=step - last_pull[m])

  and replies with its piece of the new params, which the worker pulls
  (recorded in the shard's part of the backups of any
  :func:`~dcasgd_optax.delay_compensation` inside ``tx``). There is no
  barrier, and the driver is on no gradient's or parameter's path. With one
  shard this is exactly the paper's parameter server; with several, each
  shard applies the pieces in the order they reach it (see docs/ray.md for
  what step and staleness mean then).

  Exactly ``num_updates - step_at_start`` gradients are processed by every
  shard, each once; only that many are computed. A worker that dies is
  restarted (up to ``max_restarts`` times): it finishes the gradient it was
  pushing, or recomputes the one it was computing with the same ``seq``,
  at the current params. A gradient that is not finite is skipped (counted,
  not applied; ``records.skipped``). With ``checkpoint_dir`` every shard
  saves its part with orbax every ``checkpoint_every`` updates (all at the
  same step, the workers paused) and at the end; ``resume=True`` continues
  from the latest step every shard saved.

  With ``push_grad_sq=True`` each worker also computes, at the same params
  and on the same batch, the mean of its per-example squared gradients,
  ``grad_sq`` (:func:`dcasgd_optax.extend.mean_square_grads`), and pushes
  it with the gradient, split over the shards alike; each shard passes its
  piece to ``tx.update(..., grad_sq=...)``, as
  :func:`~dcasgd_optax.fisher_compensation` and
  :func:`~dcasgd_optax.fisher_dcasgd` need. A ``grad_sq`` that is not
  finite skips its update as a non-finite gradient does.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, jitted on the workers.
    tx: any optax transformation: :func:`~dcasgd_optax.dcasgd`, a chain with
      :func:`~dcasgd_optax.delay_compensation` or
      :func:`~dcasgd_optax.scale_by_inverse_staleness`, or plain optax. With
      ``num_shards > 1`` its state must split elementwise (checked), and a
      transformation that combines leaves (``clip_by_global_norm``) sees
      only each shard's part.
    params: the initial params (ignored when resuming from a checkpoint).
    data_fn: ``data_fn(worker, seq) -> batch``: the minibatch for gradient
      number ``seq`` of ``worker``, called in the worker's process (and once,
      as ``data_fn(0, 0)``, in the driver to check it fits ``loss_fn``).
      Make it deterministic in its arguments, so a recomputed gradient sees
      the same data; draw randomness from e.g. ``fold_in(key, seq)``.
    num_workers: number of worker actors (>= 1); ``None`` reads it from
      ``tx``'s per-worker backups.
    num_updates: the server step to stop at (a total: a resumed run goes on
      from the checkpoint's step up to it). Required.
    num_shards: how many server actors share the params, balanced by size
      (in ``[1, number of param elements]``).
    wire_dtype: the dtype gradients and params travel in, e.g.
      ``jnp.bfloat16`` (half the bytes; workers then compute at params
      rounded to it); ``None``: the params' own.
    shared_memory: a worker and a shard on the same node exchange the
      pieces through two buffers in ``/dev/shm`` that both map, and the
      actor call carries only a small header (see docs/ray.md, "What one
      update is"); across nodes, or with ``False``, the pieces travel in
      the calls. The numbers are the same either way.
    push_grad_sq: workers also push ``grad_sq`` (see above), as
      ``Simulator(push_grad_sq=True)`` does, so a run replays there. Every
      leaf of a batch must have the example axis first (each example is
      given to ``loss_fn`` as a batch of one), and ``tx.update`` must read
      ``grad_sq`` (both checked before anything starts; so is a ``tx`` that
      needs it without the option). Cost: one more params-sized array per
      push (in ``wire_dtype`` too), on the wire, in the shared-memory
      buffers and in the shards' memory, and on the worker a gradient per
      example of its batch (see docs/ray.md).
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
    server_options: Ray actor options for the shards, e.g. ``{"num_cpus":
      1}``: one dict for all, or a list with one per shard (to place them).
    worker_options: Ray actor options for every worker, e.g. ``{"num_gpus":
      1}``.
    init_kwargs: extra keyword arguments for ``ray.init``.
    log_every: log the step and the mean loss about every this many updates
      (``logging.INFO``).

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
    ...     {'w': jnp.zeros(2)}, data_fn, num_updates=50)
    >>> result.step, len(result.records['staleness'])  # doctest: +SKIP
    (50, 50)
  """
  opts = _Options(
      num_shards=num_shards,
      wire_dtype=_steps.check_wire_dtype(wire_dtype),
      shared_memory=shared_memory,
      checkpoint_dir=checkpoint_dir,
      checkpoint_every=checkpoint_every,
      resume=resume,
      max_restarts=max_restarts,
      restart_timeout_s=restart_timeout_s,
      server_options=server_options,
      worker_options=worker_options,
      push_grad_sq=push_grad_sq,
  )
  num_workers, layout = _check_args(loss_fn, tx, params, data_fn, num_workers,
                                    num_updates, opts)
  assert num_updates is not None  # _check_args raised otherwise.
  started_ray = _cluster.connect(
      address, allow_insecure_cluster=allow_insecure_cluster,
      **(init_kwargs or {}))
  shards, workers, failed = [], [], True
  try:
    shards, workers, pinned = _start_actors(
        tx, params, loss_fn, data_fn, num_workers, layout, opts)
    driver = _driver.Driver(shards, workers, restart_timeout_s, pinned)
    driver.log_every = log_every
    _driver.restore(driver, resume)
    progress = driver.wait_for_actors()
    if progress[0] > num_updates:
      raise ValueError(
          f"The checkpoint is at step {progress[0]}, beyond `num_updates`="
          f"{num_updates} (a total, not a count of further updates)."
      )
    start_time = time.time()
    driver.run(num_updates, checkpoint_every, progress)
    result = _driver.finish(driver, start_time, num_updates, tx, layout,
                            checkpoint_dir is not None)
    failed = False
    return result
  finally:
    _driver.shutdown(shards, workers, failed, checkpoint_dir is not None,
                     started_ray)
