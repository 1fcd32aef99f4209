"""The delay-compensated gradient transformation (DC-ASGD-c and DC-ASGD-a)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcasgd_optax._src import _checks
from dcasgd_optax._src import _tree


class DelayCompensationState(NamedTuple):
  """The parameter server's memory of what each worker holds.

  :func:`delay_compensation` and :func:`gap_aware` both keep this state (one
  per optimizer: the simulator, :func:`record_pull`, :func:`worker_params`
  and :func:`pull` read the backups from it).

  Attributes:
    backups: a pytree shaped like params whose every leaf has a leading axis
      of size ``num_workers``: ``backups[m]`` is the model worker ``m`` holds
      (the one it pulled last). Dtype ``backup_dtype`` (default: each param's
      own dtype). Every worker starts holding the initial params.
    mean_square: the running mean of ``g * g`` (DC-ASGD-a's MeanSquare,
      gap-aware's second moment), a pytree shaped like params in float32
      (float64 for float64 params), each leaf with a leading ``num_workers``
      axis when kept per worker; ``()`` for DC-ASGD-c.
    count: int32 number of updates applied (shape ``()``), or per worker
      when the mean square is kept per worker (shape ``(num_workers,)``):
      the ``t`` of the bias correction and the λ warm-up.
  """

  backups: Any
  mean_square: Any
  count: Any = ()


def _stats_dtype(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def delay_compensation(
    num_workers: int,
    lambda_: jax.typing.ArrayLike | None = None,
    *,
    adaptive: bool = False,
    decay: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-7,
    backup_dtype: jax.typing.DTypeLike | None = None,
    per_worker_mean_square: bool = False,
    bias_correction: bool = False,
    lambda_warmup: jax.typing.ArrayLike = 0,
    correction_clip: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Compensates the delay of an asynchronous worker's gradient (DC-ASGD).

  A worker's gradient ``g`` was computed at the model ``backup[m]`` it pulled,
  while the server now holds ``w``. The first-order Taylor correction with the
  diagonal outer-product approximation of the Hessian gives, elementwise,

  .. math::
    g_{dc} = g + \lambda \, g \odot g \odot (w - \mathrm{backup}[m]).

  With ``adaptive=True`` (DC-ASGD-a) :math:`\lambda` is replaced by
  :math:`\lambda_t = \lambda / \sqrt{ms_t + \epsilon}` with
  :math:`ms_t = d \cdot ms_{t-1} + (1-d) \, g \odot g` (starting at zero,
  updated with the current gradient before use). By default ``ms`` is one
  global statistic, as the paper's formula reads; with
  ``per_worker_mean_square=True`` each worker ``m`` has its own ``ms[m]``,
  updated only with ``m``'s gradients, as in the authors' released code.

  Early in training ``ms`` is near zero, so :math:`\lambda_t` is large and
  the term over-compensates. Two opt-in remedies: ``bias_correction=True``
  divides ``ms`` by :math:`1 - d^t` (Adam's correction; ``t`` counts the
  gradients folded into that ``ms``) and ``lambda_warmup=k`` scales
  :math:`\lambda` by :math:`\min(1, t/k)` over the first ``k`` updates
  (``t`` counts all updates). A third, ``correction_clip=c``, bounds the
  compensation term per coordinate by the gradient itself,
  :math:`|\lambda g \odot g \odot (w - \mathrm{backup}[m])| \le c\,|g|`,
  a trust region for the first-order Taylor step: it acts wherever
  :math:`\lambda_t` is large (also later in training, on coordinates whose
  gradient is rare). All are off by default (the paper's method); see the
  measurements in the README before turning one on.

  Put it first in a chain, where it sees raw gradients. It only reads the
  backups; the server's side of a pull, :func:`pull`, writes them (the full
  optimizer :func:`dcasgd` pulls after every push).

  Edges: ``lambda_=0`` returns the gradient unchanged (plain ASGD). A traced
  ``worker`` outside ``[0, num_workers)`` cannot be rejected at trace time:
  the update is then all-NaN and the state is left as it was, so the error is
  visible; a concrete one raises. To skip such a step, put
  ``optax.apply_if_finite`` *after* this transformation in the chain (it
  checks the updates it receives, so wrapping the whole optimizer in it does
  not catch NaNs this transformation produces).

  Args:
    num_workers: number of asynchronous workers (>= 1); the state holds that
      many copies of the model.
    lambda_: the compensation strength, >= 0 (a float, or an array under
      ``optax.inject_hyperparams``); ``None`` picks the paper's defaults, 0.04
      for DC-ASGD-c and 2.0 for DC-ASGD-a.
    adaptive: use DC-ASGD-a's per-coordinate :math:`\lambda_t`.
    decay: DC-ASGD-a's mean-square decay, in [0, 1).
    eps: DC-ASGD-a's epsilon, > 0.
    backup_dtype: dtype to store backups in (e.g. ``jnp.bfloat16`` halves
      their memory for float32 models); ``None`` keeps each param's dtype.
      The backups are what the workers hold, so with a lower precision the
      correction sees ``w - round(w)`` even at staleness 0, and a simulator
      computes each worker's gradient at its rounded model.
    per_worker_mean_square: DC-ASGD-a only: one ``ms`` per worker (memory:
      ``num_workers`` more float32 copies of the model) instead of one.
    bias_correction: DC-ASGD-a only: use :math:`ms_t / (1 - d^t)`.
    lambda_warmup: number of updates over which :math:`\lambda` ramps up
      linearly from :math:`\lambda/k`; 0 (default) for none.
    correction_clip: :math:`c > 0` bounding the term by :math:`c\,|g|` per
      coordinate, or ``None`` (default) for no bound.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``(updates, state, params, *, worker, **extra_args)``; extra args are
    ignored.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> params = {'w': jnp.array([1.0, 2.0])}
    >>> tx = optax.chain(
    ...     dcasgd_optax.delay_compensation(2, 0.5), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> new = {'w': jnp.array([1.5, 2.0])}   # another worker moved the model
    >>> grads = {'w': jnp.array([2.0, 1.0])}  # worker 1 computed at the old one
    >>> updates, state = tx.update(grads, state, new, worker=1)
    >>> updates['w']  # -0.1 * (g + 0.5 * g * g * (w - backup[1]))
    Array([-0.3, -0.1], dtype=float32)

  References:
    Zheng et al., `Asynchronous Stochastic Gradient Descent with Delay
    Compensation <https://arxiv.org/abs/1609.08326>`_, ICML 2017 (the
    authors' code: github.com/microsoft/Delayed-Compensation-Asynchronous-
    Stochastic-Gradient-Descent-for-Multiverso keeps MeanSquare per worker).
    Kingma and Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, ICLR 2015
    (the bias correction).
  """
  num_workers = _checks.check_positive_int("num_workers", num_workers)
  _check_options(
      adaptive, per_worker_mean_square, bias_correction, lambda_warmup
  )
  if correction_clip is not None:
    _checks.check_scalar_range(
        "correction_clip", correction_clip, low=0.0, low_inclusive=False
    )
  lambda_ = default_lambda(lambda_, adaptive)
  _checks.check_scalar_range("lambda_", lambda_, low=0.0)
  _checks.check_scalar_range("decay", decay, low=0.0, high=1.0)
  _checks.check_scalar_range("eps", eps, low=0.0, low_inclusive=False)
  check_backup_dtype(backup_dtype)
  stats = MeanSquareSpec(decay if adaptive else None, per_worker_mean_square)
  correct = compensation_correction(
      lambda_, adaptive=adaptive, decay=decay, eps=eps,
      bias_correction=bias_correction, lambda_warmup=lambda_warmup,
      correction_clip=correction_clip,
  )
  return backups_transformation(num_workers, backup_dtype, stats, correct)


def default_lambda(lambda_: Any, adaptive: bool) -> Any:
  """``lambda_``, or the paper's default for the variant when it is None."""
  if lambda_ is None:
    return 2.0 if adaptive else 0.04
  return lambda_


def compensation_correction(
    lambda_: Any,
    *,
    adaptive: bool,
    decay: Any,
    eps: Any,
    bias_correction: bool,
    lambda_warmup: Any,
    correction_clip: Any,
) -> Any:
  """:func:`delay_compensation`'s ``correct`` (:func:`backups_transformation`).

  Its arguments, already validated and ``lambda_`` resolved. The fused full
  optimizer applies the same function to blocks of each parameter, so both
  compute the same numbers.
  """
  skip = _checks.is_static_zero(lambda_)
  warmup = not _checks.is_static_zero(lambda_warmup)

  def correct(updates, params, held, ms, count, state):
    lam = jax.tree.map(lambda _: lambda_, updates)
    if adaptive:
      if bias_correction:
        ms = jax.tree.map(lambda x: x / (1 - decay**count), ms)
      # sqrt(1 / .), not 1 / sqrt(.): XLA rewrites the latter to rsqrt,
      # which XLA:CPU (JAX 0.12) runs ~5x slower inside the fused update's
      # loop (benchmarks/update_cost.md).
      lam = jax.tree.map(lambda x: lambda_ * jnp.sqrt(1 / (x + eps)), ms)
    if warmup:
      lam = _warm_up(lam, jnp.sum(state.count), lambda_warmup)
    if skip:
      return updates
    compensate = functools.partial(_compensate, clip=correction_clip)
    return jax.tree.map(compensate, updates, params, held, lam)

  return correct


def backups_transformation(
    num_workers: int, backup_dtype: Any, stats: MeanSquareSpec, correct: Any
) -> optax.GradientTransformationExtraArgs:
  """A transformation that keeps per-worker backups and corrects with them.

  What :func:`delay_compensation` and :func:`gap_aware` share: the
  :class:`DelayCompensationState`, the checks, the worker's backup, the mean
  square and count, and NaN updates for a traced out-of-range worker.

  Args:
    num_workers: number of workers (checked by the caller).
    backup_dtype: dtype of the backups, or ``None`` for each param's.
    stats: which mean square the state keeps.
    correct: ``correct(updates, params, held, ms, count, state)`` returns
      the corrected updates, given the worker's backup ``held``, the mean
      square ``ms`` this update sees and its ``count``, and the new state.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``(updates, state, params, *, worker, **extra_args)``.
  """

  def init_fn(params):
    return init_state(params, num_workers, backup_dtype, stats)

  def update_fn(updates, state, params=None, *, worker=None, **extra_args):
    del extra_args
    check_update(updates, state, params, worker, num_workers)
    held = held_by(state.backups, worker, num_workers)
    ms, count, state = next_mean_square(
        state, updates, worker, num_workers, stats
    )
    out = correct(updates, params, held, ms, count, state)
    return nan_unless(worker_is_valid(worker, num_workers), out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_options(adaptive, per_worker, bias_correction, warmup) -> None:
  for name, value in (
      ("adaptive", adaptive),
      ("per_worker_mean_square", per_worker),
      ("bias_correction", bias_correction),
  ):
    if not isinstance(value, bool):
      raise TypeError(f"`{name}` must be a bool, got {value!r}.")
  for name, value in (
      ("per_worker_mean_square", per_worker),
      ("bias_correction", bias_correction),
  ):
    if value and not adaptive:
      raise ValueError(
          f"`{name}=True` needs `adaptive=True`: DC-ASGD-c keeps no "
          "mean square."
      )
  _checks.check_scalar_range("lambda_warmup", warmup, low=0.0)


def _warm_up(lam: Any, t: Any, steps: Any) -> Any:
  """``lam * min(1, t / steps)``; ``steps == 0`` means no warm-up."""
  ramp = warm_up_ramp(t, steps)
  return jax.tree.map(lambda x: x * ramp, lam)


def warm_up_ramp(t: Any, steps: Any) -> jax.Array:
  """``min(1, t / steps)``, or 1 if ``steps == 0`` (no warm-up)."""
  steps = jnp.asarray(steps, jnp.float32)
  return jnp.where(
      steps > 0, jnp.minimum(1.0, t / jnp.maximum(steps, 1.0)), 1.0
  )


def check_backup_dtype(backup_dtype: Any) -> None:
  """Raises unless ``backup_dtype`` is None or a floating dtype."""
  if backup_dtype is not None and not jnp.issubdtype(
      backup_dtype, jnp.floating
  ):
    raise TypeError(
        f"`backup_dtype` must be a floating dtype or None, got {backup_dtype}."
    )


class MeanSquareSpec(NamedTuple):
  """Which running mean of ``g * g`` a backups-holding state keeps.

  Attributes:
    decay: the running mean's decay, or ``None`` for no mean square.
    per_worker: one mean square (and count) per worker.
  """

  decay: Any
  per_worker: bool = False


def init_state(
    params: Any, num_workers: int, backup_dtype: Any, stats: MeanSquareSpec
) -> DelayCompensationState:
  """Every worker holds ``params``; the mean square and count start at zero."""
  if params is None:
    raise ValueError("`params` is None: init needs the initial params.")
  lead = (num_workers,) if stats.per_worker else ()

  def backup(p):
    p = jnp.asarray(p, backup_dtype or jnp.asarray(p).dtype)
    return jnp.broadcast_to(p[None], (num_workers, *p.shape)).copy()

  def zeros(p):
    return jnp.zeros(lead + jnp.shape(p), _stats_dtype(jnp.result_type(p)))

  with_stats = stats.decay is not None
  return DelayCompensationState(
      backups=jax.tree.map(backup, params),
      mean_square=jax.tree.map(zeros, params) if with_stats else (),
      count=jnp.zeros(lead, jnp.int32),
  )


def check_update(
    updates: Any, state: Any, params: Any, worker: Any, num_workers: int
) -> None:
  """The checks of an update, before any state is touched."""
  _checks.check_worker(worker, num_workers)
  _tree.check_matches_backups("params", params, state.backups)
  _tree.check_matches_backups("updates", updates, state.backups)
  stored = num_workers_of(state)
  if stored not in (None, num_workers):
    raise ValueError(
        f"The state holds backups for {stored} workers, but this "
        f"transformation was built with num_workers={num_workers}."
    )


def worker_is_valid(worker: Any, num_workers: int) -> jax.Array:
  """Whether ``worker`` lies in ``[0, num_workers)`` (a traced bool)."""
  return jnp.logical_and(worker >= 0, worker < num_workers)


def nan_unless(valid: Any, tree: Any) -> Any:
  """``tree`` where ``valid``, else all NaN (a traced out-of-range worker)."""
  return jax.tree.map(
      lambda u: jnp.where(valid, u, jnp.asarray(np.nan, u.dtype)), tree
  )


def next_mean_square(
    state: DelayCompensationState,
    grads: Any,
    worker: Any,
    num_workers: int,
    stats: MeanSquareSpec,
) -> tuple[Any, Any, DelayCompensationState]:
  """Folds ``g * g`` into the worker's (or the global) mean square.

  Returns the mean square this update sees (params-shaped; ``()`` without
  one), its count (the number of gradients in it, including this one), and
  the new state, unchanged for an invalid ``worker``.
  """
  valid = worker_is_valid(worker, num_workers)
  ms, count = state.mean_square, state.count
  if stats.per_worker:
    ms = held_by(ms, worker, num_workers)
    count = held_by(count, worker, num_workers)
  if stats.decay is not None:
    ms = jax.tree.map(lambda m, g: fold_square(m, g, stats.decay), ms, grads)
  count = count + 1
  new_state = state._replace(
      mean_square=_store(state.mean_square, ms, worker, valid, stats),
      count=_store(state.count, count, worker, valid, stats),
  )
  return ms, count, new_state


def fold_square(ms: Any, g: Any, decay: Any) -> Any:
  """One step of the running mean of ``g * g``: ``d * ms + (1 - d) * g * g``."""
  return decay * ms + (1 - decay) * jnp.square(g.astype(ms.dtype))


def _store(old: Any, new: Any, worker: Any, valid: Any,
           stats: MeanSquareSpec) -> Any:
  """Writes ``new`` into ``old`` (its worker's row when per worker)."""
  if isinstance(old, tuple) and not old:  # Not kept.
    return old
  if not stats.per_worker:
    return jax.tree.map(lambda o, n: jnp.where(valid, n, o), old, new)
  num_workers = jax.tree.leaves(old)[0].shape[0]
  idx = jnp.where(valid, jnp.asarray(worker, jnp.int32), num_workers)
  return jax.tree.map(
      lambda o, n: o.at[idx].set(n.astype(o.dtype), mode="drop"), old, new
  )


def num_workers_of(state: DelayCompensationState) -> int | None:
  """The backups' leading axis, or None for a params tree with no leaves."""
  leaves = jax.tree.leaves(state.backups)
  return leaves[0].shape[0] if leaves else None


def held_by(backups: Any, worker: Any, num_workers: int) -> Any:
  """The params worker ``worker`` holds (clamped index; callers mask)."""
  idx = jnp.clip(jnp.asarray(worker, jnp.int32), 0, num_workers - 1)
  return jax.tree.map(
      lambda b: jax.lax.dynamic_index_in_dim(b, idx, 0, keepdims=False),
      backups,
  )


def _compensate(g, w, held, lam, clip=None):
  """Elementwise g + lam * g * g * (w - held), in at least float32.

  With ``clip``, the term is bounded by ``clip * |g|``.
  """
  dtype = _stats_dtype(g.dtype)
  g32 = g.astype(dtype)
  delta = w.astype(dtype) - held.astype(dtype)
  term = lam * g32 * g32 * delta
  if clip is not None:
    bound = clip * jnp.abs(g32)
    term = jnp.clip(term, -bound, bound)
  return (g32 + term).astype(g.dtype)
