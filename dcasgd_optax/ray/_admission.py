"""Which gradients may still be computed, so a run applies exactly its count.

The first server shard keeps an :class:`Admission`. A worker computes a
gradient only with a ticket for it; the shard grants tickets until as many
have been granted as updates are allowed (``limit``: the run's
``num_updates``, or the next checkpoint's step). Each ticket is for one
``(worker, seq)`` and stays with it until that gradient is processed, so a
worker that dies and restarts recomputes a gradient it holds a ticket for,
and asking again is harmless. While a limit is set, the shard also rejects a
push for which it granted no ticket (:meth:`Admission.holds`): the count
does not rest on the workers' good behaviour.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def check_limit(limit: Any) -> int | None:
  """``limit`` as None or an int >= 0; TypeError or ValueError if not."""
  if limit is None:
    return None
  if isinstance(limit, (bool, np.bool_)) or not isinstance(
      limit, numbers.Integral
  ):
    raise TypeError(f"`limit` must be an int >= 0 or None, got {limit!r}.")
  if limit < 0:
    raise ValueError(f"`limit` must be an int >= 0 or None, got {limit}.")
  return int(limit)


class Admission:
  """Grants tickets for gradients; at most ``limit`` in all.

  Args:
    num_workers: number of workers.
    processed: gradients already processed (the shard's step): they count
      against the limit.
  """

  def __init__(self, num_workers: int, processed: int):
    self.limit: int | None = None  # None: no limit (a server used alone).
    self.admitted = int(processed)
    # The highest seq granted to each worker (-1: none yet).
    self.granted = np.full((num_workers,), -1, np.int64)

  def grant(self, worker: int, last_seq: int) -> bool:
    """Whether ``worker`` may compute gradient ``last_seq + 1``.

    Args:
      worker: the worker's id.
      last_seq: the last seq this shard processed from it.
    """
    if self.granted[worker] > last_seq:  # It holds the ticket already.
      return True
    if self.limit is not None and self.admitted >= self.limit:
      return False
    self.admitted += 1
    self.granted[worker] = last_seq + 1
    return True

  def holds(self, worker: int, seq: int) -> bool:
    """Whether ``worker`` may push gradient ``seq``: it was granted a ticket
    for it, or no limit is set (a server used alone)."""
    return self.limit is None or self.granted[worker] >= seq

  def reset(self, processed: int) -> None:
    """After a restore: ``processed`` gradients done, no ticket out."""
    self.admitted = int(processed)
    self.granted[:] = -1
