"""What a driver of asynchronous training needs from the core, by name.

The simulator (:mod:`dcasgd_optax.harness`), the Ray parameter server
(:mod:`dcasgd_optax.ray`) and the experiments drive the optimizers of
:mod:`dcasgd_optax` from outside: they find the per-worker backups in an
optimizer state, read how many workers it is made for, learn whether an
update already records the worker's pull, compute what a worker pushes
besides its gradient (:func:`mean_square_grads`, the ``grad_sq`` of
:func:`~dcasgd_optax.fisher_compensation`), and validate their own
arguments the way the core does. Those are the names here, and the only
core names the other subpackages import (``tests/test_interfaces.py`` fails if a
module of one subpackage imports a non-public name of another); the user's
API stays :mod:`dcasgd_optax`.

Why a public ``extend`` namespace rather than a private ``_src`` module:
the interface is stated where a reader (and a third driver, e.g. a user's
own server loop) can find it, as JAX states what libraries built on it
may use in ``jax.extend``; like ``jax.extend`` it is for library authors,
and it may change between minor releases where the user's API does not.
Checkpointing (``dcasgd_optax.extend.checkpoint``, orbax) is a separate
module because it needs an extra install.

Examples:
  >>> import jax.numpy as jnp
  >>> import dcasgd_optax
  >>> from dcasgd_optax import extend
  >>> tx = dcasgd_optax.dcasgd(0.1, num_workers=3)
  >>> state = tx.init({'w': jnp.zeros(2)})
  >>> [extend.num_workers_of(s) for s in extend.find_states(state)]
  [3]
"""

from dcasgd_optax._src._backups import num_workers_of
from dcasgd_optax._src._checks import check_positive_int
from dcasgd_optax._src._checks import check_scalar_range
from dcasgd_optax._src._checks import check_seed
from dcasgd_optax._src._per_example import mean_square_grads
from dcasgd_optax._src._tree import is_masked
from dcasgd_optax._src.pull import find_states
from dcasgd_optax._src.pull_after_push import compensation_of
from dcasgd_optax._src.pull_after_push import pulls_in_update

__all__ = (
    "check_positive_int",
    "check_scalar_range",
    "check_seed",
    "compensation_of",
    "find_states",
    "is_masked",
    "mean_square_grads",
    "num_workers_of",
    "pulls_in_update",
)
