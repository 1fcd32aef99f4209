"""Replays asynchronous SGD with exact, chosen staleness.

The arrival order is split into runs in which no worker repeats. Inside a run
every worker's gradient depends only on what that worker held when the run
began, so a run's gradients are computed together (one batched call, its
slots spread over the devices) and then applied one by one, in arrival order,
by the server. Runs are cut into chunks of a fixed number of slots; padded
slots cost gradient compute only, never server work or model copies. The
chunks run in one compiled program, or one jitted call each
(``_programs``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax

from dcasgd_optax._src import _checks as core_checks
from dcasgd_optax._src import _tree
from dcasgd_optax._src.delay_compensation import delay_compensation
from dcasgd_optax._src.pull import find_states
from dcasgd_optax.harness import _checks
from dcasgd_optax.harness import _devices
from dcasgd_optax.harness import _gathers
from dcasgd_optax.harness import _plan
from dcasgd_optax.harness import _programs
from dcasgd_optax.harness import _setup
from dcasgd_optax.harness import _state
from dcasgd_optax.harness._state import SimState


def _resolve_tx(tx: Any, params: Any, num_workers: int) -> Any:
  """``tx`` if it keeps one full set of backups, else ``tx`` after λ=0 ones."""
  states = find_states(jax.eval_shape(tx.init, params))
  if not states:
    return optax.chain(delay_compensation(num_workers, 0.0), tx)
  if len(states) > 1 or any(
      _tree.is_masked(b)
      for b in jax.tree.leaves(states[0].backups, is_leaf=_tree.is_masked)
  ):
    raise ValueError(
        "`tx` must hold exactly one DelayCompensationState covering every "
        f"parameter (found {len(states)}, or one inside optax.masked): the "
        "simulator reads what each worker holds from its backups."
    )
  leaves = jax.tree.leaves(states[0].backups)
  if leaves and leaves[0].shape[0] != num_workers:
    raise ValueError(
        f"`num_workers`={num_workers} disagrees with `tx`, whose "
        f"DelayCompensationState keeps backups for {leaves[0].shape[0]} "
        "workers. Build both with the same number of workers."
    )
  return optax.with_extra_args_support(tx)


class Simulator:
  r"""Asynchronous SGD with simulated, exact staleness (ASGD, DC-ASGD, ...).

  Replays a given order of gradient arrivals at a parameter server with
  ``num_workers`` workers. Every worker starts holding the initial params. At
  arrival ``k`` worker ``m = arrivals[k]`` pushes the gradient of ``loss_fn``
  at the model it holds on ``batches[k]``; the server applies

  .. math::
    u, s \leftarrow \mathrm{tx.update}(g, s, w, \mathrm{worker}=m,
    \mathrm{staleness}=\tau), \quad w \leftarrow w + u

  with :math:`\tau` the server updates since ``m``'s last pull, and ``m``
  pulls the new ``w`` (:func:`record_pull`). The workers' models are the
  backups in ``tx``'s DelayCompensationState (one copy, not two); a ``tx``
  without one (any optax optimizer) runs after ``delay_compensation(
  num_workers, 0.0)``, i.e. as plain ASGD, through the same path.

  The result equals a one-arrival-at-a-time loop (to float rounding) for any
  order, is bitwise deterministic, and ``replay(a)`` then ``replay(b)``
  equals ``replay(a + b)``. Sequential SGD is ``num_workers=1``.

  Stateful models (``has_model_state=True``): ``loss_fn(params, model_state,
  batch) -> (loss, new_model_state)``. Each worker pulls the model state with
  the params, so it computes with the state it last received; the server
  keeps the state pushed by the most recent arrival (``SimState.model_state``,
  the one to evaluate with). Since a worker pulls right after its push, each
  worker's statistics evolve only on its own batches.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or the stateful form).
      Closing over on-device data and passing index arrays as batches is the
      common case.
    tx: any optax transformation; DC-ASGD from :func:`dcasgd_optax.dcasgd`.
    num_workers: number of asynchronous workers (>= 1).
    devices: devices to spread each batch of gradients over (default: all
      local devices); the server state is replicated on each.
    has_model_state: whether ``loss_fn`` takes and returns a model state.
    max_parallel: most gradients computed at once (bounds the memory they
      take). Default ``num_workers``, except on CPU, where it is capped so
      that they take at most 16 MiB per device (they then stay in cache),
      and with ``"host_chunks"``, where it is capped at 8 per device (the
      program holds one copy of the gradient per slot: compile time grows
      with it). Rounded to a multiple of the device count; it never changes
      results.
    vmap_slots: how many of a device's gradients one vmapped call computes;
      the groups run in a loop (``"compiled"``) or one after the other
      (``"host_chunks"``). Default: all of them on GPU/TPU, one on CPU
      (where vmapping a convolution over per-worker kernels is very slow).
    donate: donate the input state to ``replay`` so the backups are updated
      in place (the state passed in is then deleted).
    strategy: ``"compiled"``: the whole replay is one compiled program, a
      loop over chunks (no Python per chunk). ``"host_chunks"``: Python loops
      over the chunks, one jitted call each (the state donated from call to
      call), whose gradients are computed outside any loop. Default
      ``"host_chunks"`` on CPU, ``"compiled"`` elsewhere: XLA:CPU compiles a
      convolution's gradient inside a loop to a slow path (9-24x slower), so
      on CPU a convolutional net replays ~9x (small CNN) to ~25x (ResNet-20)
      faster with host chunks, and an MLP about as fast
      (benchmarks/harness_throughput.md). Both give the same result to float
      rounding, each bitwise deterministic.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> from dcasgd_optax.harness import Simulator, schedules
    >>> targets = jnp.linspace(0.5, 1.5, 16)  # on-device data
    >>> loss_fn = lambda p, i: (p['w'] - targets[i]) ** 2  # batch: an index
    >>> tx = dcasgd_optax.dcasgd(0.1, num_workers=4)
    >>> sim = Simulator(loss_fn, tx, num_workers=4)
    >>> state = sim.init({'w': jnp.zeros(())})
    >>> arrivals = schedules.cyclic(4, 16)
    >>> state, metrics = sim.replay(state, jnp.arange(16), arrivals)
    >>> metrics['staleness'].tolist()
    [0, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]
    >>> bool(abs(state.params['w'] - 1.0) < 0.3)  # near the mean target
    True
  """

  def __init__(
      self,
      loss_fn: Callable[..., Any],
      tx: optax.GradientTransformation,
      num_workers: int,
      *,
      devices: Sequence[Any] | None = None,
      has_model_state: bool = False,
      max_parallel: int | None = None,
      vmap_slots: int | None = None,
      donate: bool = True,
      strategy: str | None = None,
  ):
    if max_parallel is not None:
      core_checks.check_positive_int("max_parallel", max_parallel)
    s = _setup.setup(loss_fn, tx, num_workers, devices, has_model_state,
                     vmap_slots, strategy)
    self.num_workers, self._loss3, self.mesh = s.num_workers, s.loss3, s.mesh
    self._vmap_slots, self.strategy = s.vmap_slots, s.strategy
    self._has_model_state = has_model_state
    self._user_tx = tx
    self._max_parallel = max_parallel
    self._donate = donate
    self._compiled: dict[Any, tuple[Any, Any]] = {}
    self._loss_checked: dict[Any, Any] = {}

  def _program(self, params: Any) -> tuple[Any, Any]:
    """The transformation run and its jitted replay, cached per params shape."""
    key = _checks.signature(params)
    if key not in self._compiled:
      tx = _resolve_tx(self._user_tx, params, self.num_workers)
      args = (self._loss3, tx, self.mesh, self._vmap_slots)
      if self.strategy == "compiled":
        program = jax.jit(
            functools.partial(_programs.replay_program, *args),
            static_argnames=("chunk", "loss_dtype"),
            donate_argnums=(0,) if self._donate else (),
        )
      else:  # a copy is donated when the caller's state is not (replay)
        program = jax.jit(
            functools.partial(_programs.chunk_program, *args, True),
            donate_argnums=(0,),
        )
      self._compiled[key] = (tx, program)
    return self._compiled[key]

  def tx(self, params: Any) -> optax.GradientTransformationExtraArgs:
    """The transformation the server runs for params shaped like ``params``."""
    return self._program(params)[0]

  def init(self, params: Any, model_state: Any = None) -> SimState:
    """Every worker holds ``params`` (and ``model_state``); no update yet.

    Args:
      params: the initial model (copied; the argument is never donated).
      model_state: the initial model state, only with ``has_model_state``.

    Returns:
      A :class:`SimState`, replicated on the simulator's devices.
    """
    model_state = _checks.check_model_state(model_state, self._has_model_state)
    tx, _ = self._program(params)
    return _state.initial_state(
        SimState, tx, self.num_workers, self.mesh, params, model_state,
        per_worker_model_state=True,
    )

  def _plan(self, arrivals: np.ndarray, params: Any) -> _plan.Plan:
    host = self.strategy == "host_chunks"
    cap = _setup.HOST_SLOTS_PER_DEVICE if host else None
    limit = _plan.slot_limit(
        self.num_workers, self._max_parallel, self.mesh, params, cap
    )
    return _plan.make_plan(arrivals, limit, self.mesh.size)

  def describe(self, arrivals: Any, params: Any) -> dict[str, Any]:
    """How ``replay`` batches ``arrivals`` for ``params``: runs, chunks, fill.

    ``num_runs`` counts the maximal runs with no repeated worker, each cut
    into chunks of ``chunk`` gradient slots; ``fill_ratio`` is arrivals /
    slots computed (1.0: no padding); ``strategy`` is how the chunks run.
    """
    arrivals = _checks.check_arrivals(arrivals, self.num_workers)
    plan = self._plan(arrivals, params)
    slots = plan.num_chunks * plan.chunk
    return dict(
        num_arrivals=len(arrivals), num_runs=plan.num_runs, chunk=plan.chunk,
        num_chunks=plan.num_chunks, fill_ratio=len(arrivals) / slots,
        strategy=self.strategy,
    )

  def replay(
      self, state: SimState, batches: Any, arrivals: Any
  ) -> tuple[SimState, dict[str, jax.Array]]:
    """Replays ``arrivals`` from ``state`` (see ``strategy``).

    Args:
      state: from :meth:`init` or a previous ``replay`` (donated unless the
        simulator was built with ``donate=False``).
      batches: a pytree whose leaves have leading axis ``len(arrivals)``;
        arrival ``k`` uses ``batches[k]``.
      arrivals: concrete 1-D integer array of worker ids in
        ``[0, num_workers)``, in the order their gradients reach the server.

    Returns:
      ``(state, metrics)``; ``metrics`` holds arrays of length
      ``len(arrivals)``: ``"loss"`` (the loss at the model the worker held,
      non-finite values included), ``"staleness"`` (int32, server updates
      since that worker's last pull) and ``"worker"`` (the arrivals).
    """
    arrivals = _checks.check_arrivals(arrivals, self.num_workers)
    _checks.check_batches(batches, len(arrivals), "len(arrivals)")
    self._check_state(state)
    _, program = self._program(state.params)
    loss = self._check_loss(state, batches)
    plan = self._plan(arrivals, state.params)
    batches = _devices.replicate(batches, self.mesh)
    if self.strategy == "compiled":
      return program(
          state, batches, arrivals, plan.starts, plan.lengths,
          np.int32(plan.num_chunks), chunk=plan.chunk, loss_dtype=loss.dtype,
      )
    if not self._donate:
      state = _gathers.copy_tree(state)
    return _programs.replay_host_chunks(
        program, state, batches, arrivals, plan
    )

  def _check_state(self, state: Any) -> None:
    _state.check_state(state, SimState, self.num_workers)
    if len(find_states(state.opt_state)) != 1:
      raise ValueError(
          "`state.opt_state` must hold exactly one DelayCompensationState; "
          "make the state with `sim.init`."
      )

  def _check_loss(self, state: SimState, batches: Any) -> Any:
    """``loss_fn``'s abstract loss on one batch (checked once per shape)."""
    return _checks.check_loss_fn_cached(
        self._loss_checked, self._loss3, state.params, state.model_state,
        batches,
    )
