"""A shard's shared-memory channels (:mod:`_shm`): at most one per worker.

A channel belongs to one incarnation of a worker (its ``epoch``). The shard
opens one when the worker asks (from the same node), closes it when a newer
incarnation opens its own or when the shard closes, and refuses what would
cut a live channel off: a request from an earlier incarnation (answered
``None``, the live one stays) or a second request from the same one (an
error).
"""

from __future__ import annotations

import ray

from dcasgd_optax.ray import _shm


def _node_id() -> str | None:
  """This process's Ray node id, or ``None`` outside Ray."""
  if not ray.is_initialized():
    return None
  return ray.get_runtime_context().get_node_id()


class Channels:
  """The channels of one shard, by worker.

  Args:
    shard: the shard's index (in names and messages).
    specs: ``(shape, dtype)`` of each of the shard's pieces, in order.
    push_specs: those of the pieces a push carries (the gradient's, then
      ``grad_sq``'s with ``push_grad_sq=True``); ``None``: ``specs``.
  """

  def __init__(self, shard: int, specs: _shm.Specs,
               push_specs: _shm.Specs | None = None):
    self._shard, self._specs = shard, list(specs)
    self._push_specs = list(specs if push_specs is None else push_specs)
    self._open: dict[int, _shm.Channel] = {}

  def open(self, worker: int, epoch: int, latest: int, node: str | None
           ) -> tuple[str, str, str] | None:
    """Opens a channel for incarnation ``epoch`` of worker ``worker``.

    Args:
      worker: the worker's (checked) id.
      epoch: its (checked) incarnation.
      latest: the latest incarnation of it the shard knows (it attached or
        pushed); an earlier one is refused.
      node: the Ray node id of the worker's process (``None`` outside
        Ray); a channel needs it to be this process's.

    Returns:
      The paths of the gradient buffer, the params buffer and the doorbell,
      for the worker to open; or ``None`` if the worker is on another node,
      ``epoch`` is older than ``latest`` or than the worker's open channel
      (which then stays open), or ``/dev/shm`` cannot hold them. The
      worker's channel of an earlier incarnation, if any, is closed.

    Raises:
      ValueError: if incarnation ``epoch`` has a channel open already (a
        second one would cut off the one it pushes through); nothing is
        changed.
    """
    old = self._open.get(worker)
    if epoch < latest or (old is not None and epoch < old.epoch):
      return None
    if old is not None and epoch == old.epoch:
      raise ValueError(
          f"Shard {self._shard}: worker {worker}'s incarnation {epoch} has a "
          "shared-memory channel open already; refused, nothing changed.")
    if old is not None:
      self._open.pop(worker).close()
    if node != _node_id() or not _shm.available():
      return None
    try:
      channel = _shm.Channel.create(epoch, self._specs,
                                    f"s{self._shard}-w{worker}-e{epoch}",
                                    self._push_specs)
    except OSError:
      return None
    self._open[worker] = channel
    return channel.paths

  def get(self, worker: int, epoch: int) -> _shm.Channel:
    """Incarnation ``epoch``'s channel; ValueError if it has none open."""
    channel = self._open.get(worker)
    if channel is None or channel.epoch != epoch:
      raise ValueError(
          f"Shard {self._shard}: worker {worker} pushed through a shared-"
          f"memory channel, but none is open for its incarnation {epoch}; "
          "rejected, nothing changed.")
    return channel

  def close(self, worker: int, epoch: int) -> None:
    """Closes the worker's channel if it is incarnation ``epoch``'s."""
    channel = self._open.get(worker)
    if channel is not None and channel.epoch == epoch:
      self._open.pop(worker).close()

  def close_all(self) -> None:
    """Closes every channel (unlinking files a worker did not open)."""
    for channel in self._open.values():
      channel.close()
    self._open.clear()
