"""A parameter-server shard: its part of the params and optax state.

``ParameterServer`` is a plain class; :func:`dcasgd_optax.ray.train` runs
``num_shards`` of them as Ray actors (shard ``k`` holds the pieces that
:mod:`_layout` assigns it), and tests call it directly. Its methods run one
at a time (a synchronous actor), so every update sees the result of the
previous one. A worker on the shard's node pushes through a shared-memory
channel (:meth:`~ParameterServer.open_channel`,
:meth:`~ParameterServer.push_shared`, :mod:`_shm`); any other pushes with
the pieces in the call (:meth:`~ParameterServer.push`), as :mod:`_wire`
packs them (with ``push_grad_sq=True`` a push carries the gradient's pieces
and then its ``grad_sq``'s, split alike, and the shard passes ``grad_sq``
to ``tx.update``): up to 512 kB as their bytes in ``bytes`` chunks (read as
read-only views), a larger message as a list of NumPy arrays (the Ray object
store reads them zero-copy). Pushed pieces are never written to in place.

Every push is checked before any state is touched (:mod:`_protocol`): every
field of its head (the worker id, ``seq``, its restart ``epoch``, the
``finite`` flag, the ``meta``), that ``seq`` is the next one expected from
that worker, that the first shard granted a ticket for it (while a limit is
set), and each piece's shape and dtype (``grad_sq``'s too). A bad push
raises ``ValueError`` (or ``TypeError``) naming the worker, and the shard
stays usable. A gradient that is not finite (or whose ``grad_sq`` is not,
or that its worker flagged as such) is skipped: it counts as
processed (the step advances), but params and optax state keep their
values; the worker's pull is still recorded. Through a channel, the shard
checks and applies its own copy of the gradient buffer, so this holds even
if the buffer is written during the push.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcasgd_optax.ray import _checkpoint
from dcasgd_optax.ray import _layout
from dcasgd_optax.ray import _records
from dcasgd_optax.ray import _shm
from dcasgd_optax.ray import _steps
from dcasgd_optax.ray import _wire
from dcasgd_optax.ray._admission import Admission
from dcasgd_optax.ray._admission import check_limit
from dcasgd_optax.ray._channels import Channels
from dcasgd_optax.ray._checkpoint import ServerState
from dcasgd_optax.ray._protocol import ApplyInfo
from dcasgd_optax.ray._protocol import Head
from dcasgd_optax.ray._protocol import Pulled
from dcasgd_optax.ray._protocol import check_epoch
from dcasgd_optax.ray._protocol import check_head
from dcasgd_optax.ray._protocol import check_pieces
from dcasgd_optax.ray._protocol import check_shard
from dcasgd_optax.ray._protocol import check_worker


class ParameterServer:
  """Holds one shard of the params and optax state; applies pushes as they come.

  Args:
    tx: any optax transformation. Its ``update`` gets ``params`` and the
      keywords ``worker`` and ``staleness`` (transformations that take no
      extra arguments are wrapped with ``optax.with_extra_args_support``).
      If its state holds a :class:`~dcasgd_optax.DelayCompensationState`,
      each worker's backup (of this shard's part) is set to the params it
      pulls. With
      ``num_shards > 1`` its state must split elementwise (see
      :mod:`_layout`).
    params: the full initial params (the shard keeps its pieces).
    num_workers: number of workers; ``None`` reads it from ``tx``'s backups.
    shard: this shard's index in ``[0, num_shards)``; shard 0 also grants
      the tickets that keep the run's count exact (:mod:`_admission`).
    num_shards: how many shards share the params.
    wire_dtype: dtype of the pieces on the wire (``None``: the params'
      own); e.g. ``jnp.bfloat16`` halves the bytes moved. Pushed gradients
      are expected in it; pulled params are rounded to it, and the rounded
      params are what the backups record.
    checkpoint_dir: the run's checkpoint directory (this shard writes in
      its own subdirectory), or ``None``.
    push_grad_sq: every push also carries ``grad_sq`` (the worker's mean
      per-example squared gradient, split like the gradient; in the wire
      dtype if one is set), which ``tx.update`` gets as the keyword
      ``grad_sq`` (checked: ``tx`` must read it, and without the option
      must not need it).

  Examples:
    >>> import numpy as np, optax
    >>> from dcasgd_optax.ray._server import ParameterServer
    >>> server = ParameterServer(optax.sgd(1.0), {'w': np.zeros(2)}, 1)
    >>> info, pulled = server.apply(0, 0, [np.ones(2, np.float32)])
    >>> info.status, pulled.step, pulled.params[0].tolist()
    ('applied', 1, [-1.0, -1.0])
  """

  def __init__(
      self,
      tx: optax.GradientTransformation,
      params: optax.Params,
      num_workers: int | None = None,
      *,
      shard: int = 0,
      num_shards: int = 1,
      wire_dtype: jax.typing.DTypeLike | None = None,
      checkpoint_dir: str | None = None,
      push_grad_sq: bool = False,
  ):
    num_workers = _steps.resolve_num_workers(tx, params, num_workers)
    layout = _layout.make_layout(params, num_shards)
    shard = check_shard(shard, num_shards)
    tx = optax.with_extra_args_support(tx)
    if num_shards > 1:
      _layout.check_shardable(tx.init, params, layout)
    self._grad_sq = _steps.check_push_grad_sq(tx, params, push_grad_sq)
    self._wire = _steps.check_wire_dtype(wire_dtype)
    self._layout, self._shard, self._num_workers = layout, shard, num_workers
    self._specs = [(s, self._wire or d)
                   for s, d in _layout.piece_specs(layout, shard)]
    # What a push's message carries: the gradient's pieces, then grad_sq's.
    self._push_specs = self._specs * (2 if self._grad_sq else 1)
    names = _layout.leaf_names(layout)
    self._piece_names = [names[p.leaf] for p in layout.pieces[shard]]
    pieces = _layout.split(layout, jax.device_get(params))[shard]
    tree = _layout.shard_tree(layout, shard, [jnp.asarray(p) for p in pieces])
    opt_state = tx.init(tree)
    self._apply, self._pull = _steps.make_steps(
        tx, layout, shard, self._wire, opt_state, self._grad_sq)
    self._state = ServerState(
        params=tree, opt_state=opt_state, step=np.int64(0),
        last_seq=np.full((num_workers,), -1, np.int64),
        last_pull=np.zeros((num_workers,), np.int64),
    )
    self._epochs = np.zeros((num_workers,), np.int64)
    self._admission = Admission(num_workers, 0) if shard == 0 else None
    self._rows: list[tuple] = []
    self._channels = Channels(shard, self._specs, self._push_specs)
    self._checkpoints = None
    if checkpoint_dir is not None:
      self._checkpoints = _checkpoint.open_shard(checkpoint_dir, shard,
                                                 num_shards)
    self.busy_seconds = 0.0

  # ------------------------------------------------------------ the protocol

  def progress(self) -> tuple[int, np.ndarray]:
    """The step and each worker's last processed seq (-1: none yet)."""
    return int(self._state.step), self._state.last_seq.copy()

  def pull(self, worker: int) -> Pulled:
    """Worker ``worker`` pulls: records it; returns this shard's pieces."""
    worker = check_worker(worker, self._num_workers)
    start, s = time.perf_counter(), self._state
    opt_state, pieces = self._pull(s.params, s.opt_state, np.int32(worker))
    s.last_pull[worker] = s.step
    self._state = s._replace(opt_state=opt_state)
    pieces = [np.asarray(x) for x in pieces]
    self.busy_seconds += time.perf_counter() - start
    return Pulled(int(s.step), pieces, True)

  def attach(self, worker: int, epoch: int) -> int:
    """A restarted worker (incarnation ``epoch``) attaches; returns last seq.

    From now on pushes from its earlier incarnations are ignored as stale.
    """
    worker = check_worker(worker, self._num_workers)
    epoch = check_epoch(epoch)
    self._epochs[worker] = max(self._epochs[worker], epoch)
    return int(self._state.last_seq[worker])

  def open_channel(self, worker: int, epoch: int, node: str | None
                   ) -> tuple[str, str, str] | None:
    """Opens a shared-memory channel for a worker on this node.

    See :meth:`_channels.Channels.open`: returns the three files' paths for
    the worker to open (it then pushes with :meth:`push_shared`), or
    ``None`` (it pushes with :meth:`push`); raises ``ValueError`` if this
    incarnation has a channel open already.
    """
    worker = check_worker(worker, self._num_workers)
    epoch = check_epoch(epoch)
    return self._channels.open(worker, epoch, int(self._epochs[worker]), node)

  def close_channel(self, worker: int, epoch: int) -> None:
    """Closes worker ``worker``'s channel if it is incarnation ``epoch``'s.

    The worker calls it when it could not open the channel's files (another
    ``/dev/shm``: a container); it then pushes in the calls.
    """
    self._channels.close(check_worker(worker, self._num_workers),
                         check_epoch(epoch))

  def grant(self, worker: int) -> bool:
    """Whether ``worker`` may compute its next gradient (first shard only)."""
    worker = check_worker(worker, self._num_workers)
    if self._admission is None:
      return True
    return self._admission.grant(worker, int(self._state.last_seq[worker]))

  def set_limit(self, limit: int | None) -> None:
    """Grant tickets only until ``limit`` gradients are processed in all.

    While a limit is set, the first shard also rejects a push it granted no
    ticket for. ``None`` (the default) grants every ask and checks nothing.

    Raises:
      TypeError, ValueError: ``limit`` is not None or an int >= 0.
    """
    limit = check_limit(limit)
    if self._admission is not None:
      self._admission.limit = limit

  def apply(
      self,
      worker: int,
      seq: int,
      grads: list[np.ndarray],
      *,
      grad_sq: list[np.ndarray] | None = None,
      epoch: int = 0,
      finite: bool = True,
      meta: tuple[float, float] = (float("nan"), float("nan")),
  ) -> tuple[ApplyInfo, Pulled]:
    """Processes worker ``worker``'s gradient number ``seq``; the worker pulls.

    Args:
      worker: the worker's id.
      seq: the gradient's number; must be the next one from this worker.
      grads: this shard's pieces of the gradient, NumPy arrays shaped like
        :attr:`piece_specs` (in the wire dtype, if one is set).
      grad_sq: this shard's pieces of the worker's ``grad_sq``, like
        ``grads``: required with ``push_grad_sq=True``, else ``None``.
      epoch: the worker's incarnation (0, then one more per restart).
      finite: False if the worker found its whole gradient (or
        ``grad_sq``) not finite (every shard then skips its part).
      meta: ``(loss, compute_time)``, recorded by the first shard.

    Returns:
      ``(info, pulled)``: what happened, and the params the worker continues
      from.

    Raises:
      ValueError, TypeError: naming the worker, for a bad push (see the
        module's docstring). Nothing is changed.
    """
    start = time.perf_counter()
    head = self._check_head((worker, seq, epoch, finite, meta))
    if self._is_stale(head):
      info = self._stale_info()
      return info, Pulled(info.step, [], False)
    self._check_push(head, grads, grad_sq)
    info, pieces, ticket = self._update(head, grads, grad_sq, start, False)
    return info, Pulled(info.step, pieces, ticket)

  def push(self, head: tuple[int, int, int, bool, tuple[float, float]],
           *parts: Any) -> tuple[Any, ...]:
    """:meth:`apply` for a worker's call: the pieces come and go as messages.

    Args:
      head: ``(worker, seq, epoch, finite, meta)``, as for :meth:`apply`.
      *parts: the gradient's pieces (then ``grad_sq``'s) packed by
        ``_wire.pack`` for :attr:`push_specs`.

    Returns:
      ``((info, ticket), *parts)``: what happened, whether the worker may go
      on, and the params packed the same way (``1 +
      _wire.num_chunks(piece_specs)`` values, so that messages of up to
      512 kB travel inside the call); the parts are ``None`` if stale.
    """
    start = time.perf_counter()
    head = self._check_head(head)
    try:
      message = _wire.unpack(parts, self._push_specs)
    except ValueError as e:
      raise ValueError(f"Shard {self._shard}: worker {head.worker} sent a "
                       f"malformed gradient ({e}); rejected, nothing "
                       "changed.") from e
    if self._is_stale(head):
      info = self._stale_info()
      return ((info, False), *[None] * _wire.num_chunks(self._specs))
    grads, grad_sq = self._split(message)
    self._check_push(head, grads, grad_sq)
    info, pieces, ticket = self._update(head, grads, grad_sq, start, False)
    return ((info, ticket), *_wire.pack(pieces, self._specs))

  def push_shared(self, head: tuple[int, int, int, bool, tuple[float, float]]
                  ) -> tuple[ApplyInfo, bool]:
    """:meth:`push` through the worker's channel (:meth:`open_channel`).

    The gradient's pieces (and ``grad_sq``'s) are copied out of the
    channel's gradient buffer (the shard checks and applies that copy); the
    new params are written to its params buffer, then its doorbell rings
    with the ticket. A stale push
    (from an earlier incarnation) changes nothing and rings nothing.

    Returns:
      ``(info, ticket)``, as the first value :meth:`push` returns.

    Raises:
      ValueError: also if no channel is open for the push's incarnation.
    """
    start = time.perf_counter()
    head = self._check_head(head)
    if self._is_stale(head):
      return self._stale_info(), False
    channel = self._channels.get(head.worker, head.epoch)
    grads, grad_sq = self._split(channel.read_grads())
    self._check_push(head, grads, grad_sq)
    info, pieces, ticket = self._update(head, grads, grad_sq, start, True)
    channel.params.write(pieces)
    channel.bell.ring(_shm.TICKET if ticket else 0)
    return info, ticket

  def _stale_info(self) -> ApplyInfo:  # From an earlier incarnation: ignored.
    return ApplyInfo("stale", int(self._state.step), 0, time.time(), 0.0)

  def _split(self, message: Any) -> tuple[Any, Any]:
    """A push's pieces as ``(grads, grad_sq)`` (``None`` without it)."""
    if not self._grad_sq or not isinstance(message, (list, tuple)):
      return message, None
    n = len(self._specs)
    return list(message[:n]), list(message[n:])

  def _update(self, head: Head, grads: list[Any], grad_sq: list[Any] | None,
              start: float, shared: bool
              ) -> tuple[ApplyInfo, list[np.ndarray], bool]:
    """Applies a checked gradient (and grad_sq); the worker pulls."""
    s, worker = self._state, head.worker
    staleness = int(s.step - s.last_pull[worker])
    params, opt_state, pieces, ok = self._apply(
        s.params, s.opt_state, list(grads), list(grad_sq or []),
        np.int32(worker),
        np.int32(staleness), np.bool_(head.finite))
    s.last_seq[worker] = head.seq
    s.last_pull[worker] = s.step + 1
    self._state = s._replace(params=params, opt_state=opt_state,
                             step=s.step + 1)
    pieces, ok = [np.asarray(x) for x in pieces], bool(ok)
    ticket = self.grant(worker)
    seconds = time.perf_counter() - start
    self.busy_seconds += seconds
    info = ApplyInfo("applied" if ok else "skipped", int(s.step + 1),
                     staleness, time.time(), seconds)
    row = (worker, head.seq, info.step, staleness, info.time, seconds, not ok,
           shared)
    self._rows.append(row + (head.meta if self._shard == 0 else ()))
    return info, pieces, ticket

  # ------------------------------------------------------------------ checks

  @property
  def piece_specs(self) -> list[tuple[tuple[int, ...], np.dtype]]:
    """``(shape, dtype)`` of each piece of a gradient (and of a params
    reply), in order."""
    return list(self._specs)

  @property
  def push_specs(self) -> list[tuple[tuple[int, ...], np.dtype]]:
    """``(shape, dtype)`` of each piece a push's message carries: the
    gradient's, then (``push_grad_sq=True``) ``grad_sq``'s."""
    return list(self._push_specs)

  def _check_head(self, head: Any) -> Head:  # Every field; nothing changed.
    return check_head(head, self._num_workers, self._shard)

  def _is_stale(self, head: Head) -> bool:
    """Whether a checked head is from an earlier incarnation (ignore it)."""
    return head.epoch < self._epochs[head.worker]

  def _check_push(self, head: Head, grads: Any, grad_sq: Any) -> None:
    """Raises for a bad (not stale) push; else its incarnation is current.

    A bad push from a newer incarnation does not count as its attaching.
    """
    worker, seq = head.worker, head.seq
    who = f"Shard {self._shard}: worker {worker}"
    expected = int(self._state.last_seq[worker]) + 1
    if seq != expected:
      kind = "a duplicate" if seq < expected else "out of order"
      raise ValueError(
          f"{who} sent gradient seq={seq}, but the next expected is "
          f"{expected} ({kind}); rejected, nothing changed."
      )
    if self._admission is not None and not self._admission.holds(worker, seq):
      raise ValueError(
          f"{who} pushed gradient seq={seq}, for which this shard granted no "
          "ticket (see `grant`); rejected, nothing changed.")
    check_pieces(who, grads, self._specs, self._piece_names)
    if self._grad_sq:
      if grad_sq is None:
        raise ValueError(
            f"{who} pushed no `grad_sq`, which this shard needs "
            "(push_grad_sq=True); rejected, nothing changed.")
      check_pieces(who, grad_sq, self._specs, self._piece_names, "grad_sq")
    elif grad_sq is not None:
      raise ValueError(
          f"{who} pushed a `grad_sq`, but this shard takes none "
          "(push_grad_sq=False); rejected, nothing changed.")
    self._epochs[worker] = head.epoch

  # ---------------------------------------------------- results, checkpoints

  def recent_loss(self, count: int) -> tuple[int, float]:
    """The step and the mean loss of the last ``count`` gradients (shard 0)."""
    losses = (
        [row[-2] for row in self._rows[-count:]] if self._shard == 0 else []
    )
    return int(self._state.step), float(np.mean(losses)) if losses else float(
        "nan")

  def trace(self) -> dict[str, np.ndarray]:
    """This shard's record of every gradient it processed, in its order."""
    return _records.shard_trace(self._rows, lead=self._shard == 0)

  def result(self) -> tuple[int, list[np.ndarray], Any]:
    """``(step, pieces, opt_state)`` as NumPy."""
    s = self._state
    pieces = _layout.owned(self._layout, self._shard, s.params)
    return int(s.step), [np.array(x) for x in pieces], jax.tree.map(
        np.array, s.opt_state)

  def checkpoint_steps(self) -> list[int]:
    """The steps this shard has complete checkpoints of."""
    return self._checkpoints.steps() if self._checkpoints else []

  def save(self) -> int:
    """Starts saving the state (asynchronously); returns its step."""
    if self._checkpoints is None:
      raise ValueError("This server has no `checkpoint_dir`.")
    _checkpoint.save(self._checkpoints, self._state)
    return int(self._state.step)

  def restore(self, step: int) -> None:
    """Continues from the checkpoint of ``step``; no ticket is out after it."""
    if self._checkpoints is None:
      raise ValueError("This server has no `checkpoint_dir`.")
    self._state = _checkpoint.restore(self._checkpoints, step, self._state)
    if self._admission is not None:
      self._admission.reset(int(self._state.step))

  def close(self) -> float:
    """Waits for pending saves, closes the channels; returns busy seconds."""
    self._channels.close_all()
    if self._checkpoints is not None:
      self._checkpoints.close()
      self._checkpoints = None
    return self.busy_seconds
