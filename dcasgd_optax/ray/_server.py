"""A parameter-server shard: its part of the params and optax state.

``ParameterServer`` is a plain class; :func:`dcasgd_optax.ray.train` runs
``num_shards`` of them as Ray actors (shard ``k`` holds the pieces that
:mod:`_layout` assigns it), and tests call it directly. Its methods run one
at a time (a synchronous actor), so every update sees the result of the
previous one. A worker on the shard's node pushes through a shared-memory
channel (:meth:`~ParameterServer.open_channel`,
:meth:`~ParameterServer.push_shared`, :mod:`_shm`); any other pushes with
the pieces in the call (:meth:`~ParameterServer.push`), as :mod:`_wire`
packs them: up to 512 kB as their bytes in ``bytes`` chunks (read as
read-only views), a larger message as a list of NumPy arrays (the Ray object
store reads them zero-copy). Pushed pieces are never written to in place.

Every push is checked before any state is touched: the worker id, its
restart ``epoch``, that ``seq`` is the next one expected from that worker,
and each piece's shape and dtype. A bad push raises ``ValueError`` (or
``TypeError``) naming the worker, and the shard stays usable. A gradient that
is not finite (or that its worker flagged as such) is skipped: it counts as
processed (the step advances), but params and optax state keep their
values; the worker's pull is still recorded.
"""

from __future__ import annotations

from collections.abc import Callable
import numbers
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import ray

from dcasgd_optax._src import _checks
from dcasgd_optax._src.delay_compensation import num_workers_of
from dcasgd_optax._src.pull import find_states
from dcasgd_optax._src.pull import pull as pull_hook
from dcasgd_optax._src.pull import record_pull
from dcasgd_optax.ray import _checkpoint
from dcasgd_optax.ray import _layout
from dcasgd_optax.ray import _records
from dcasgd_optax.ray import _shm
from dcasgd_optax.ray import _wire
from dcasgd_optax.ray._admission import Admission
from dcasgd_optax.ray._checkpoint import ServerState


class Pulled(NamedTuple):
  """What a worker receives from one shard when it pulls.

  Attributes:
    step: the shard's step when the worker pulled.
    params: the shard's pieces of the params, NumPy arrays in the wire dtype.
    ticket: whether the worker may compute its next gradient (decided by
      the first shard; the others always say True).
  """

  step: int
  params: list[np.ndarray]
  ticket: bool


class ApplyInfo(NamedTuple):
  """What a shard did with one pushed gradient.

  Attributes:
    status: ``"applied"``; ``"skipped"`` (not finite: processed, not
      applied); or ``"stale"`` (sent by a worker's earlier incarnation, from
      before it restarted: ignored, nothing changed).
    step: the shard's step after this push.
    staleness: updates this shard applied between the worker's pull and
      this push.
    time: the shard's ``time.time()`` when it was done.
    seconds: time spent on it, the worker's pull included.
  """

  status: str
  step: int
  staleness: int
  time: float
  seconds: float


def resolve_num_workers(tx: Any, params: Any, num_workers: int | None) -> int:
  """The number of workers: given, or read from ``tx``'s backups; checked.

  Raises:
    ValueError: if ``tx`` keeps backups for another number of workers, or
      if it keeps none and ``num_workers`` is None.
  """
  shapes = jax.eval_shape(optax.with_extra_args_support(tx).init, params)
  counts = {n for s in find_states(shapes) if (n := num_workers_of(s))}
  if num_workers is None:
    if len(counts) != 1:
      raise ValueError(
          "`num_workers` is None, but `tx` keeps no per-worker backups to "
          "read it from (or several counts); pass `num_workers`."
      )
    return counts.pop()
  num_workers = _checks.check_positive_int("num_workers", num_workers)
  if counts - {num_workers}:
    raise ValueError(
        f"`tx` keeps backups for {counts.pop()} workers, but `num_workers` "
        f"is {num_workers}; build tx with the same count."
    )
  return num_workers


def check_wire_dtype(wire_dtype: Any) -> np.dtype | None:
  """``None``, or the floating dtype pieces are sent in (e.g. bfloat16)."""
  if wire_dtype is None:
    return None
  try:
    dtype = np.dtype(jnp.dtype(wire_dtype))
  except TypeError as e:
    raise TypeError(f"`wire_dtype` must be a floating dtype or None, got "
                    f"{wire_dtype!r}.") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`wire_dtype` must be a floating dtype or None, got "
                    f"{wire_dtype!r}.")
  return dtype


def _make_steps(tx: Any, layout: _layout.Layout, shard: int,
                wire: np.dtype | None, has_backups: bool
                ) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """The jitted ``apply`` (update, then pull) and ``pull`` of one shard."""
  specs = _layout.piece_specs(layout, shard)

  def on_wire(x):
    return x if wire is None else x.astype(wire)

  def pull(params, opt_state, worker):
    """The worker's pull (dcasgd_optax.pull: maybe a look-ahead) on the wire."""
    pulled = params
    if has_backups:
      pulled, recorded = pull_hook(opt_state, params, worker)
      if wire is None:
        opt_state = recorded
      else:  # The worker holds the rounded params: record those instead.
        pulled = jax.tree.map(lambda x: on_wire(x).astype(x.dtype), pulled)
        opt_state = record_pull(opt_state, pulled, worker)
    return opt_state, [on_wire(x) for x in _layout.owned(layout, shard, pulled)]

  def apply(params, opt_state, grads, worker, staleness, finite):
    grads = [g.astype(d) for g, (_, d) in zip(grads, specs)]
    finite = jnp.logical_and(
        finite, jnp.all(jnp.array([jnp.isfinite(g).all() for g in grads])))
    grads = _layout.shard_tree(layout, shard, grads)

    def update(operand):
      params, opt_state = operand
      updates, opt_state = tx.update(grads, opt_state, params, worker=worker,
                                     staleness=staleness)
      return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda o: o,
                                     (params, opt_state))
    # Pull even if tx's update pulled already (a PullAfterPush): redundant
    # then, not wrong, and it keeps skipped updates and wire rounding right.
    opt_state, pulled = pull(params, opt_state, worker)
    return params, opt_state, pulled, finite

  return (jax.jit(apply, donate_argnums=(0, 1)),
          jax.jit(pull, donate_argnums=(1,)))


class ParameterServer:
  """Holds one shard of the params and optax state; applies pushes as they come.

  Args:
    tx: any optax transformation. Its ``update`` gets ``params`` and the
      keywords ``worker`` and ``staleness`` (transformations that take no
      extra arguments are wrapped with ``optax.with_extra_args_support``).
      If its state holds a :class:`DelayCompensationState`, each worker's
      backup (of this shard's part) is set to the params it pulls. With
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

  Examples:
    >>> import numpy as np, optax
    >>> from dcasgd_optax.ray import ParameterServer
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
  ) -> None:
    num_workers = resolve_num_workers(tx, params, num_workers)
    layout = _layout.make_layout(params, num_shards)
    if isinstance(shard, bool) or not isinstance(shard, numbers.Integral) or (
        not 0 <= shard < num_shards):
      raise ValueError(f"`shard` must be an int in [0, {num_shards}), got "
                       f"{shard!r}.")
    tx = optax.with_extra_args_support(tx)
    if num_shards > 1:
      _layout.check_shardable(tx.init, params, layout)
    self._wire: np.dtype | None = check_wire_dtype(wire_dtype)
    self._layout: _layout.Layout = layout
    self._shard: int = shard
    self._num_workers: int = num_workers
    self._specs: list[tuple[tuple[int, ...], np.dtype]] = [(s, self._wire or d)
                   for s, d in _layout.piece_specs(layout, shard)]
    self._names: list[str] = _layout.leaf_names(layout)
    pieces = _layout.split(layout, jax.device_get(params))[shard]
    tree = _layout.shard_tree(layout, shard, [jnp.asarray(p) for p in pieces])
    opt_state = tx.init(tree)
    has_backups = bool(find_states(opt_state))
    steps = _make_steps(tx, layout, shard, self._wire, has_backups)
    self._apply: Callable[..., Any] = steps[0]
    self._pull: Callable[..., Any] = steps[1]
    self._state: ServerState = ServerState(
        params=tree, opt_state=opt_state, step=np.int64(0),
        last_seq=np.full((num_workers,), -1, np.int64),
        last_pull=np.zeros((num_workers,), np.int64),
    )
    self._epochs: np.ndarray = np.zeros((num_workers,), np.int64)
    self._admission: Admission | None = (
        Admission(num_workers, 0) if shard == 0 else None)
    self._rows: list[tuple] = []
    self._channels: dict[int, _shm.Channel] = {}  # Per worker, on this node.
    self._checkpoints: _checkpoint.Checkpointer | None = None
    if checkpoint_dir is not None:
      self._checkpoints = _checkpoint.open_shard(checkpoint_dir, shard,
                                                 num_shards)
    self.busy_seconds: float = 0.0

  # ------------------------------------------------------------ the protocol

  def progress(self) -> tuple[int, np.ndarray]:
    """The step and each worker's last processed seq (-1: none yet)."""
    return int(self._state.step), self._state.last_seq.copy()

  def pull(self, worker: int) -> Pulled:
    """Worker ``worker`` pulls: records it; returns this shard's pieces."""
    self._check_worker(worker)
    start = time.perf_counter()
    pulled = self._record_pull(worker)
    self.busy_seconds += time.perf_counter() - start
    return pulled

  def _record_pull(self, worker: int) -> Pulled:
    s = self._state
    opt_state, pieces = self._pull(s.params, s.opt_state, np.int32(worker))
    s.last_pull[worker] = s.step
    self._state = s._replace(opt_state=opt_state)
    return Pulled(int(s.step), [np.asarray(x) for x in pieces], True)

  def attach(self, worker: int, epoch: int) -> int:
    """A restarted worker (incarnation ``epoch``) attaches; returns last seq.

    From now on pushes from its earlier incarnations are ignored as stale.
    """
    self._check_worker(worker)
    epoch = self._check_epoch(epoch)
    self._epochs[worker] = max(self._epochs[worker], epoch)
    return int(self._state.last_seq[worker])

  def open_channel(self, worker: int, epoch: int, node: str | None
                   ) -> tuple[str, str, str] | None:
    """Opens a shared-memory channel (:mod:`_shm`) for a worker on this node.

    Args:
      worker: the worker's id.
      epoch: its incarnation; a channel of an earlier one is closed.
      node: the Ray node id of the worker's process (``None`` outside Ray).

    Returns:
      The paths of the gradient buffer, the params buffer and the doorbell,
      for the worker to open (it then pushes with :meth:`push_shared`); or
      ``None`` if the worker is on another node, the incarnation is not the
      latest, or ``/dev/shm`` cannot hold them (it then pushes with
      :meth:`push`). The worker's earlier channel, if any, is closed (unless
      the incarnation is not the latest).
    """
    self._check_worker(worker)
    epoch = self._check_epoch(epoch)
    if epoch < self._epochs[worker]:
      return None
    old = self._channels.pop(worker, None)
    if old is not None:
      old.close()
    if node != _node_id() or not _shm.available():
      return None
    try:
      channel = _shm.Channel.create(epoch, self._specs,
                                    f"s{self._shard}-w{worker}-e{epoch}")
    except OSError:
      return None
    self._channels[worker] = channel
    return channel.paths

  def grant(self, worker: int) -> bool:
    """Whether ``worker`` may compute its next gradient (first shard only)."""
    self._check_worker(worker)
    if self._admission is None:
      return True
    return self._admission.grant(worker, int(self._state.last_seq[worker]))

  def set_limit(self, limit: int | None) -> None:
    """Grant tickets only until ``limit`` gradients are processed in all."""
    if self._admission is not None:
      self._admission.limit = limit

  def apply(
      self,
      worker: int,
      seq: int,
      grads: list[np.ndarray],
      *,
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
      epoch: the worker's incarnation (0, then one more per restart).
      finite: False if the worker found its whole gradient not finite
        (every shard then skips its part).
      meta: ``(loss, compute_time)``, recorded by the first shard.

    Returns:
      ``(info, pulled)``: what happened, and the params the worker continues
      from.

    Raises:
      ValueError, TypeError: naming the worker, for a bad id, a seq that is
        not the next one expected (a duplicate or out of order), or pieces
        of the wrong number, shape or dtype. Nothing is changed.
    """
    start = time.perf_counter()
    if not self._check_push(worker, seq, epoch, grads):
      info = self._stale_info()
      return info, Pulled(info.step, [], False)
    info, pieces, ticket = self._update(worker, seq, list(grads), finite,
                                        meta, start)
    return info, Pulled(info.step, pieces, ticket)

  def push(self, head: tuple[int, int, int, bool, tuple[float, float]],
           *parts: Any) -> tuple[Any, ...]:
    """:meth:`apply` for a worker's call: the pieces come and go as messages.

    Args:
      head: ``(worker, seq, epoch, finite, meta)``, as for :meth:`apply`.
      *parts: the gradient's pieces packed by ``_wire.pack`` for
        :attr:`piece_specs`.

    Returns:
      ``((info, ticket), *parts)``: what happened, whether the worker may go
      on, and the params packed the same way (``1 +
      _wire.num_chunks(piece_specs)`` values, so that messages of up to
      512 kB travel inside the call); the parts are ``None`` if stale.
    """
    start = time.perf_counter()
    worker, seq, epoch, finite, meta = self._check_head(head)
    try:
      grads = _wire.unpack(parts, self._specs)
    except ValueError as e:
      raise ValueError(f"Shard {self._shard}: worker {worker} sent a "
                       f"malformed gradient ({e}); rejected, nothing "
                       "changed.") from e
    if not self._check_push(worker, seq, epoch, grads):
      info = self._stale_info()
      return ((info, False), *[None] * _wire.num_chunks(self._specs))
    info, pieces, ticket = self._update(worker, seq, list(grads), finite,
                                        meta, start)
    return ((info, ticket), *_wire.pack(pieces, self._specs))

  def push_shared(self, head: tuple[int, int, int, bool, tuple[float, float]]
                  ) -> tuple[ApplyInfo, bool]:
    """:meth:`push` through the worker's channel (:meth:`open_channel`).

    The gradient's pieces are read from the channel's gradient buffer; the
    new params are written to its params buffer, then its doorbell rings
    with the ticket. A stale push (from an earlier incarnation) changes
    nothing and rings nothing.

    Returns:
      ``(info, ticket)``, as the first value :meth:`push` returns.
    """
    start = time.perf_counter()
    worker, seq, epoch, finite, meta = self._check_head(head)
    self._check_worker(worker)
    channel = self._channels.get(worker)
    if self._check_epoch(epoch) >= self._epochs[worker] and (
        channel is None or channel.epoch != epoch):
      raise ValueError(
          f"Shard {self._shard}: worker {worker} pushed through a shared-"
          f"memory channel, but none is open for its incarnation {epoch}; "
          "rejected, nothing changed.")
    grads = channel.grads.pieces if channel is not None else []
    if not self._check_push(worker, seq, epoch, grads):
      return self._stale_info(), False
    assert channel is not None  # A push that is not stale came through it.
    info, pieces, ticket = self._update(worker, seq, list(grads), finite,
                                        meta, start)
    channel.params.write(pieces)
    channel.bell.ring(_shm.TICKET if ticket else 0)
    return info, ticket

  def _check_head(self, head: Any) -> tuple:
    """``head`` as ``(worker, seq, epoch, finite, meta)``; TypeError if not."""
    if not (isinstance(head, tuple) and len(head) == 5):
      raise TypeError(f"Shard {self._shard}: `head` must be (worker, seq, "
                      f"epoch, finite, meta), got {head!r}.")
    return head

  def _stale_info(self) -> ApplyInfo:
    """What a stale push (from an earlier incarnation) gets: nothing done."""
    return ApplyInfo("stale", int(self._state.step), 0, time.time(), 0.0)

  def _update(self, worker: int, seq: int, grads: list[Any],
              finite: bool, meta: tuple[float, float], start: float
              ) -> tuple[ApplyInfo, list[np.ndarray], bool]:
    """Applies a checked gradient; the worker pulls."""
    s = self._state
    staleness = int(s.step - s.last_pull[worker])
    params, opt_state, pieces, ok = self._apply(
        s.params, s.opt_state, grads, np.int32(worker),
        np.int32(staleness), np.bool_(finite))
    s.last_seq[worker] = seq
    s.last_pull[worker] = s.step + 1
    self._state = s._replace(params=params, opt_state=opt_state,
                             step=s.step + 1)
    pieces, ok = [np.asarray(x) for x in pieces], bool(ok)
    ticket = self.grant(worker)
    seconds = time.perf_counter() - start
    self.busy_seconds += seconds
    info = ApplyInfo("applied" if ok else "skipped", int(s.step + 1),
                     staleness, time.time(), seconds)
    row = (worker, seq, info.step, staleness, info.time, seconds, not ok)
    self._rows.append(row + (tuple(meta) if self._shard == 0 else ()))
    return info, pieces, ticket

  # ------------------------------------------------------------------ checks

  @property
  def piece_specs(self) -> list[tuple[tuple[int, ...], np.dtype]]:
    """``(shape, dtype)`` of each piece a push must carry, in order."""
    return list(self._specs)

  def _check_worker(self, worker: Any) -> None:
    """Rejects a bad id before any state (donated buffers too) is touched."""
    if isinstance(worker, bool) or not isinstance(worker, numbers.Integral):
      raise TypeError(f"`worker` must be an int, got {worker!r}.")
    if not 0 <= int(worker) < self._num_workers:
      raise ValueError(
          f"`worker` must be in [0, {self._num_workers}), got {worker}: "
          "this server does not know that worker."
      )

  def _check_epoch(self, epoch: Any) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or (
        epoch < 0):
      raise TypeError(f"`epoch` must be an int >= 0, got {epoch!r}.")
    return int(epoch)

  def _check_push(self, worker: Any, seq: Any, epoch: Any, grads: Any) -> bool:
    """Raises for a bad push; False for a stale one (ignore it); else True.

    A bad push from a newer incarnation does not count as its attaching.
    """
    self._check_worker(worker)
    epoch = self._check_epoch(epoch)
    if epoch < self._epochs[worker]:
      return False
    who = f"Shard {self._shard}: worker {worker}"
    if isinstance(seq, bool) or not isinstance(seq, numbers.Integral):
      raise TypeError(f"{who} sent `seq`={seq!r}, not an int.")
    expected = int(self._state.last_seq[worker]) + 1
    if seq != expected:
      kind = "a duplicate" if seq < expected else "out of order"
      raise ValueError(
          f"{who} sent gradient seq={seq}, but the next expected is "
          f"{expected} ({kind}); rejected, nothing changed."
      )
    self._check_pieces(who, grads)
    self._epochs[worker] = epoch
    return True

  def _check_pieces(self, who: str, grads: Any) -> None:
    if not isinstance(grads, (list, tuple)) or len(grads) != len(self._specs):
      raise ValueError(
          f"{who} sent a gradient that is not a list of this shard's "
          f"{len(self._specs)} pieces (got {type(grads).__name__}"
          f"{f' of {len(grads)}' if isinstance(grads, (list, tuple)) else ''}"
          "); rejected, nothing changed."
      )
    for i, (g, (shape, dtype)) in enumerate(zip(grads, self._specs)):
      got = (tuple(np.shape(g)), getattr(g, "dtype", type(g).__name__))
      if not isinstance(g, (np.ndarray, jax.Array)) or got != (shape, dtype):
        name = self._names[self._layout.pieces[self._shard][i].leaf]
        raise ValueError(
            f"{who} sent piece {i} (of params{name}) with (shape, dtype) "
            f"{got}, expected {(shape, dtype)}; rejected, nothing changed."
        )

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
    r = _checkpoint.restore(self._checkpoints, step, self._state)
    self._state = ServerState(
        params=jax.tree.map(jnp.asarray, r.params),
        opt_state=jax.tree.map(jnp.asarray, r.opt_state),
        step=np.int64(r.step), last_seq=np.array(r.last_seq, np.int64),
        last_pull=np.array(r.last_pull, np.int64),
    )
    if self._admission is not None:
      self._admission.reset(int(r.step))

  def close(self) -> float:
    """Waits for pending saves, closes the channels; returns busy seconds."""
    for channel in self._channels.values():
      channel.close()
    self._channels.clear()
    if self._checkpoints is not None:
      self._checkpoints.close()
      self._checkpoints = None
    return self.busy_seconds


def _node_id() -> str | None:
  """This process's Ray node id, or ``None`` outside Ray."""
  if not ray.is_initialized():
    return None
  return ray.get_runtime_context().get_node_id()
