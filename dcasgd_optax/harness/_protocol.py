"""The protocol both simulators share: constructor arguments, init, checks.

:class:`Simulator` (asynchronous) and :class:`SyncSimulator` (SSGD) take the
same constructor arguments, keep the server's transformation in the attribute
``tx``, make a :class:`SimState` with ``init(params, model_state=None)``,
``replay(state, batches, arrivals)`` and ``describe(arrivals, params)`` it,
and report the same metric keys (``worker``, ``staleness``, ``loss``,
``step``), so a caller never branches on which one it holds. Both also run
``N`` simulations as one program: ``init_many`` and ``replay_many``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

from dcasgd_optax import extend
from dcasgd_optax.harness import _checks
from dcasgd_optax.harness import _devices
from dcasgd_optax.harness import _diagnostics
from dcasgd_optax.harness import _multihost
from dcasgd_optax.harness import _optimizer
from dcasgd_optax.harness import _plan
from dcasgd_optax.harness import _slots
from dcasgd_optax.harness import _state
from dcasgd_optax.harness._state import SimState

# How a replay runs: one compiled program, or the host looping over chunks.
STRATEGIES = ("compiled", "host_chunks")

# Most gradient slots per device in one "host_chunks" call, by default: the
# program holds one unrolled copy of the gradient per slot, so its compile
# time grows with it.
HOST_SLOTS_PER_DEVICE = 8


def default_strategy(mesh: Mesh, strategy: str | None,
                     per_loss: bool = False) -> str | None:
  """``strategy``, else ``"compiled"`` on GPU/TPU; on CPU ``"host_chunks"``,
  or ``None`` if ``per_loss``: then :func:`cpu_strategy` picks it per loss
  function (the simulator traces its gradient once per shape).
  """
  if strategy is None:
    if mesh.devices.flat[0].platform != "cpu":
      return "compiled"
    return None if per_loss else "host_chunks"
  if strategy not in STRATEGIES:
    raise ValueError(
        f"`strategy` must be one of {STRATEGIES} or None, got {strategy!r}."
    )
  return strategy


def cpu_strategy(convolves: bool) -> str:
  """The default strategy on CPU for a ``loss_fn`` whose gradient
  ``convolves`` (``"host_chunks"``) or not (``"compiled"``).

  XLA:CPU compiles a convolution's kernel gradient inside a loop body
  (``while``, hence ``scan``) to a slow path, much slower than the same
  gradient outside any loop, so ``"host_chunks"`` keeps gradients out of
  loops; matrix products have no such path, and one program then saves a
  call per chunk (figures in benchmarks/harness_throughput.md).
  """
  return "host_chunks" if convolves else "compiled"


def stream_metrics(
    final_step: jax.Array,
    steps_A: np.ndarray,
    arrivals: np.ndarray,
    record: dict[str, Any],
) -> dict[str, Any]:
  """The per-arrival record both simulators return (the keys Ray uses too).

  ``record`` holds ``"loss"``, ``"staleness"`` and any diagnostics; this adds
  ``"worker"`` (the arrivals) and ``"step"``, the server step after the
  update that applied the arrival (1-based): ``final_step + steps_A``, with
  ``steps_A`` counted back from the replay's last update (0).
  """
  return {
      "worker": jnp.asarray(arrivals),
      "step": final_step + jnp.asarray(steps_A, jnp.int32),
      **record,
  }


class SimulatorBase:
  """Construction, ``init`` and input checks shared by both simulators."""

  # Whether each worker keeps its own model (the backups) and model state,
  # sharded by worker (Simulator), or all compute with the server's
  # (SyncSimulator).
  _per_worker: bool
  # Whether the default strategy on CPU is picked per loss function
  # (``cpu_strategy``), or is "host_chunks".
  _strategy_per_loss: bool = False
  # The exact compensation's lambda (Simulator's ``exact_compensation``,
  # set before this constructor runs), or None.
  _exact: float | None = None

  def __init__(
      self,
      loss_fn: Callable[..., Any],
      tx: optax.GradientTransformation,
      num_workers: int | None = None,
      *,
      devices: Sequence[jax.Device] | None = None,
      has_model_state: bool = False,
      max_parallel: int | None = None,
      vmap_slots: int | None = None,
      donate: bool = True,
      strategy: str | None = None,
      diagnostics: bool = False,
      diagnostics_every: int | None = None,
      first_transform: Any = None,
      diagnose_curvature: bool = False,
      process_timeout: float = _multihost.DEFAULT_TIMEOUT,
  ) -> None:
    for name, value in (("num_workers", num_workers),
                        ("max_parallel", max_parallel),
                        ("vmap_slots", vmap_slots)):
      if value is not None:
        extend.check_positive_int(name, value)
    if not hasattr(tx, "init") or not hasattr(tx, "update"):
      raise TypeError(f"`tx` must be an optax transformation, got {tx!r}.")
    self.num_workers = num_workers
    self._process_timeout = _multihost.check_timeout(process_timeout)
    self.mesh = _devices.make_mesh(devices)
    # Whether the mesh spans processes: each call is then checked across them.
    self._multiprocess = len(_multihost.processes_of(self.mesh)) > 1
    self.strategy = default_strategy(self.mesh, strategy,
                                     self._strategy_per_loss)
    self._loss_with_state = _checks.with_model_state(loss_fn, has_model_state)
    self._has_model_state = has_model_state
    self._vmap_slots_given = vmap_slots
    self._vmap_slots = _slots.default_vmap_slots(self.mesh, vmap_slots)
    self._max_parallel = max_parallel
    self._donate = donate
    if first_transform is None:  # The library's full optimizers know it.
      first_transform = extend.compensation_of(tx)
    self._diagnostics = _diagnostics.make(
        diagnostics, diagnostics_every, first_transform, has_model_state,
        diagnose_curvature, self._exact,
    )
    self._user_tx = tx
    self.tx = self._server_tx(tx, num_workers)
    self._workers: dict[Any, int] = {}
    self._abstract_states: dict[Any, SimState] = {}
    self._loss_checked: dict[Any, Any] = {}
    self._make_programs()

  def _server_tx(self, tx: Any, num_workers: int | None) -> Any:
    """The transformation the server runs (the attribute ``tx``)."""
    raise NotImplementedError

  def _make_programs(self) -> None:
    """Builds the jitted programs (once: they close over ``tx``)."""
    raise NotImplementedError

  def workers_for(self, params: optax.Params) -> int:
    """The number of workers for ``params`` (from ``tx``'s state's shape)."""
    key = _checks.signature(params)
    if key not in self._workers:
      self._workers[key] = _optimizer.workers_of(
          self._user_tx, params, self.num_workers
      )
    return self._workers[key]

  def init(self, params: optax.Params, model_state: Any = None) -> SimState:
    """Every worker holds ``params`` (and ``model_state``); no update yet.

    Args:
      params: the initial model (copied; the argument is never donated).
      model_state: the initial model state, only with ``has_model_state``.

    Returns:
      A :class:`SimState`, replicated on the simulator's devices, made for
      :meth:`workers_for` ``(params)`` workers.
    """
    model_state = _checks.check_model_state(model_state, self._has_model_state)
    self._same_on_every_process("init", params=params,
                                model_state=model_state,
                                read_values=("params", "model_state"))
    return _state.initial_state(
        self.tx, self.workers_for(params), self.mesh, params, model_state,
        per_worker=self._per_worker,
    )

  def init_many(self, params: optax.Params, model_state: Any = None, *,
                hyperparams: dict[str, Any] | None = None) -> SimState:
    """``N`` initial states at once, for :meth:`replay_many`.

    Args:
      params: the initial models, every leaf with a leading axis ``N`` (e.g.
        ``jax.vmap(init_fn)(keys)`` for ``N`` seeds).
      model_state: the initial model states likewise, only with
        ``has_model_state``.
      hyperparams: optional values per simulation, ``name -> [N]`` array,
        of the hyperparameters ``tx`` carries in its state through
        ``optax.inject_hyperparams`` (e.g. ``{"learning_rate": lrs}``).

    Returns:
      A :class:`SimState` whose every leaf has a leading axis ``N``.
    """
    model_state = _checks.check_model_state(model_state, self._has_model_state)
    num = _checks.leading_axis("params", params)
    _checks.leading_axis("model_state", model_state, num)
    hyperparams = dict(hyperparams or {})
    _checks.leading_axis("hyperparams", hyperparams, num)
    self._same_on_every_process(
        "init_many", params=params, model_state=model_state,
        hyperparams=hyperparams,
        read_values=("params", "model_state", "hyperparams"))
    one = jax.tree.map(lambda x: x[0], params)
    return _state.initial_states(
        self.tx, self.workers_for(one), self.mesh, params, model_state,
        hyperparams, per_worker=self._per_worker,
    )

  def _same_on_every_process(self, call: str, read_values=(),
                             **values: Any) -> None:
    """Raises unless every process of the mesh makes this call with the
    same ``values`` and ``devices`` (nothing to check in one process; see
    ``_multihost.check_same``)."""
    if not self._multiprocess:
      return
    ids = np.array([d.id for d in self.mesh.devices.flat], np.int64)
    _multihost.check_same(self.mesh, f"{type(self).__name__}.{call}",
                          self._process_timeout, read_values, devices=ids,
                          **values)

  def _check_state(self, state: Any, num_sims: int | None = None) -> int:
    """Raises unless ``state`` is what ``init`` makes (``init_many`` for
    ``num_sims`` simulations); returns its number of workers."""
    if not isinstance(state, SimState):
      raise ValueError(
          f"`state` must be a SimState from `init`, got {type(state).__name__}."
      )
    leading = () if num_sims is None else (num_sims,)
    one = state if num_sims is None else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), state)
    key = _checks.signature((one.params, one.model_state))
    if key not in self._abstract_states:
      expected = _state.abstract_initial_state(
          self.tx, self.workers_for(one.params), self.mesh, one.params,
          one.model_state, per_worker=self._per_worker,
      )
      self._check_diagnostics(expected)
      self._abstract_states[key] = expected
    expected = self._abstract_states[key]
    _state.check_state(state, expected, leading)
    return expected.last_pull.shape[0]

  def _check_diagnostics(self, expected: SimState) -> None:
    """Raises if the diagnostics cannot run for this state (see subclasses)."""

  def _check_batches(self, state: SimState, batches: Any, num: int,
                     leading: tuple = ()) -> Any:
    """Checks ``batches`` against ``num`` arrivals (after ``leading`` axes,
    ``(N,)`` for N simulations) and ``loss_fn`` (with ``state``, one
    simulation's).

    Returns:
      The loss's abstract value (traced once per shape).
    """
    what = "N, len(arrivals)" if leading else "len(arrivals)"
    _checks.check_batches(batches, (*leading, num), what)
    one_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        np.shape(x)[len(leading):], jnp.result_type(x)), batches)
    return _checks.check_loss_fn_cached(
        self._loss_checked, self._loss_with_state, state.params,
        state.model_state, one_batch,
    )

  def _slot_limit(self, num_workers: int, params: Any,
                  strategy: str | None = None) -> int:
    """Most gradients computed at once (see ``max_parallel``) by
    ``strategy`` (default ``self.strategy``)."""
    host = (strategy or self.strategy) == "host_chunks"
    cap = HOST_SLOTS_PER_DEVICE if host else None
    return _plan.slot_limit(
        num_workers, self._max_parallel, self.mesh, params, cap
    )
