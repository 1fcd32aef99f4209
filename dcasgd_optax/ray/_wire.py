"""How a list of pieces travels in one actor call: inline chunks or one object.

Ray passes an argument or a return value of up to 100 kB inside the call
itself, and a larger one through the object store, which costs a few
milliseconds more per object on one machine (benchmarks/ray_throughput.md).
So a message (a shard's pieces of one gradient, or of the params it sends
back) of up to :data:`INLINE_MAX_BYTES` travels as chunks of at most
:data:`CHUNK_BYTES`, each its own argument or return value; a larger one
travels as one object (the list of pieces), which the receiver reads
without copying. Both sides derive the plan from the pieces' specs, so the
number of chunks is known before the call (Ray needs it for the returns).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

# Below Ray's default inline limit (max_direct_call_object_size, 100 kB).
CHUNK_BYTES = 96_000
# Above this, one object through the object store is the faster way.
INLINE_MAX_BYTES = 512_000

Specs = Sequence[tuple[tuple[int, ...], np.dtype]]


def _nbytes(specs: Specs) -> list[int]:
  return [math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in specs]


def _chunked(specs: Specs) -> bool:
  """Too large to go inline as one value, small enough to go as several."""
  return CHUNK_BYTES < sum(_nbytes(specs)) <= INLINE_MAX_BYTES


def num_chunks(specs: Specs) -> int:
  """How many arguments (or return values) a message with ``specs`` takes."""
  return -(-sum(_nbytes(specs)) // CHUNK_BYTES) if _chunked(specs) else 1


def pack(pieces: Sequence[np.ndarray], specs: Specs) -> list[Any]:
  """``pieces`` as :func:`num_chunks` values to send."""
  if not _chunked(specs):
    return [list(pieces)]
  flat = np.concatenate(
      [np.ascontiguousarray(p).reshape(-1).view(np.uint8) for p in pieces])
  return [flat[i:i + CHUNK_BYTES] for i in range(0, len(flat), CHUNK_BYTES)]


def unpack(chunks: Sequence[Any], specs: Specs) -> list[Any]:
  """The pieces sent as ``chunks``; raises ValueError if they do not fit."""
  if len(chunks) != num_chunks(specs):
    raise ValueError(
        f"the message came in {len(chunks)} parts, not {num_chunks(specs)}")
  if not _chunked(specs):
    return chunks[0]  # The pieces themselves, checked by the receiver.
  if not all(isinstance(c, np.ndarray) and c.dtype == np.uint8 and c.ndim == 1
             for c in chunks):
    raise ValueError("the message's parts are not byte arrays")
  flat = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
  sizes = _nbytes(specs)
  if len(flat) != sum(sizes):
    raise ValueError(f"the message holds {len(flat)} bytes, not {sum(sizes)}")
  offsets = np.cumsum([0, *sizes])
  return [flat[a:b].view(np.dtype(dtype)).reshape(shape)
          for (shape, dtype), a, b in zip(specs, offsets[:-1], offsets[1:])]
