"""Named learning-rate schedules, so a grid tunes them like the rate."""

from __future__ import annotations

from typing import Any

import optax

from dcasgd_optax._src import _checks

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(
    name: str,
    learning_rate: float,
    num_steps: int,
    *,
    warmup_steps: int = 0,
) -> optax.Schedule:
  r"""An optax schedule by name: warm-up, then constant, cosine or linear.

  Every step count is in server updates. The rate rises linearly from 0 to
  ``learning_rate`` over ``warmup_steps`` (none for 0), then:

  ==============  =========================================================
  ``name``        after the warm-up
  ==============  =========================================================
  ``"constant"``  ``learning_rate``
  ``"cosine"``    cosine decay to 0 at ``num_steps``
                  (``optax.warmup_cosine_decay_schedule``)
  ``"linear"``    linear decay to 0 at ``num_steps``
  ==============  =========================================================

  Every full optimizer of the library takes the result as its
  ``learning_rate``; a schedule is a function of the update count, so with
  :func:`pull_after_push` and the simulator it is the server's count.

  Args:
    name: one of ``"constant"``, ``"cosine"``, ``"linear"``.
    learning_rate: the peak rate, >= 0.
    num_steps: total server updates, >= 1 (the decay's end).
    warmup_steps: updates of linear warm-up, in [0, num_steps].

  Returns:
    An ``optax.Schedule`` (a function of the update count).

  Examples:
    >>> import dcasgd_optax
    >>> lr = dcasgd_optax.learning_rate_schedule("linear", 0.1, 10,
    ...                                          warmup_steps=2)
    >>> [round(float(lr(t)), 3) for t in (0, 1, 2, 6, 10)]
    [0.0, 0.05, 0.1, 0.05, 0.0]

  References:
    Goyal et al., `Accurate, Large Minibatch SGD
    <https://arxiv.org/abs/1706.02677>`_, 2017 (gradual warm-up).
    Loshchilov and Hutter, `SGDR <https://arxiv.org/abs/1608.03983>`_,
    ICLR 2017 (cosine decay).
  """
  if name not in SCHEDULES:
    raise ValueError(
        f"`name` must be one of {', '.join(map(repr, SCHEDULES))}, got "
        f"{name!r}."
    )
  _checks.check_scalar_range("learning_rate", learning_rate, low=0.0)
  num_steps = _checks.check_positive_int("num_steps", num_steps)
  warmup_steps = _check_warmup(warmup_steps, num_steps)
  if name == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, num_steps, end_value=0.0)
  after: Any = optax.constant_schedule(learning_rate)
  if name == "linear":
    after = optax.linear_schedule(learning_rate, 0.0,
                                  num_steps - warmup_steps)
  if warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def _check_warmup(warmup_steps: Any, num_steps: int) -> int:
  if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int):
    raise TypeError(
        f"`warmup_steps` must be an int, got {warmup_steps!r}.")
  if not 0 <= warmup_steps <= num_steps:
    raise ValueError(
        f"`warmup_steps` must be in [0, num_steps={num_steps}], got "
        f"{warmup_steps}.")
  return warmup_steps
