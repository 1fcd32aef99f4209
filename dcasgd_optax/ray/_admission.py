"""Which gradients may still be computed, so a run applies exactly its count.

The first server shard keeps an :class:`Admission`. A worker computes a
gradient only with a ticket for it; the shard grants tickets until as many
have been granted as updates are allowed (``limit``: the run's
``num_updates``, or the next checkpoint's step). Each ticket is for one
``(worker, seq)`` and stays with it until that gradient is processed, so a
worker that dies and restarts recomputes a gradient it holds a ticket for,
and asking again is harmless.
"""

from __future__ import annotations

import numpy as np


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

  def reset(self, processed: int) -> None:
    """After a restore: ``processed`` gradients done, no ticket out."""
    self.admitted = int(processed)
    self.granted[:] = -1
