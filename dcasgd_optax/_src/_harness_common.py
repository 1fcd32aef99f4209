"""Pieces shared by the asynchronous and synchronous simulators.

Argument checks that run in Python before anything is traced, the device
mesh, and the one place where per-worker computations are spread over it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dcasgd_optax._src import _checks

AXIS = "workers"
# How a replay runs: one compiled program, or the host looping over chunks.
STRATEGIES = ("compiled", "host_chunks")
# Most gradient slots per device in one "host_chunks" call, by default: the
# program holds one unrolled copy of the gradient per slot, so its compile
# time grows with it.
HOST_SLOTS_PER_DEVICE = 8
# loss_fn with the model state made explicit: (params, model_state, batch)
# -> (loss, new_model_state). Models without state carry ``()``.
LossWithState = Callable[[Any, Any, Any], tuple[jax.Array, Any]]


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def make_mesh(devices: Sequence[Any] | None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all local devices)."""
  devices = list(jax.local_devices() if devices is None else devices)
  if not devices:
    raise ValueError("`devices` is empty: pass at least one device.")
  return Mesh(np.array(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every leaf on every device of ``mesh`` (no copy if it is already)."""
  return jax.device_put(tree, replicated(mesh))


def with_model_state(loss_fn: Callable, has_model_state: bool) -> LossWithState:
  """``loss_fn`` in the (params, model_state, batch) -> (loss, state) form."""
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got {loss_fn!r}.")
  if has_model_state:
    return loss_fn
  return lambda params, model_state, batch: (loss_fn(params, batch), ())


def check_model_state(model_state: Any, has_model_state: bool) -> Any:
  """The model state to store: ``()`` for stateless models."""
  if has_model_state and model_state is None:
    raise ValueError(
        "This simulator was built with has_model_state=True: pass the initial "
        "model state, `sim.init(params, model_state)`."
    )
  if not has_model_state and model_state is not None:
    raise ValueError(
        "`model_state` was given but the simulator was built with "
        "has_model_state=False; build it with has_model_state=True and a "
        "loss_fn(params, model_state, batch) -> (loss, new_model_state)."
    )
  return () if model_state is None else model_state


def check_arrivals(arrivals: Any, num_workers: int) -> np.ndarray:
  """``arrivals`` as a non-empty 1-D int32 NumPy array of ids in range."""
  if isinstance(arrivals, jax.core.Tracer):
    raise ValueError(
        "`arrivals` must be concrete (a NumPy or JAX array known now), not "
        "traced: the replay plan is built from it in Python."
    )
  arr = np.asarray(arrivals)
  if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(
        f"`arrivals` must be an integer array of worker ids, got dtype "
        f"{arr.dtype}."
    )
  if arr.ndim != 1:
    raise ValueError(f"`arrivals` must be 1-D, got shape {arr.shape}.")
  if arr.size == 0:
    raise ValueError("`arrivals` is empty: replay needs at least one arrival.")
  lo, hi = int(arr.min()), int(arr.max())
  if lo < 0 or hi >= num_workers:
    bad = lo if lo < 0 else hi
    raise ValueError(
        f"`arrivals` must lie in [0, {num_workers}) (num_workers="
        f"{num_workers}), got worker id {bad}."
    )
  return arr.astype(np.int32)


def check_batches(batches: Any, num: int, what: str) -> None:
  """Raises unless every leaf of ``batches`` has leading axis ``num``."""
  leaves = jax.tree_util.tree_flatten_with_path(batches)[0]
  if not leaves:
    raise ValueError("`batches` has no array leaves.")
  for path, x in leaves:
    shape = np.shape(x)
    if not shape or shape[0] != num:
      raise ValueError(
          f"`batches` leaf {jax.tree_util.keystr(path) or '<root>'} has shape "
          f"{shape}, but every leaf needs a leading axis of {what} = {num}."
      )


def _abstract(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree
  )


def signature(tree: Any) -> tuple[Any, ...]:
  """A hashable summary of a pytree: its structure, leaf shapes and dtypes."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves)


def check_loss_fn_cached(
    cache: dict[Any, Any], loss3: LossWithState, params: Any,
    model_state: Any, batches: Any,
) -> jax.ShapeDtypeStruct:
  """:func:`check_loss_fn`, traced once per (params, model state, one batch) signature."""
  batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], jnp.result_type(x)),
      batches,
  )
  key = signature((params, model_state, batch))
  if key not in cache:
    cache[key] = check_loss_fn(loss3, params, model_state, batch)
  return cache[key]


def check_loss_fn(
    loss3: LossWithState, params: Any, model_state: Any, batch: Any
) -> jax.ShapeDtypeStruct:
  """Traces ``loss_fn`` on one abstract batch; returns the loss's abstract value."""
  loss, new_state = jax.eval_shape(
      loss3, _abstract(params), _abstract(model_state), batch
  )
  if getattr(loss, "shape", None) != () or not jnp.issubdtype(
      loss.dtype, jnp.floating
  ):
    raise ValueError(
        "`loss_fn` must return a floating scalar loss for one batch, got "
        f"{loss}."
    )
  if signature(new_state) != signature(_abstract(model_state)):
    raise ValueError(
        "`loss_fn` must return the new model state with the structure, "
        f"shapes and dtypes of the old one.\n  old: {_abstract(model_state)}"
        f"\n  new: {_abstract(new_state)}"
    )
  return loss


def per_worker(
    fn: Callable, mesh: Mesh, shared: tuple[Any, ...], split: tuple[Any, ...]
) -> Any:
  """``fn(*shared, *split)`` with ``split``'s leading axis spread over ``mesh``.

  ``shared`` arguments are replicated; every leaf of ``split`` and of the
  output has a leading slot axis whose length is a multiple of the mesh size,
  so each device computes its own contiguous block of slots.
  """
  if mesh.size == 1:
    return fn(*shared, *split)
  specs = (P(),) * len(shared) + (P(AXIS),) * len(split)
  # check_vma=False keeps ``fn`` purely local: with it on, a gradient taken
  # inside ``fn`` with respect to a replicated input is summed over devices.
  mapped = jax.shard_map(
      fn, mesh=mesh, in_specs=specs, out_specs=P(AXIS), check_vma=False
  )
  return mapped(*shared, *split)


def default_vmap_slots(mesh: Mesh, vmap_slots: int | None) -> int | None:
  """Slots vmapped together: ``vmap_slots``, else 1 on CPU and all elsewhere.

  XLA:CPU runs a vmapped convolution whose kernel differs per slot as a
  grouped convolution, measured 30x slower than a loop over the slots.
  """
  if vmap_slots is not None:
    return vmap_slots
  return 1 if mesh.devices.flat[0].platform == "cpu" else None


def default_strategy(mesh: Mesh, strategy: str | None) -> str:
  """``strategy``, else ``"host_chunks"`` on CPU and ``"compiled"`` elsewhere.

  XLA:CPU compiles a convolution's kernel gradient inside a loop body
  (``while``, hence ``scan``) to a slow path, measured 9-24x slower than the
  same gradient outside any loop; ``"host_chunks"`` keeps gradients out of
  loops (benchmarks/harness_throughput.md).
  """
  if strategy is None:
    return "host_chunks" if mesh.devices.flat[0].platform == "cpu" else (
        "compiled")
  if strategy not in STRATEGIES:
    raise ValueError(
        f"`strategy` must be one of {STRATEGIES} or None, got {strategy!r}."
    )
  return strategy


def map_slots(
    fn: Callable, xs: tuple[Any, ...], vmap_slots: int | None,
    unroll: bool = False,
) -> Any:
  """``fn`` over the leading axis of ``xs``: vmapped ``vmap_slots`` at a time
  (all at once for ``None``), over the groups in a loop, or one after the
  other in the program if ``unroll`` (no loop: see :func:`default_strategy`).
  """
  if vmap_slots is None:
    return jax.vmap(fn)(*xs)
  if not unroll:
    batch_size = vmap_slots if vmap_slots > 1 else None
    return jax.lax.map(lambda args: fn(*args), xs, batch_size=batch_size)
  outs = []
  for i in range(0, jax.tree.leaves(xs)[0].shape[0], vmap_slots):
    if vmap_slots == 1:  # unbatched, so a convolution stays a plain one
      out = fn(*jax.tree.map(lambda x, i=i: x[i], xs))
      outs.append(jax.tree.map(lambda y: y[None], out))
    else:
      outs.append(jax.vmap(fn)(*jax.tree.map(
          lambda x, i=i: x[i:i + vmap_slots], xs)))
  return jax.tree.map(lambda *ys: jnp.concatenate(ys), *outs)


@jax.jit
def _take_rows(tree: Any, rows: jax.Array) -> Any:
  return jax.tree.map(lambda x: x[rows], tree)


def split_chunks(tree: Any, rows_CxL: np.ndarray) -> list[Any]:
  """``tree``'s rows ``rows_CxL[c]`` for every chunk ``c``: one gather."""
  leaves, treedef = jax.tree.flatten(_take_rows(tree, rows_CxL))
  per_leaf = [list(x) for x in leaves]  # one unstack per leaf
  return [treedef.unflatten(row) for row in zip(*per_leaf)]


@jax.jit
def concat_rows(lists: Any, keep: jax.Array) -> Any:
  """Each list of arrays in ``lists`` concatenated, rows ``keep`` kept."""
  return tuple(jnp.concatenate(xs)[keep] for xs in lists)


@jax.jit
def copy_tree(tree: Any) -> Any:
  """A copy of ``tree`` (so that donating it leaves the original intact)."""
  return jax.tree.map(jnp.copy, tree)


def check_state(state: Any, state_type: type, num_workers: int) -> None:
  """Raises unless ``state`` is a ``state_type`` made for ``num_workers``."""
  if not isinstance(state, state_type):
    raise ValueError(
        f"`state` must be a {state_type.__name__} from `init`, got "
        f"{type(state).__name__}."
    )
  if np.shape(state.last_pull) != (num_workers,):
    raise ValueError(
        f"`state` was made for {np.shape(state.last_pull)[0]} workers, but "
        f"this simulator has num_workers={num_workers}."
    )


class Setup(NamedTuple):
  """The constructor arguments both simulators share, validated."""

  num_workers: int
  loss3: Callable[..., Any]
  mesh: Any
  vmap_slots: int
  strategy: str


def setup(loss_fn, tx, num_workers, devices, has_model_state, vmap_slots,
          strategy) -> Setup:
  """Validates the shared constructor arguments and derives the defaults."""
  num_workers = _checks.check_positive_int("num_workers", num_workers)
  if not hasattr(tx, "init") or not hasattr(tx, "update"):
    raise TypeError(f"`tx` must be an optax transformation, got {tx!r}.")
  if vmap_slots is not None:
    _checks.check_positive_int("vmap_slots", vmap_slots)
  mesh = make_mesh(devices)
  return Setup(
      num_workers=num_workers,
      loss3=with_model_state(loss_fn, has_model_state),
      mesh=mesh,
      vmap_slots=default_vmap_slots(mesh, vmap_slots),
      strategy=default_strategy(mesh, strategy),
  )


def initial_state(state_type: type, tx: Any, num_workers: int, mesh: Any,
                  params: Any, model_state: Any, *, per_worker_model_state: bool):
  """Every worker holds ``params``; copies, so the arguments are never donated."""

  def build(params, model_state):
    params = jax.tree.map(jnp.copy, params)
    model_state = jax.tree.map(jnp.copy, model_state)
    worker_ms = ()
    if per_worker_model_state:
      worker_ms = jax.tree.map(
          lambda x: jnp.broadcast_to(x[None], (num_workers, *jnp.shape(x))),
          model_state,
      )
    return state_type(
        params, tx.init(params), model_state, worker_ms,
        jnp.zeros((), jnp.int32), jnp.zeros((num_workers,), jnp.int32),
    )

  args = replicate((params, model_state), mesh)
  return jax.jit(build, out_shardings=replicated(mesh))(*args)
