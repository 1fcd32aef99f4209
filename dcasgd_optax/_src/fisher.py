"""Delay compensation with a Fisher-diagonal curvature pushed by the worker."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dcasgd_optax._src import _backups
from dcasgd_optax._src import _checks
from dcasgd_optax._src import _tree
from dcasgd_optax._src import alias
from dcasgd_optax._src import delay_compensation as dc


def fisher_compensation(
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
  r"""Delay compensation whose curvature is the worker's Fisher diagonal.

  DC-ASGD approximates the Hessian by the outer product of the gradient and
  keeps its diagonal, :math:`\lambda\, g \odot g`. The argument behind it
  (the expected Hessian of a log-likelihood equals the Fisher information)
  holds for the expectation of the *per-example* outer products, whose
  diagonal is the mean of the per-example squared gradients,

  .. math::
    F = \frac{1}{B} \sum_{i=1}^{B} g_i \odot g_i
    \quad\text{(not } g \odot g = \big(\tfrac{1}{B}\sum_i g_i\big)^{\odot 2}
    \text{, smaller by up to a factor } B\text{)}.

  The worker computes :math:`F` with its gradient, at the model it pulled
  (a gradient per example of its batch), and pushes both;
  this transformation takes it as the keyword ``grad_sq`` and corrects

  .. math::
    g_{dc} = g + \lambda\, F \odot (w - \mathrm{backup}[m]).

  With ``adaptive=True`` :math:`\lambda` becomes DC-ASGD-a's
  :math:`\lambda_t = \lambda / \sqrt{ms_t + \epsilon}`, where the running
  mean :math:`ms_t = d \cdot ms_{t-1} + (1-d) F` is now of :math:`F` (the
  quantity the term uses, as DC-ASGD-a's is of :math:`g \odot g`). The
  other options are :func:`delay_compensation`'s, with :math:`F` in place
  of :math:`g \odot g` (``correction_clip`` still bounds the term by
  :math:`c\,|g|`).

  Cost: one more params-sized array per push, on the wire and in the
  server's update (the same size and sharding as the gradient: a parameter
  server split into shards splits ``grad_sq`` as it splits the gradient),
  and on the worker a gradient per example of its batch (on CPU one after
  another, summing the squares as they come; elsewhere all at once with
  ``jax.vmap``, whose memory grows with the batch: see
  benchmarks/per_example_curvature.md). The server's state is
  :func:`delay_compensation`'s. :class:`dcasgd_optax.harness.Simulator`
  computes and passes ``grad_sq`` with ``push_grad_sq=True``.

  Args:
    num_workers: number of asynchronous workers (>= 1).
    lambda_: the compensation strength, >= 0; ``None`` picks 0.04 (constant)
      or 2.0 (``adaptive``), :func:`delay_compensation`'s defaults.
    adaptive: use DC-ASGD-a's per-coordinate :math:`\lambda_t`.
    decay: the running mean's decay, in [0, 1).
    eps: DC-ASGD-a's epsilon, > 0.
    backup_dtype: dtype of the backups (see :func:`delay_compensation`).
    per_worker_mean_square: one running mean per worker (``adaptive``).
    bias_correction: the running mean divided by :math:`1 - d^t`.
    lambda_warmup: updates over which :math:`\lambda` ramps up (0: none).
    correction_clip: bound the term by ``correction_clip * |g|``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``(updates, state, params, *, worker, grad_sq, **extra_args)``;
    ``grad_sq`` is params-shaped and required (a ``TypeError`` names it
    when it is missing).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import dcasgd_optax
    >>> xs, ys = jnp.array([1.0, -2.0]), jnp.array([0.5, 1.0])
    >>> loss = lambda p, x, y: (p['w'] * x - y) ** 2
    >>> params = {'w': jnp.array(0.0)}   # what worker 1 pulled
    >>> g = jax.grad(lambda p: jnp.mean(loss(p, xs, ys)))(params)
    >>> per_example = jax.vmap(jax.grad(loss), (None, 0, 0))(params, xs, ys)
    >>> grad_sq = jax.tree.map(lambda x: jnp.mean(x * x, 0), per_example)
    >>> float(g['w']), float(grad_sq['w'])  # mean of 1 and 16; not 1.5 ** 2
    (1.5, 8.5)
    >>> tx = dcasgd_optax.fisher_compensation(2, lambda_=0.1)
    >>> state = tx.init(params)
    >>> w = {'w': jnp.array(0.2)}   # the server moved on meanwhile
    >>> out, state = tx.update(g, state, w, worker=1, grad_sq=grad_sq)
    >>> out['w']   # 1.5 + 0.1 * 8.5 * (0.2 - 0.0)
    Array(1.67, dtype=float32)

  References:
    Zheng et al., `Asynchronous Stochastic Gradient Descent with Delay
    Compensation <https://arxiv.org/abs/1609.08326>`_, ICML 2017
    (Section 3: the Hessian approximated by the expected outer product of
    the per-example gradients).
    Martens, `New Insights and Perspectives on the Natural Gradient Method
    <https://arxiv.org/abs/1412.1193>`_, JMLR 2020 (the empirical Fisher
    and its diagonal).
  """
  num_workers = _checks.check_positive_int("num_workers", num_workers)
  dc._check_options(  # pylint: disable=protected-access
      adaptive, per_worker_mean_square, bias_correction, lambda_warmup
  )
  if correction_clip is not None:
    _checks.check_scalar_range(
        "correction_clip", correction_clip, low=0.0, low_inclusive=False
    )
  lambda_ = dc.default_lambda(lambda_, adaptive)
  _checks.check_scalar_range("lambda_", lambda_, low=0.0)
  _checks.check_scalar_range("decay", decay, low=0.0, high=1.0)
  _checks.check_scalar_range("eps", eps, low=0.0, low_inclusive=False)
  _backups.check_backup_dtype(backup_dtype)
  stats = _backups.MeanSquareSpec(decay if adaptive else None,
                                  per_worker_mean_square)
  warmup = not _checks.is_static_zero(lambda_warmup)

  def lambdas(grad_sq, ms, count, state):
    lam = jax.tree.map(lambda _: lambda_, grad_sq)
    if adaptive:
      if bias_correction:
        ms = jax.tree.map(lambda x: x / (1 - decay**count), ms)
      lam = jax.tree.map(lambda x: lambda_ * jnp.sqrt(1 / (x + eps)), ms)
    if warmup:
      ramp = dc.warm_up_ramp(jnp.sum(state.count), lambda_warmup)
      lam = jax.tree.map(lambda x: x * ramp, lam)
    return lam

  def init_fn(params):
    return _backups.init_state(params, num_workers, backup_dtype, stats)

  def update_fn(updates, state, params=None, *, worker=None, grad_sq=None,
                held_params=None, **extra_args):
    del extra_args
    _check_grad_sq(grad_sq)
    _backups.check_update(updates, state, params, worker, num_workers)
    _tree.check_matches_backups("grad_sq", grad_sq, state.backups)
    held = _backups.held_of(state.backups, worker, num_workers, held_params)
    ms, count, state = _backups.next_mean_square(
        state, updates, worker, num_workers, stats, squares=grad_sq
    )
    lam = lambdas(grad_sq, ms, count, state)

    def compensate(g, f, w, b, lam):  # DC's term, Fisher's curvature
      return dc._compensate(  # pylint: disable=protected-access
          g, w, b, lam, correction_clip, curvature=f)

    out = jax.tree.map(compensate, updates, grad_sq, params, held, lam)
    valid = _backups.worker_is_valid(worker, num_workers)
    return _backups.nan_unless(valid, out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_grad_sq(grad_sq: Any) -> None:
  if grad_sq is None:
    raise TypeError(
        "Missing keyword argument `grad_sq`: fisher_compensation needs the "
        "mean over the worker's batch of its per-example squared gradients "
        "(params-shaped), pushed with the gradient. The harness computes it "
        "with Simulator(..., push_grad_sq=True)."
    )


def fisher_dcasgd(
    learning_rate: optax.ScalarOrSchedule,
    num_workers: int,
    *,
    lambda_: jax.typing.ArrayLike | None = None,
    adaptive: bool = True,
    decay: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-7,
    momentum: float | None = None,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    backup_dtype: jax.typing.DTypeLike | None = None,
    per_worker_mean_square: bool = False,
) -> alias.PullAfterPush:
  r"""DC-ASGD with the Fisher-diagonal curvature, as one optimizer.

  Chains :func:`fisher_compensation`, ``optax.add_decayed_weights`` (when
  ``weight_decay > 0``) and ``optax.sgd``, with the worker's pull after its
  push, as :func:`dcasgd` does with :func:`delay_compensation`:

  .. math::
    w \leftarrow w - \eta \, (g + \lambda_t \, F \odot (w - b_m)
    + \mathrm{wd} \cdot w), \qquad b_m \leftarrow w,

  with :math:`F` the ``grad_sq`` the worker pushed (see
  :func:`fisher_compensation`). Not fused: each chain member reads the
  parameters once.

  Args:
    learning_rate: a float or an optax schedule.
    num_workers: number of asynchronous workers (>= 1).
    lambda_: compensation strength (``None``: 2.0 adaptive, 0.04 constant).
    adaptive: DC-ASGD-a's normalisation (default) or a constant λ.
    decay, eps, backup_dtype, per_worker_mean_square: as in
      :func:`fisher_compensation`.
    momentum: heavy-ball momentum in [0, 1), or ``None`` for plain SGD.
    nesterov: use Nesterov momentum.
    weight_decay: L2 coefficient added to the compensated gradient, >= 0.

  Returns:
    A :class:`PullAfterPush`; ``update`` needs ``params`` and the keywords
    ``worker`` and ``grad_sq``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import dcasgd_optax
    >>> tx = dcasgd_optax.fisher_dcasgd(0.1, num_workers=2)
    >>> params = {'w': jnp.ones(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(2)}, state, params,
    ...                            worker=0, grad_sq={'w': jnp.ones(2)})
    >>> updates['w']   # fresh gradient: plain SGD
    Array([-0.1, -0.1], dtype=float32)
  """
  alias._check_sgd_arguments(  # pylint: disable=protected-access
      learning_rate, momentum, nesterov, weight_decay)
  compensation = fisher_compensation(
      num_workers, lambda_, adaptive=adaptive, decay=decay, eps=eps,
      backup_dtype=backup_dtype,
      per_worker_mean_square=per_worker_mean_square,
  )
  return alias.compensated_sgd(
      compensation, learning_rate, momentum, nesterov, weight_decay)
