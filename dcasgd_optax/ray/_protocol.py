"""What a push carries and what it gets back, and the checks a push passes.

A worker's push to a shard carries a :class:`Head` (the small part) and the
gradient's pieces, then, with ``push_grad_sq=True``, its ``grad_sq``'s
pieces, split alike (in the call, :mod:`_wire`, or in a shared-memory
channel, :mod:`_shm`); it gets back an :class:`ApplyInfo` and the shard's
pieces of the new params (a :class:`Pulled` when the shard is called
directly). The shard checks every field of the head and every piece here,
before it changes anything: a bad push raises ``TypeError`` or
``ValueError`` naming the worker, and leaves the shard as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import numbers
from typing import Any, NamedTuple

import jax
import numpy as np


class Head(NamedTuple):
  """A push's small part: who sent which gradient, and what it says of it.

  Attributes:
    worker: the worker's id.
    seq: the gradient's number for that worker (0, 1, ...).
    epoch: the worker's incarnation (0, then one more per restart).
    finite: False if the worker found its whole gradient (or its
      ``grad_sq``) not finite (every shard then skips its part).
    meta: ``(loss, compute_time)``, recorded by the first shard.
  """

  worker: int
  seq: int
  epoch: int
  finite: bool
  meta: tuple[float, float]


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


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def check_shard(shard: Any, num_shards: int) -> int:
  """``shard`` as an int in ``[0, num_shards)``; ValueError if not."""
  if not _is_int(shard) or not 0 <= shard < num_shards:
    raise ValueError(f"`shard` must be an int in [0, {num_shards}), got "
                     f"{shard!r}.")
  return int(shard)


def check_worker(worker: Any, num_workers: int) -> int:
  """``worker`` as an int in ``[0, num_workers)``; else TypeError/ValueError."""
  if not _is_int(worker):
    raise TypeError(f"`worker` must be an int, got {worker!r}.")
  if not 0 <= worker < num_workers:
    raise ValueError(
        f"`worker` must be in [0, {num_workers}), got {worker}: this server "
        "does not know that worker."
    )
  return int(worker)


def check_epoch(epoch: Any) -> int:
  """``epoch`` as an int >= 0; TypeError if not."""
  if not _is_int(epoch) or epoch < 0:
    raise TypeError(f"`epoch` must be an int >= 0, got {epoch!r}.")
  return int(epoch)


def check_head(head: Any, num_workers: int, shard: int) -> Head:
  """Every field of a push's head, checked and converted to a :class:`Head`.

  Raises:
    TypeError, ValueError: naming the field (and the worker, once its id is
      known), for a head that is not a 5-tuple, a bad worker id, a ``seq``
      or ``epoch`` that is not an int >= 0, a ``finite`` that is not a bool,
      or a ``meta`` that is not two real numbers.
  """
  if not (isinstance(head, tuple) and len(head) == 5):
    raise TypeError(f"Shard {shard}: `head` must be (worker, seq, epoch, "
                    f"finite, meta), got {head!r}.")
  worker, seq, epoch, finite, meta = head
  worker = check_worker(worker, num_workers)
  who = f"Shard {shard}: worker {worker}"
  if not _is_int(seq) or seq < 0:
    raise TypeError(f"{who} sent `seq`={seq!r}, not an int >= 0.")
  epoch = check_epoch(epoch)
  if not isinstance(finite, (bool, np.bool_)):
    raise TypeError(f"{who} sent `finite`={finite!r}, not a bool.")
  if not (isinstance(meta, (tuple, list)) and len(meta) == 2 and all(
      isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))
      for x in meta)):
    raise TypeError(f"{who} sent `meta`={meta!r}, not (loss, compute_time) "
                    "as two real numbers.")
  loss, seconds = float(meta[0]), float(meta[1])
  if not (math.isnan(seconds) or seconds >= 0.0):
    raise ValueError(f"{who} sent a compute time of {seconds} s, not >= 0.")
  return Head(worker, int(seq), epoch, bool(finite), (loss, seconds))


def check_pieces(who: str, grads: Any, specs: Sequence[tuple[Any, Any]],
                 names: Sequence[str], what: str = "gradient") -> None:
  """Raises ValueError unless ``grads`` is a list of arrays fitting ``specs``.

  Args:
    who: names the shard and the worker in the message.
    grads: the pushed pieces.
    specs: ``(shape, dtype)`` of each piece, in order.
    names: the params leaf each piece is of (for the message).
    what: what the pieces are of: ``"gradient"``, or ``"grad_sq"`` (the
      per-example squares pushed with it), named in the message.
  """
  label = "a gradient" if what == "gradient" else f"a `{what}`"
  prefix = "" if what == "gradient" else f"`{what}` "
  if not isinstance(grads, (list, tuple)) or len(grads) != len(specs):
    raise ValueError(
        f"{who} sent {label} that is not a list of this shard's "
        f"{len(specs)} pieces (got {type(grads).__name__}"
        f"{f' of {len(grads)}' if isinstance(grads, (list, tuple)) else ''}"
        "); rejected, nothing changed."
    )
  for i, (g, (shape, dtype)) in enumerate(zip(grads, specs)):
    got = (tuple(np.shape(g)), getattr(g, "dtype", type(g).__name__))
    if not isinstance(g, (np.ndarray, jax.Array)) or got != (shape, dtype):
      raise ValueError(
          f"{who} sent {prefix}piece {i} (of params{names[i]}) with (shape, "
          f"dtype) {got}, expected {(shape, dtype)}; rejected, nothing "
          "changed."
      )
