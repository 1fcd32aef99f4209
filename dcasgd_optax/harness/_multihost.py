"""Several processes, one program: the harness as multi-controller JAX.

On a TPU pod slice or on several GPU nodes every host runs the same script,
``jax.distributed.initialize()`` joins them and ``jax.devices()`` lists the
devices of every host. A simulator's mesh then spans hosts: the per-worker
backups are split over all devices (each host holds its own devices'
workers), the rest is replicated, and every process must make the same
calls with the same arguments, in the same order.

Arguments given as host values (``arrivals``, ``batches``) must be the same
on every process; nothing on the device can tell if they are not, so each
call first compares small fingerprints of them (and of ``devices`` and the
state's shapes) through the distributed runtime's key-value store
(:func:`check_same`): a difference is a ``ValueError`` naming the argument on
every process, and a process that does not reach the call within a bounded
time (a call made on only some processes, a dead or stalled process) is a
``RuntimeError`` naming it, never a hang.

:func:`to_host` reads results on a host: replicated leaves (the server's
params, the metrics) directly, leaves sharded across hosts (the backups)
by one gather that every process takes part in.
"""

from __future__ import annotations

import collections
import hashlib
import json
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

try:  # the distributed runtime's client: JAX-internal, so guarded
  from jax._src import distributed as _distributed
except ImportError:  # pragma: no cover - a JAX without the module
  _distributed = None  # type: ignore[assignment]

# Seconds a process waits by default for the others at the start of a call.
DEFAULT_TIMEOUT = 300.0

# Calls made so far in this process, per set of processes: the n-th call's
# fingerprints are posted under key n, so a call made on only some
# processes (or skipped on one) meets no partner and times out.
_calls: collections.Counter = collections.Counter()


def check_timeout(timeout: Any) -> float:
  """``timeout`` as a positive float of seconds, or a ValueError naming it."""
  if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
      or not timeout > 0):
    raise ValueError(
        f"`process_timeout` must be a number of seconds > 0, got {timeout!r}."
    )
  return float(timeout)


def processes_of(mesh: Any) -> tuple[int, ...]:
  """The processes whose devices ``mesh`` holds, in increasing order."""
  return tuple(sorted({d.process_index for d in mesh.devices.flat}))


def check_mesh(mesh: Any) -> None:
  """Raises unless this process holds some of ``mesh``'s devices.

  In a multi-process program each process computes on its own devices only:
  a mesh that leaves this process's devices out is given the same on every
  process by mistake, or built from another process's device list.
  """
  here = jax.process_index()
  if here not in processes_of(mesh):
    raise ValueError(
        f"`devices` holds none of process {here}'s devices (it spans "
        f"processes {list(processes_of(mesh))}): in a multi-process program "
        "pass the same devices on every process, including some of each "
        "process that takes part (default: jax.devices(), every device)."
    )


def fingerprint(value: Any, *, read_values: bool = False) -> str:
  """A short hash of a host value: an array's shape, dtype and bytes, or a
  pytree's structure and leaf shapes and dtypes (with ``read_values``, also
  the bytes of every leaf this process holds whole: NumPy arrays and
  fully addressable jax Arrays; a global array is the same on every
  process by construction)."""
  data: list[str | bytes]
  if isinstance(value, np.ndarray):
    data = [str(value.shape), str(value.dtype),
            np.ascontiguousarray(value).tobytes()]
  else:
    leaves, treedef = jax.tree.flatten(value)
    data = [str(treedef)]
    data += [
        f"{np.shape(x)}:{getattr(x, 'dtype', type(x).__name__)}"
        for x in leaves]
    if read_values:
      data += [np.ascontiguousarray(np.asarray(x)).tobytes() for x in leaves
               if not isinstance(x, jax.Array) or x.is_fully_addressable]
  digest = hashlib.sha1()
  for item in data:
    digest.update(item if isinstance(item, bytes) else item.encode())
  return digest.hexdigest()[:16]


# What check_same uses of the distributed runtime's client (a JAX-internal
# object: without these methods it falls back to a collective).
_CLIENT_METHODS = ("key_value_set", "blocking_key_value_get",
                   "key_value_delete")


def _client() -> Any:
  """The distributed runtime's client (its key-value store), or None."""
  client = getattr(getattr(_distributed, "global_state", None), "client",
                   None)
  if client is None or not all(hasattr(client, m) for m in _CLIENT_METHODS):
    return None
  return client


def check_same(mesh: Any, call: str, timeout: float,
               read_values: tuple[str, ...] = (), **values: Any) -> None:
  """Raises unless every process of ``mesh`` makes this call with the same
  ``values`` (compared by :func:`fingerprint`).

  Nothing is done when ``mesh`` lies on one process. Each process posts its
  fingerprints in the distributed runtime's key-value store and reads the
  others', waiting at most ``timeout`` seconds for each.

  Args:
    mesh: the simulator's mesh.
    call: what is called (e.g. ``"Simulator.replay"``), for the messages.
    timeout: seconds to wait for another process.
    read_values: the names in ``values`` whose leaves' values are
      compared too, not only their shapes (see :func:`fingerprint`).
    **values: argument name -> host value (the name is what a mismatch
      names).

  Raises:
    ValueError: naming the first argument whose fingerprint differs between
      processes.
    RuntimeError: if a process does not make the call within ``timeout``.
  """
  processes = processes_of(mesh)
  if len(processes) <= 1:
    return
  check_mesh(mesh)
  mine = {"call": call, **{
      k: fingerprint(v, read_values=k in read_values)
      for k, v in values.items()}}
  client = _client()
  if client is None:  # no key-value store: a collective (no time bound)
    _check_by_collective(mine)
    return
  here = jax.process_index()
  tag = ",".join(map(str, processes))
  number = _calls[tag]
  _calls[tag] += 1
  key = lambda n, p: f"dcasgd_optax/calls/{tag}/{n}/{p}"
  client.key_value_set(key(number, here), json.dumps(mine))
  theirs = {}
  for p in processes:
    if p == here:
      continue
    try:
      theirs[p] = json.loads(client.blocking_key_value_get(
          key(number, p), int(timeout * 1000)))
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError(
          f"{call}: process {p} did not make this call (call {number} of "
          f"processes {list(processes)}) within {timeout:g} s. Every process "
          "of the simulator's devices must make the same calls in the same "
          "order: was it called on only some processes, or did process "
          f"{p} stop or die? ({type(e).__name__}: {e})"
      ) from e
  if number >= 2:  # everyone has read call number - 2's keys by now
    client.key_value_delete(key(number - 2, here))
  _compare(call, here, mine, theirs)


def _compare(call: str, here: int, mine: dict[str, str],
             theirs: dict[int, dict[str, str]]) -> None:
  for p, other in sorted(theirs.items()):
    if other.get("call") != call:
      raise RuntimeError(
          f"{call} on process {here} met {other.get('call')} on process {p}: "
          "every process must make the same calls in the same order."
      )
    for name in mine:
      if other.get(name) != mine[name]:
        raise ValueError(
            f"{call}: `{name}` differs between processes {here} and {p} "
            f"(fingerprints {mine[name]} and {other.get(name)}). In a "
            "multi-process program every process must pass the same "
            f"`{name}` (the same values, shapes and dtypes)."
        )


def _check_by_collective(mine: dict[str, str]) -> None:
  """:func:`check_same` without a key-value store: one gather."""
  names = sorted(mine)
  codes = np.array([int(mine[k][:8], 16) if k != "call" else 0
                    for k in names], np.uint32)
  gathered = multihost_utils.process_allgather(codes)
  for i, name in enumerate(names):
    if len(set(gathered[:, i].tolist())) > 1:
      raise ValueError(
          f"{mine['call']}: `{name}` differs between processes. In a "
          f"multi-process program every process must pass the same `{name}`."
      )


def to_host(tree: Any, *, timeout: float = DEFAULT_TIMEOUT) -> Any:
  r"""Every leaf of ``tree`` as a NumPy array holding its whole value.

  For a simulator's state, metrics or any pytree of ``jax.Array``\ s in a
  multi-process program (and in one process, where it is ``np.asarray`` of
  every leaf). Leaves this process holds whole (replicated ones, such as
  the server's params and the metrics, and any leaf on this process's
  devices only) are copied from a local device; leaves split across
  processes (the per-worker backups and model states) are gathered, with
  one collective every process must take part in. So call it on every
  process whenever ``tree`` has such a leaf (the processes first check they
  all made the call, waiting at most ``timeout`` seconds); for replicated
  leaves only, any process may call it alone.

  Args:
    tree: a pytree of arrays.
    timeout: seconds to wait for the other processes before a gather.

  Returns:
    ``tree`` with NumPy leaves.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dcasgd_optax.harness import to_host
    >>> to_host({'w': jnp.arange(3.0)})['w'].tolist()
    [0.0, 1.0, 2.0]
  """
  check_timeout(timeout)
  leaves, treedef = jax.tree.flatten(tree)
  split = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)
           and not (x.is_fully_addressable or x.is_fully_replicated)]
  host = [np.asarray(x) if i not in split else None
          for i, x in enumerate(leaves)]
  if split:
    first = leaves[split[0]].sharding
    mesh = getattr(first, "mesh", None)
    devices = np.array(sorted(first.device_set, key=lambda d: d.id))
    if mesh is None or not hasattr(mesh, "devices"):
      mesh = jax.sharding.Mesh(devices, ("all",))
    check_same(mesh, "to_host", timeout,
               tree=jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                   np.shape(x), x.dtype), tree))
    gathered = multihost_utils.process_allgather(
        [leaves[i] for i in split], tiled=True)
    for i, x in zip(split, gathered):
      host[i] = np.asarray(x)
  return jax.tree.unflatten(treedef, host)


def is_main_process() -> bool:
  """Whether this is process 0, the one that evaluates and writes results
  in the experiments (always True in a one-process program)."""
  return jax.process_index() == 0

