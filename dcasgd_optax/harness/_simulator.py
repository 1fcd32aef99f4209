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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcasgd_optax.harness import _checks
from dcasgd_optax.harness import _devices
from dcasgd_optax.harness import _diagnostics
from dcasgd_optax.harness import _exact
from dcasgd_optax.harness import _gathers
from dcasgd_optax.harness import _optimizer
from dcasgd_optax.harness import _per_example
from dcasgd_optax.harness import _plan
from dcasgd_optax.harness import _programs
from dcasgd_optax.harness import _protocol
from dcasgd_optax.harness import _slots
from dcasgd_optax.harness import _state
from dcasgd_optax.harness._state import SimState


class Simulator(_protocol.SimulatorBase):
  r"""Asynchronous SGD with simulated, exact staleness (ASGD, DC-ASGD, ...).

  Replays a given order of gradient arrivals at a parameter server with
  ``M`` workers. Every worker starts holding the initial params. At
  arrival ``k`` worker ``m = arrivals[k]`` pushes the gradient of ``loss_fn``
  at the model it holds on ``batches[k]``; the server applies

  .. math::
    u, s \leftarrow \mathrm{tx.update}(g, s, w, \mathrm{worker}=m,
    \mathrm{staleness}=\tau), \quad w \leftarrow w + u

  with :math:`\tau` the server updates since ``m``'s last pull, and ``m``
  pulls (:func:`dcasgd_optax.pull`: it then holds the new ``w``, or the
  look-ahead a look-ahead optimizer predicts, and computes its next gradient
  there); the pull is made once per arrival, by ``tx`` if it pulls inside
  its update (its state says so, :func:`dcasgd_optax.extend.pulls_in_update`:
  e.g. :func:`dcasgd_optax.dcasgd`, also under ``optax.inject_hyperparams``),
  else by the simulator. The workers' models
  are the backups in ``tx``'s
  DelayCompensationState (one copy, not two), so ``M``
  is the leading axis of those backups; a ``tx`` without one (any optax
  optimizer) runs after ``delay_compensation(num_workers, 0.0)``, i.e. as
  plain ASGD, through the same path (``sim.tx`` is the transformation the
  server runs).

  The result equals a one-arrival-at-a-time loop (to float rounding) for any
  order, is bitwise deterministic, and ``replay(a)`` then ``replay(b)``
  equals ``replay(a + b)``. Sequential SGD is ``num_workers=1``.

  Stateful models (``has_model_state=True``): ``loss_fn(params, model_state,
  batch) -> (loss, new_model_state)``. The model-state policy is the one of a
  parameter server: each worker computes with the model state it last pulled
  and pushes the new one with its gradient; the server keeps the most recent
  push (``SimState.model_state``, the one to evaluate with) and the worker
  pulls it back with the params, so each worker's statistics (e.g. BatchNorm
  running means) evolve on its own batches only. No averaging, on purpose:
  an asynchronous server has no round to average over, and averaging in the
  other workers' states would mix in statistics of models up to
  :math:`\tau` updates old. (:class:`SyncSimulator` averages each round's
  states; both keep one server state built from the latest update's
  batches, and both evaluate with ``state.model_state``.)

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or the stateful form).
      Closing over on-device data and passing index arrays as batches is the
      common case.
    tx: any optax transformation; DC-ASGD from :func:`dcasgd_optax.dcasgd`.
    num_workers: number of asynchronous workers (>= 1). Optional when ``tx``
      keeps per-worker backups (their leading axis is the number); if given
      it must agree with them.
    devices: devices to spread the workers over (default:
      ``jax.devices()``, every device; in a multi-process program, such as
      a TPU pod slice, those of every process: docs/pod.md). Each device
      holds the backups (and model states) of a contiguous block of workers
      and computes their gradients, so backup memory per device falls as
      1/D; the server's params and optimizer
      statistics are replicated, and on several devices ``tx`` reads the
      arriving worker's row through a stand-in (that row broadcast to all
      rows), so it must read only that worker's row, as every
      transformation of :mod:`dcasgd_optax` does.
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
      (``"host_chunks"``). Default: all of them, except one on CPU when
      ``loss_fn``'s gradient convolves (XLA:CPU runs a convolution vmapped
      over per-worker kernels as a slow grouped convolution).
    donate: donate the input state to ``replay`` so the backups are updated
      in place (the state passed in is then deleted).
    strategy: ``"compiled"``: the whole replay is one compiled program, a
      loop over chunks (no Python per chunk). ``"host_chunks"``: Python loops
      over the chunks, one jitted call each (the state donated from call to
      call), whose gradients are computed outside any loop. Default
      ``"compiled"`` on GPU/TPU; on CPU it is picked per loss function (the
      attribute ``strategy`` is then None; :meth:`describe` reports the
      choice): ``"host_chunks"`` if ``loss_fn``'s gradient convolves
      (XLA:CPU compiles a convolution's gradient inside a loop to a slow
      path, so a convolutional net replays much faster with host chunks),
      else ``"compiled"`` (faster for matrix products: no call per chunk;
      figures in benchmarks/harness_throughput.md). Both give the same
      result to float rounding, each bitwise deterministic.
    diagnostics: also measure whether compensation helps: for each sampled
      arrival the server computes the fresh gradient :math:`f` on the same
      batch at its current model (before the update) and compares with it
      the pushed gradient :math:`g` and the direction :math:`d` the first
      transformation of its chain made of it (see Returns). The extra cost
      is one gradient per sampled arrival. Not with ``has_model_state``.
    diagnostics_every: sample only the arrivals whose server step before
      their update is a multiple of it (implies ``diagnostics``; ``True``
      samples every arrival). Unsampled arrivals get NaN.
    first_transform: the transformation that starts ``tx``'s chain, whose
      output is the applied direction :math:`d` (it is run again on the
      pushed gradient with its own part of the server's state, found in
      ``tx``'s state by its structure). Not needed for the full optimizers
      of :mod:`dcasgd_optax` (:func:`dcasgd_optax.dcasgd`, ...), which say
      what theirs is (``tx.compensation``); needed for diagnostics when
      another ``tx`` keeps its own DelayCompensationState; for an optimizer
      without one, :math:`d = g` (plain ASGD applies what was pushed).
    diagnose_curvature: also measure how right the compensation's curvature
      is (implies ``diagnostics``): for each sampled arrival of worker
      :math:`m`, with :math:`\delta = w - w_m` (the server's model minus the
      one the worker computed at), the ratio

      .. math::
        k = \frac{\delta^\top (d - g)}{\delta^\top H(w_m) \, \delta}

      of the compensation term :math:`d - g = \hat H \delta` (for DC-ASGD
      :math:`\hat H = \lambda \, g \odot g`, :math:`\lambda_t \, g \odot g`
      for DC-ASGD-a) to the true curvature along :math:`\delta`, the
      Hessian of the worker's batch loss at :math:`w_m` (a Hessian-vector
      product, ``jax.jvp`` of the gradient): 1 is exact, below 1 an
      under-estimate. Metric ``"curvature_ratio"`` (float32, NaN where not
      sampled or :math:`\delta = 0`). Needs a compensation with a curvature
      estimate: ``first_transform`` (whose state is or holds a
      DelayCompensationState, e.g.
      :func:`dcasgd_optax.secant_compensation`'s) or
      ``exact_compensation`` (for which :math:`k = \lambda`); else a
      ValueError before anything runs. For a
      compensation that is not a Taylor correction (e.g.
      :func:`dcasgd_optax.gap_aware`, which shrinks :math:`g`) it reads
      the shrinkage as a curvature.
    exact_compensation: :math:`\lambda \ge 0`, or None (default: off).
      The exact Taylor compensation, the ceiling of every first-order
      correction: the server corrects each pushed gradient with the exact
      Hessian-vector product on the worker's own batch :math:`b`,

      .. math::
        \tilde g = g + \lambda \, H(w_m) \, (w - w_m), \qquad
        H(w_m) = \nabla^2 L(w_m, b),

      (``jax.jvp`` of the gradient at the worker's model :math:`w_m` along
      :math:`w - w_m`, about two gradients of extra cost per arrival,
      computed one arrival at a time) and ``tx`` receives :math:`\tilde g`,
      so ``tx`` should be a plain optimizer (``optax.sgd``, with momentum,
      ...): one with its own compensation would add its term too. On a
      quadratic loss with :math:`\lambda = 1`, :math:`\tilde g` is the
      fresh gradient :math:`\nabla L(w, b)`, so the replay is sequential
      SGD on the arrivals' batches. Not with ``has_model_state``. Source:
      the Taylor expansion DC-ASGD approximates (Zheng et al. 2017,
      arXiv 1609.08326, eq. 4), with the Hessian product of Pearlmutter
      (1994).
    process_timeout: in a multi-process program, the seconds each call
      (``init``, ``replay``, ...) waits for the other processes to make it
      too. Every process must make the same calls with the same arguments:
      each call first compares fingerprints of them across processes
      (``arrivals``' values; the structure, shapes and dtypes of
      ``batches`` and of the state; ``init``'s params' values; ``devices``),
      and a difference is a ValueError naming the argument, a process that
      does not make the call in time a RuntimeError. Results are read on a
      host with :func:`dcasgd_optax.harness.to_host`. Unused in one process.
    push_grad_sq: (a keyword argument of ``Simulator`` only) each worker
      also pushes the mean over its batch of its per-example squared
      gradients, at the model it holds (``jax.vmap(jax.grad(loss_fn))``
      over the batch's examples, each a batch of one), and ``tx.update``
      gets it as the keyword ``grad_sq``, as
      :func:`dcasgd_optax.fisher_compensation` needs. Every leaf of a batch
      must have the example axis first. Cost: a per-example gradient per
      arrival (memory: batch size x params per gradient slot). Not with
      ``has_model_state``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> from dcasgd_optax.harness import Simulator, schedules
    >>> targets = jnp.linspace(0.5, 1.5, 16)  # on-device data
    >>> loss_fn = lambda p, i: (p['w'] - targets[i]) ** 2  # batch: an index
    >>> tx = dcasgd_optax.dcasgd(0.1, num_workers=4)
    >>> sim = Simulator(loss_fn, tx)  # 4 workers: tx's backups say so
    >>> state = sim.init({'w': jnp.zeros(())})
    >>> arrivals = schedules.cyclic(4, 16)
    >>> state, metrics = sim.replay(state, jnp.arange(16), arrivals)
    >>> metrics['staleness'].tolist()
    [0, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]
    >>> bool(abs(state.params['w'] - 1.0) < 0.3)  # near the mean target
    True

    The exact compensation on a quadratic makes 4 delayed workers replay
    sequential SGD; the curvature diagnostic measures DC-ASGD's estimate:

    >>> exact = Simulator(loss_fn, optax.sgd(0.1), num_workers=4,
    ...                   exact_compensation=1.0)
    >>> seq = Simulator(loss_fn, optax.sgd(0.1), num_workers=1)
    >>> a, _ = exact.replay(exact.init({'w': jnp.zeros(())}),
    ...                     jnp.arange(16), arrivals)
    >>> b, _ = seq.replay(seq.init({'w': jnp.zeros(())}), jnp.arange(16),
    ...                   schedules.cyclic(1, 16))
    >>> bool(jnp.allclose(a.params['w'], b.params['w']))
    True
    >>> dc = dcasgd_optax.delay_compensation(4, 0.04)  # DC-ASGD-c
    >>> tx = dcasgd_optax.pull_after_push(optax.chain(dc, optax.sgd(0.1)))
    >>> sim = Simulator(loss_fn, tx, first_transform=dc,
    ...                 diagnose_curvature=True)
    >>> _, metrics = sim.replay(sim.init({'w': jnp.zeros(())}),
    ...                         jnp.arange(16), arrivals)
    >>> k = metrics['curvature_ratio'][1:]  # arrival 0 is fresh: NaN
    >>> bool(jnp.all(k < 0.1))  # lambda g*g is far below the true H = 2
    True
  """

  _per_worker = True
  _strategy_per_loss = True

  def __init__(self, loss_fn: Any, tx: Any, num_workers: int | None = None,
               *, exact_compensation: float | None = None,
               push_grad_sq: bool = False, **kwargs: Any):
    self._exact = _exact.make(exact_compensation,
                              kwargs.get("has_model_state", False))
    self._push_grad_sq = _per_example.check_option(
        push_grad_sq, kwargs.get("has_model_state", False))
    super().__init__(loss_fn, tx, num_workers, **kwargs)

  def _server_tx(self, tx, num_workers):
    return _optimizer.with_backups(tx, num_workers)

  def _make_programs(self) -> None:
    self._programs: dict[Any, tuple[Any, Any]] = {}
    self._convolves: dict[Any, bool] = {}

  def _programs_for(self, strategy: str,
                    vmap_slots: int | None) -> tuple[Any, Any]:
    """The jitted replay (``"compiled"``) or chunk step (``"host_chunks"``)
    for one simulation, and vmapped over ``N`` (``replay_many``)."""
    if (strategy, vmap_slots) in self._programs:
      return self._programs[strategy, vmap_slots]
    replay = _programs.Replay(
        self._loss_with_state, self.tx, self.mesh, vmap_slots,
        diagnostics=self._diagnostics,
        exact=self._exact,
        push_grad_sq=self._push_grad_sq,
    )
    if strategy == "compiled":
      jit = functools.partial(
          jax.jit, donate_argnums=(0,) if self._donate else ())
      one = jit(functools.partial(_programs.replay_program, replay),
                static_argnames=("loss_dtype", "by_row"))
      many: Any = jit(functools.partial(_programs.replay_many_program, replay),
                 static_argnames=("loss_dtype", "shared", "by_row"))
    else:  # a copy is donated when the caller's state is not (replay)
      jit = functools.partial(jax.jit, donate_argnums=(0,),
                              static_argnames=("by_row",))
      one = jit(functools.partial(
          _programs.chunk_program, replay, unroll=True))
      many = {
          shared: jit(functools.partial(
              _programs.chunk_many_program, replay, unroll=True,
              shared=shared))
          for shared in (True, False)
      }
    self._programs[strategy, vmap_slots] = one, many
    return one, many

  def _choices(self, params: Any, model_state: Any, batches: Any,
               leading: int) -> tuple[str, int | None]:
    """The strategy and ``vmap_slots`` for this loss at these shapes: those
    given, else picked by whether ``loss_fn``'s gradient convolves (traced
    once per shape; ``batches`` has ``leading + 1`` leading axes)."""
    strategy, vmap_slots = self.strategy, self._vmap_slots_given
    if strategy is not None and vmap_slots is not None:
      return strategy, vmap_slots
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        np.shape(x)[leading + 1:], jnp.result_type(x)), batches)
    key = _checks.signature((params, model_state, batch))
    if key not in self._convolves:
      self._convolves[key] = _checks.convolves(
          self._loss_with_state, params, model_state, batch)
    convolves = self._convolves[key]
    return (strategy or _protocol.cpu_strategy(convolves),
            _slots.default_vmap_slots(self.mesh, vmap_slots, convolves))

  def _check_diagnostics(self, expected: SimState) -> None:
    if self._diagnostics is not None:
      # The state tx sees (_programs._server_view): on several devices the
      # backups' rows padded to a multiple of them are not part of it.
      num_workers = expected.last_pull.shape[0]
      _diagnostics.check(
          self._diagnostics, _state.unpadded(expected.opt_state, num_workers),
          expected.params,
          tx_compensates=_optimizer.keeps_backups(self._user_tx,
                                                  expected.params),
      )

  def _plan(self, arrivals_NxA: np.ndarray, params: Any, num_workers: int,
            strategy: str) -> _plan.Plan:
    limit = self._slot_limit(num_workers, params, strategy)
    rows = _state.worker_rows(num_workers, self.mesh) // self.mesh.size
    return _plan.make_plan(arrivals_NxA, limit, self.mesh.size, rows)

  def describe(self, arrivals: Any, params: optax.Params, batches: Any = None,
               model_state: Any = None) -> dict[str, Any]:
    """How ``replay`` batches ``arrivals`` for ``params``: runs, chunks, fill.

    ``num_runs`` counts the maximal runs with no repeated worker, each cut
    into chunks of ``chunk`` gradient slots; ``fill_ratio`` is arrivals /
    slots computed (1.0: no padding); ``strategy`` is how the chunks run.
    ``batches`` (and ``model_state``, with ``has_model_state``) as
    ``replay`` would get them are needed only where the strategy is picked
    per loss function (the default on CPU).
    """
    num_workers = self.workers_for(params)
    arrivals = _checks.check_arrivals(arrivals, num_workers)
    strategy = self.strategy
    if strategy is None:
      if batches is None:
        raise ValueError(
            "`batches` is needed: on CPU the default strategy depends on "
            "whether loss_fn's gradient convolves, traced on one batch. Pass "
            "the batches replay would get (or choose `strategy`)."
        )
      model_state = _checks.check_model_state(model_state,
                                              self._has_model_state)
      strategy, _ = self._choices(_checks.abstract(params),
                                  _checks.abstract(model_state), batches, 0)
    plan = self._plan(arrivals, params, num_workers, strategy)
    slots = plan.num_chunks * plan.chunk
    return dict(
        num_arrivals=arrivals.shape[-1],
        num_runs=plan.num_runs,
        chunk=plan.chunk,
        num_chunks=plan.num_chunks,
        fill_ratio=arrivals.shape[-1] / slots,
        strategy=strategy,
    )

  def replay(
      self, state: SimState, batches: Any, arrivals: Any
  ) -> tuple[SimState, dict[str, jax.Array]]:
    r"""Replays ``arrivals`` from ``state`` (see ``strategy``).

    Args:
      state: from :meth:`init` or a previous ``replay`` (donated unless the
        simulator was built with ``donate=False``).
      batches: a pytree whose leaves have leading axis ``len(arrivals)``;
        arrival ``k`` uses ``batches[k]``.
      arrivals: concrete 1-D integer array of worker ids in ``[0, M)``, in
        the order their gradients reach the server.

    Returns:
      ``(state, metrics)``; ``metrics`` maps each key to an array with one
      entry per arrival: ``"worker"`` (the arrivals), ``"staleness"``
      (int32, server updates since that worker's last pull), ``"loss"`` (at
      the model the worker held, non-finite values included) and ``"step"``
      (int32, the server step after this arrival's update, 1-based). With
      diagnostics also (float32, NaN where not sampled)
      ``"stale_cosine"`` :math:`\cos(g, f)`, ``"applied_cosine"``
      :math:`\cos(d, f)`, ``"stale_error"`` :math:`\|g - f\| / \|f\|` and
      ``"applied_error"`` :math:`\|d - f\| / \|f\|`; with
      ``diagnose_curvature`` also ``"curvature_ratio"`` (see there). With
      ``exact_compensation``, :math:`g` is the pushed gradient and
      :math:`d` is made of the exactly compensated one.
    """
    return self._run(state, batches, arrivals, many=False)

  def replay_many(
      self, states: SimState, batches: Any, arrivals: Any
  ) -> tuple[SimState, dict[str, jax.Array]]:
    r"""Replays ``N`` simulations as one program, e.g. ``N`` seeds or
    hyperparameters of the same run.

    Every simulation is exactly a :meth:`replay` of its own state, batches
    and arrivals; they run together: each chunk computes all ``N x S``
    gradients in one call and applies the ``N`` servers' updates side by
    side (``jax.vmap``). Hyperparameters such as the learning rate or
    :math:`\lambda` differ per simulation when ``tx`` carries them in its
    state through ``optax.inject_hyperparams`` (:meth:`init_many`'s
    ``hyperparams``). The simulations share the chunking: a run of distinct
    workers ends where any of them repeats one.

    Args:
      states: from :meth:`init_many` or a previous ``replay_many`` (every
        leaf with a leading axis ``N``; donated like ``replay``'s).
      batches: a pytree whose leaves have leading axes ``[N, A]``.
      arrivals: ``[A]`` worker ids shared by all simulations, or ``[N, A]``,
        one order per simulation.

    Returns:
      ``(states, metrics)``, ``metrics`` with :meth:`replay`'s keys, each
      ``[N, A]``.
    """
    return self._run(states, batches, arrivals, many=True)

  def _run(self, state, batches, arrivals, *, many):
    shared = not many or np.ndim(arrivals) == 1  # one order for all
    arrivals, args, kwargs, strategy, (one, many_program) = (
        self._program_inputs(state, batches, arrivals, many=many))
    program = one
    if many and strategy == "compiled":
      program = many_program
    elif many:  # host_chunks: one step per kind of arrivals
      program = many_program[shared]
    if strategy == "compiled":
      state, record = program(*args, **kwargs)
    else:
      state, batches, plan, sampled = args
      if not self._donate:
        state = _gathers.copy_tree(state)
      state, record = _programs.replay_host_chunks(
          program, state, batches, plan, sampled, many=many
      )
    num_arrivals = arrivals.shape[-1]
    steps_A = np.arange(1 - num_arrivals, 1)
    if many:
      return state, _protocol.stream_metrics(
          state.step[:, None], steps_A[None], arrivals, record)
    return state, _protocol.stream_metrics(
        state.step, steps_A, arrivals[0], record
    )

  def _program_inputs(self, state, batches, arrivals, *, many=False,
                      every_process=True):
    """Checks ``replay``'s (``replay_many``'s) arguments (on every process,
    unless not ``every_process``); returns the arrivals ``[N, A]``, the
    program's arguments (``"compiled"``) or what the host loop needs, the
    strategy and the programs."""
    shared = not many or np.ndim(arrivals) == 1
    num_sims = _checks.leading_axis("state", state) if many else None
    num_workers = self._check_state(state, num_sims)
    arrivals = _checks.check_arrivals(arrivals, num_workers, num_sims)
    num_arrivals = arrivals.shape[-1]
    one = state if not many else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state)
    loss = self._check_batches(
        one, batches, num_arrivals,
        leading=() if not many else (num_sims,))
    strategy, vmap_slots = self._choices(one.params, one.model_state,
                                         batches, int(many))
    plan = self._plan(arrivals[:1] if shared else arrivals, one.params,
                      num_workers, strategy)
    sampled = self._sampled(state, num_arrivals)
    if every_process:
      self._same_on_every_process(
          "replay_many" if many else "replay", arrivals=arrivals,
          batches=batches, state=state)
    programs = self._programs_for(strategy, vmap_slots)
    batches = _devices.replicate(batches, self.mesh)
    if strategy != "compiled":
      return (arrivals, (state, batches, plan, sampled), {}, strategy,
              programs)
    pick = (lambda a: a) if not shared else (lambda a: a[0])
    args = (state, batches, plan.starts, plan.lengths,
            np.int32(plan.num_chunks), pick(plan.slot_rows),
            pick(plan.slot_workers), pick(plan.arrival_slots), sampled)
    kwargs = dict(loss_dtype=loss.dtype, by_row=plan.by_row)
    if many:
      kwargs["shared"] = shared
    return arrivals, args, kwargs, strategy, programs

  def lower(self, state: SimState, batches: Any,
            arrivals: Any) -> jax.stages.Lowered:
    """The program ``replay(state, batches, arrivals)`` runs, lowered.

    For ``"compiled"`` the whole replay; for ``"host_chunks"`` the step it
    calls once per chunk, lowered for the first chunk. Nothing runs and
    ``state`` is not donated: this is for inspection, e.g.
    ``sim.lower(...).compile().memory_analysis()`` gives the bytes each
    device holds (benchmarks/harness_throughput.md records them).
    """
    _, args, kwargs, strategy, (program, _) = self._program_inputs(
        state, batches, arrivals, every_process=False)
    if strategy == "compiled":
      return program.lower(*args, **kwargs)
    state, batches, plan, sampled = args
    rows = plan.slot_rows[0, 0]
    batch_S = jax.tree.map(lambda x: x[rows], batches)
    first = None if sampled is None else sampled[:plan.chunk]
    return program.lower(
        state, plan.slot_workers[0, 0], batch_S, plan.arrival_slots[0, 0],
        plan.lengths[0], first, by_row=plan.by_row,
    )

  def _sampled(self, state: SimState, num_arrivals: int) -> np.ndarray | None:
    """Which arrivals the diagnostics measure (reads the state's step)."""
    if self._diagnostics is None:
      return None
    steps = np.unique(np.asarray(state.step))
    if steps.size != 1:
      raise ValueError(
          "`states` are at different server steps "
          f"({steps.tolist()}): diagnostics sample the same arrivals in "
          "every simulation, so replay them from states made together."
      )
    return _diagnostics.sampled(int(steps[0]), num_arrivals,
                                self._diagnostics.every)
