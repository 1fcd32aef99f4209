"""A worker: computes gradients and pushes them straight to the server shards.

``GradientWorker`` is a plain class that :func:`dcasgd_optax.ray.train` runs
as a Ray actor. Its :meth:`~GradientWorker.run` loop is the whole data path:
compute a gradient at the params it holds, push each shard its piece, take
each shard's reply (its pieces of the new params) and go on, for as long as
the first shard grants tickets. With ``push_grad_sq`` it also computes the
mean of its per-example squared gradients
(:func:`dcasgd_optax.extend.mean_square_grads`) and pushes each shard its
pieces of it after the gradient's. The driver is on no gradient's or
parameter's path. The worker holds no state that matters: a restarted one
attaches to every shard, finishes a gradient that only some shards got,
pulls and continues.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import ray

from dcasgd_optax.extend import mean_square_grads
from dcasgd_optax.ray import _layout
from dcasgd_optax.ray import _shm
from dcasgd_optax.ray import _wire
from dcasgd_optax.ray._protocol import Pulled
from dcasgd_optax.ray._steps import check_wire_dtype


class GradientMeta(NamedTuple):
  """The small part of a worker's gradient (the pieces travel separately).

  Attributes:
    worker: the worker's id.
    seq: the gradient's number for this worker (0, 1, ...).
    loss: the minibatch loss at the params it was computed at.
    seconds: time spent loading the batch and computing the gradient.
    finite: whether every element of the gradient (and of ``grad_sq``) is
      finite.
  """

  worker: int
  seq: int
  loss: float
  seconds: float
  finite: bool


def _make_grad(loss_fn: Callable, layout: _layout.Layout,
               wire: np.dtype | None, push_grad_sq: bool = False) -> Callable:
  """Jitted: shards' pieces and a batch -> (loss, finite, pieces per shard).

  Each shard's pieces are the gradient's, then (``push_grad_sq``) those of
  the mean per-example squared gradient at the same params.
  """

  def grad(pieces_by_shard, batch):
    params = _layout.join(layout, pieces_by_shard)
    params = jax.tree.map(lambda p, d: p.astype(d), params,
                          layout.treedef.unflatten(layout.dtypes))
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    pushed = [grads]
    if push_grad_sq:
      pushed.append(mean_square_grads(loss_fn, params, batch))
    finite = jnp.all(jnp.array(
        [jnp.isfinite(g).all() for g in jax.tree.leaves(pushed)]))
    pieces = [sum(shards, []) for shards in
              zip(*[_layout.split(layout, tree) for tree in pushed])]
    if wire is not None:
      pieces = [[g.astype(wire) for g in shard] for shard in pieces]
    return loss, finite, pieces

  return jax.jit(grad)


class GradientWorker:
  """Computes ``jax.value_and_grad(loss_fn)`` on ``data_fn``'s batches.

  Args:
    worker: this worker's id in ``[0, num_workers)``.
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    data_fn: ``data_fn(worker, seq) -> batch``, the batch of this worker's
      gradient number ``seq``; called in the worker's process.
    layout: how the params are split over the shards (:mod:`_layout`).
    shards: the shards' actor handles, in order (only :meth:`run` needs
      them).
    wire_dtype: the dtype pieces travel in, or ``None``.
    shared_memory: exchange the pieces with a shard on this worker's node
      through a shared-memory channel (:mod:`_shm`); else always in the
      actor calls.
    push_grad_sq: also push the mean over the batch of the per-example
      squared gradients (``grad_sq``), split like the gradient.
  """

  def __init__(self, worker: int, loss_fn: Callable, data_fn: Callable,
               layout: _layout.Layout, shards: Sequence[Any] = (),
               wire_dtype: Any = None, shared_memory: bool = True,
               push_grad_sq: bool = False):
    wire_dtype = check_wire_dtype(wire_dtype)
    self._worker = worker
    self._data_fn = data_fn
    self._shards = list(shards)
    self._grad = _make_grad(loss_fn, layout, wire_dtype, bool(push_grad_sq))
    self._specs = [[(shape, wire_dtype or dtype) for shape, dtype in
                    _layout.piece_specs(layout, k)]
                   for k in range(layout.num_shards)]
    # What a push carries: the gradient's pieces, then grad_sq's.
    self._push_specs = [specs * (2 if push_grad_sq else 1)
                        for specs in self._specs]
    # Each shard's push, with as many returns as its reply has parts.
    self._pushes = [s.push.options(num_returns=1 + _wire.num_chunks(specs))
                    for s, specs in zip(self._shards, self._specs)]
    self._shared_memory = bool(shared_memory)
    # Each shard's channel (None: push in the call); None until opened.
    self._channels: list[_shm.Channel | None] | None = None
    self._held: list[list[np.ndarray]] | None = None  # Each shard's pieces.
    self._seq = 0  # The next gradient's number.
    self._ticket = False

  def ready(self) -> bool:
    """Returns once the actor has started."""
    return True

  def _compute(self, seq: int) -> tuple[GradientMeta, list[list[np.ndarray]]]:
    """Gradient ``seq`` at the held params: meta and each shard's pieces."""
    start = time.perf_counter()
    batch = self._data_fn(self._worker, seq)
    loss, finite, pieces = self._grad(self._held, batch)
    pieces = [[np.asarray(g) for g in shard] for shard in pieces]
    meta = GradientMeta(self._worker, seq, float(loss),
                        time.perf_counter() - start, bool(finite))
    return meta, pieces

  def compute(self, seq: int, *pulled: Pulled) -> tuple[Any, ...]:
    """Gradient number ``seq`` at the params the shards sent (``pulled``).

    Returns:
      ``(meta, pieces_0, ..., pieces_{K-1})``: a :class:`GradientMeta`, then
      each shard's pieces of the gradient (NumPy; then of ``grad_sq``, with
      ``push_grad_sq``).
    """
    self._held = [p.params for p in pulled]
    meta, pieces = self._compute(seq)
    return (meta, *pieces)

  def _push(self, meta: GradientMeta, pieces: Sequence[list[np.ndarray]],
            epoch: int, to: Sequence[int]) -> None:
    """Pushes gradient ``meta.seq`` to shards ``to``; keeps their replies."""
    head = (self._worker, meta.seq, epoch, meta.finite,
            (meta.loss, meta.seconds))
    channels = self._channels or [None] * len(self._shards)
    shared, calls, through = {}, {}, {}
    for k in to:
      channel = channels[k]
      if channel is not None:
        channel.grads.write(pieces[k])
        through[k] = channel
        shared[k] = self._shards[k].push_shared.remote(head)
      else:
        calls[k] = self._pushes[k].remote(
            head, *_wire.pack(pieces[k], self._push_specs[k]))
    replies = iter(ray.get([r for refs in calls.values() for r in refs]))
    for k in to:
      if k in shared:
        stale, ticket = self._wait_bell(through[k], shared[k])
      else:
        (info, ticket), *parts = [next(replies) for _ in calls[k]]
        stale = info.status == "stale"
      if stale:  # A newer incarnation of this worker runs.
        self._ticket = False
        continue
      assert self._held is not None  # Set by the pull that came first.
      if k in shared:
        self._held[k] = list(through[k].params.pieces)
      else:
        self._held[k] = _wire.unpack(parts, self._specs[k])
      if k == 0:
        self._ticket = ticket
    self._seq = meta.seq + 1

  @staticmethod
  def _wait_bell(channel: _shm.Channel, ref: Any) -> tuple[bool, bool]:
    """Waits for a push through ``channel``: ``(stale, ticket)``.

    The shard rings the channel's doorbell when it is done; Ray's reply
    (``ref``) is looked at only while it has not rung, for an error the
    push raised (or the shard's death), raised here, or a stale push (which
    rings nothing). A reply that says the push was processed while the
    doorbell stays silent is an error: the params buffer was not written.
    """
    while True:
      code = channel.bell.wait(_shm.POLL_S)
      if code is not None:
        return False, bool(code & _shm.TICKET)
      if ray.wait([ref], timeout=0)[0]:
        info, ticket = ray.get(ref)  # Raises the push's error, if any.
        code = channel.bell.wait(0)  # Rung just before it returned?
        if code is not None:
          return False, bool(code & _shm.TICKET)
        if info.status == "stale":
          return True, False
        raise RuntimeError(
            f"A shard replied {info.status!r} to a push through its shared-"
            f"memory channel (step {info.step}) but never rang the channel's "
            "doorbell: the params buffer cannot be trusted.")

  def _open_channels(self, epoch: int) -> None:
    """Opens a shared-memory channel with each shard on this node."""
    self._channels = [None] * len(self._shards)
    if not (self._shared_memory and _shm.available()):
      return
    node = ray.get_runtime_context().get_node_id()
    paths = ray.get([s.open_channel.remote(self._worker, epoch, node)
                     for s in self._shards])
    for k, p in enumerate(paths):
      if p is None:
        continue
      try:
        self._channels[k] = _shm.Channel.attach(epoch, p, self._specs[k],
                                                self._push_specs[k])
      except OSError:  # Another /dev/shm (a container): push in the call.
        self._shards[k].close_channel.remote(self._worker, epoch)

  def _recover(self, epoch: int) -> None:
    """After a restart: finish a gradient some shards lack, then hold params.

    A push reaches the shards one by one, so a worker that died during one
    may have left gradient ``s`` on some shards only (never more than one
    apart). It is recomputed at the current params and pushed to the
    shards that lack it.
    """
    shards = self._shards
    last = ray.get([s.attach.remote(self._worker, epoch) for s in shards])
    self._held = [p.params for p in
                  ray.get([s.pull.remote(self._worker) for s in shards])]
    lo, hi = min(last), max(last)
    self._seq = lo + 1
    if hi > lo:
      meta, pieces = self._compute(hi)
      lagging = [k for k, seq in enumerate(last) if seq == lo]
      self._push(meta, pieces, epoch, lagging)
    self._ticket = False

  def run(self, epoch: int, seq: int | None = None, *initial: Pulled) -> int:
    """Computes and pushes gradients while the first shard grants tickets.

    Args:
      epoch: this incarnation's number (0, then one more per restart).
      seq: the first gradient's number, with ``initial``: the shards'
        replies to this worker's first pull (the driver asks for them,
        before any gradient, so every worker starts at the same step).
      *initial: see ``seq``. Without them the worker continues from the
        params it holds, or, after a restart, recovers (see above).

    Returns:
      How many gradients it pushed in this call.
    """
    if initial:
      assert seq is not None  # The driver passes it with ``initial``.
      self._held, self._seq = [p.params for p in initial], seq
    elif self._held is None:
      self._recover(epoch)
    if self._channels is None:
      self._open_channels(epoch)
    count = 0
    if not self._ticket:
      self._ticket = ray.get(self._shards[0].grant.remote(self._worker))
    while self._ticket:
      meta, pieces = self._compute(self._seq)
      self._push(meta, pieces, epoch, range(len(self._shards)))
      count += 1
    return count
