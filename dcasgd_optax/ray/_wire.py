"""How a list of pieces travels in one actor call: bytes chunks or one object.

Ray passes an argument or a return value of up to 100 kB inside the call
itself, and a larger one through the object store, which costs a few
milliseconds more per object on one machine; and it serializes a ``bytes``
value faster than a NumPy array (benchmarks/ray_throughput.md measures
both). So a message (a shard's pieces of one gradient, or of the params it
sends back) of up to :data:`INLINE_MAX_BYTES` travels as the pieces' bytes,
in order, in ``bytes`` chunks of at most :data:`CHUNK_BYTES`, each its own
argument or return value; a larger one travels as one object (the list of
pieces), which the receiver reads without copying. Both sides derive the
plan from the pieces' specs, so the number of parts is known before the call
(Ray needs it for the returns).
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import numpy as np

# Below Ray's default inline limit (max_direct_call_object_size, 100 kB).
CHUNK_BYTES = 96_000
# Above this, one object through the object store is the faster way.
INLINE_MAX_BYTES = 512_000

Specs = Sequence[tuple[tuple[int, ...], np.dtype]]


def _nbytes(specs: Specs) -> list[int]:
  return [math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in specs]


def _inline(specs: Specs) -> bool:
  return sum(_nbytes(specs)) <= INLINE_MAX_BYTES


def num_chunks(specs: Specs) -> int:
  """How many arguments (or return values) a message with ``specs`` takes."""
  if not _inline(specs):
    return 1
  return max(1, -(-sum(_nbytes(specs)) // CHUNK_BYTES))


def _bytes_of(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def pack(pieces: Sequence[np.ndarray], specs: Specs) -> list[Any]:
  """``pieces`` as :func:`num_chunks` values to send."""
  if not _inline(specs):
    return [list(pieces)]
  data = (_bytes_of(pieces[0]) if len(pieces) == 1 else
          np.concatenate([_bytes_of(p) for p in pieces]))
  return [data[i:i + CHUNK_BYTES].tobytes()
          for i in range(0, max(len(data), 1), CHUNK_BYTES)]


def unpack(parts: Sequence[Any], specs: Specs) -> list[Any]:
  """The pieces sent as ``parts``; raises ValueError if they do not fit.

  Inline pieces are read-only views of the received bytes; a list that came
  as one object is returned as it is (the receiver checks its pieces).
  """
  if len(parts) != num_chunks(specs):
    raise ValueError(
        f"the message came in {len(parts)} parts, not {num_chunks(specs)}")
  if not _inline(specs):
    return parts[0]
  if not all(isinstance(c, bytes) for c in parts):
    raise ValueError("the message's parts are not bytes")
  data = np.frombuffer(parts[0] if len(parts) == 1 else b"".join(parts),
                       np.uint8)
  sizes = _nbytes(specs)
  if len(data) != sum(sizes):
    raise ValueError(f"the message holds {len(data)} bytes, not {sum(sizes)}")
  offsets = np.cumsum([0, *sizes])
  return [data[a:b].view(np.dtype(dtype)).reshape(shape)
          for (shape, dtype), a, b in zip(specs, offsets[:-1], offsets[1:])]
