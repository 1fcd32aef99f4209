"""How a shard's pieces travel in one actor call: one flat message, sent as bytes.

A message (a shard's pieces of one gradient, or of the params it sends
back) is the pieces flattened, in order, into one 1-D array
(:func:`flatten`; in their common dtype, or as raw bytes if they differ).
The jitted steps of workers and shards produce and take that flat array
directly, so a message costs one device-to-host copy and no per-piece work.

Ray passes an argument or a return value of up to 100 kB inside the call
itself, and a larger one through the object store, which costs a few
milliseconds more per object on one machine; and it serializes a ``bytes``
value faster than a NumPy array (benchmarks/ray_throughput.md measures
both). So a message of up to :data:`INLINE_MAX_BYTES` travels as ``bytes``
chunks of at most :data:`CHUNK_BYTES`, each its own argument or return
value; a larger one travels as the flat array, one object, which the
receiver reads without copying. Both sides derive the plan from the pieces'
specs, so the number of parts is known before the call (Ray needs it for
the returns).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Below Ray's default inline limit (max_direct_call_object_size, 100 kB).
CHUNK_BYTES = 96_000
# Above this, one object through the object store is the faster way.
INLINE_MAX_BYTES = 512_000

Specs = Sequence[tuple[tuple[int, ...], np.dtype]]


def _nbytes(specs: Specs) -> list[int]:
  return [math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in specs]


def message_dtype(specs: Specs) -> np.dtype:
  """The flat message's dtype: the pieces' common dtype, else ``uint8``."""
  dtypes = {np.dtype(dtype) for _, dtype in specs}
  return dtypes.pop() if len(dtypes) == 1 else np.dtype(np.uint8)


def _to_bytes(x: Any) -> Any:
  if isinstance(x, np.ndarray):
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8)
  return jax.lax.bitcast_convert_type(x.reshape(-1), jnp.uint8).reshape(-1)


def _from_bytes(x: Any, dtype: np.dtype) -> Any:
  if isinstance(x, np.ndarray):
    return x.view(dtype)
  if dtype.itemsize == 1:
    return jax.lax.bitcast_convert_type(x, dtype)
  return jax.lax.bitcast_convert_type(x.reshape(-1, dtype.itemsize), dtype)


def flatten(pieces: Sequence[Any], specs: Specs) -> Any:
  """``pieces`` (shaped as ``specs``) as one 1-D message (NumPy or traced)."""
  dtype = message_dtype(specs)
  same = dtype != np.uint8 or all(np.dtype(d) == dtype for _, d in specs)
  parts = [p.reshape(-1) if same else _to_bytes(p) for p in pieces]
  xp = np if all(isinstance(p, np.ndarray) for p in parts) else jnp
  return parts[0] if len(parts) == 1 else xp.concatenate(parts)


def unflatten(flat: Any, specs: Specs) -> list[Any]:
  """The pieces of the message ``flat`` (views of it, for NumPy)."""
  dtype = message_dtype(specs)
  same = dtype != np.uint8 or all(np.dtype(d) == dtype for _, d in specs)
  sizes = ([math.prod(s) for s, _ in specs] if same else _nbytes(specs))
  pieces, start = [], 0
  for (shape, piece_dtype), size in zip(specs, sizes):
    part = flat[start:start + size]
    if not same:
      part = _from_bytes(part, np.dtype(piece_dtype))
    pieces.append(part.reshape(shape))
    start += size
  return pieces


def _inline(specs: Specs) -> bool:
  return sum(_nbytes(specs)) <= INLINE_MAX_BYTES


def num_chunks(specs: Specs) -> int:
  """How many arguments (or return values) a message with ``specs`` takes."""
  return max(1, -(-sum(_nbytes(specs)) // CHUNK_BYTES)) if _inline(specs) else 1


def pack(flat: np.ndarray, specs: Specs) -> list[Any]:
  """The message ``flat`` (see :func:`flatten`) as :func:`num_chunks` values."""
  if not _inline(specs):
    return [flat]
  data = np.ascontiguousarray(flat).view(np.uint8)
  return [data[i:i + CHUNK_BYTES].tobytes()
          for i in range(0, max(len(data), 1), CHUNK_BYTES)]


def unpack(parts: Sequence[Any], specs: Specs) -> np.ndarray:
  """The flat message sent as ``parts`` (read-only); ValueError if it does not fit."""
  if len(parts) != num_chunks(specs):
    raise ValueError(
        f"the message came in {len(parts)} parts, not {num_chunks(specs)}")
  dtype, size = message_dtype(specs), sum(_nbytes(specs))
  if _inline(specs):
    if not all(isinstance(c, bytes) for c in parts):
      raise ValueError("the message's parts are not bytes")
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(data) != size:
      raise ValueError(f"the message holds {len(data)} bytes, not {size}")
    return np.frombuffer(data, dtype)
  flat = parts[0]
  if not (isinstance(flat, np.ndarray) and flat.dtype == dtype and
          flat.shape == (size // dtype.itemsize,)):
    got = (getattr(flat, "shape", None), getattr(flat, "dtype", type(flat)))
    raise ValueError(f"the message is {got}, not a 1-D {dtype} array of "
                     f"{size // dtype.itemsize} elements")
  return flat
