"""The experiments as one program on several hosts (docs/pod.md).

Every process runs the whole config (the simulator's mesh spans every
process's devices); only process 0 evaluates and writes results. What the
entry points need for that: the ``--multihost`` flags and the call that
joins the processes (:func:`initialize_from_flags`), who writes
(:func:`is_writer`), and an evaluation made on process 0 whose figures every
process gets (:func:`evaluate_on_writer`), so that every process keeps the
same history and checkpoints the same metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from absl import flags
import jax
from jax.experimental import multihost_utils
import numpy as np

from dcasgd_optax.harness import to_host


def define_flags() -> None:
  """``--multihost`` and the optional arguments of
  ``jax.distributed.initialize`` (detected on Cloud TPU, Slurm, Open MPI)."""
  flags.DEFINE_bool(
      "multihost", False,
      "Join the other processes of a multi-host program (a TPU pod slice, "
      "several GPU nodes) with jax.distributed.initialize() first.")
  flags.DEFINE_string(
      "coordinator_address", None,
      "host:port of process 0's coordinator (with --multihost; detected on "
      "Cloud TPU, Slurm and Open MPI).")
  flags.DEFINE_integer("num_processes", None,
                       "Processes in the program (with --multihost).")
  flags.DEFINE_integer("process_id", None,
                       "This process's id, 0 .. num_processes - 1.")


def initialize_from_flags() -> None:
  """``jax.distributed.initialize`` with the flags' arguments, if
  ``--multihost``; before any other JAX call."""
  f = flags.FLAGS
  if not f.multihost:
    for name in ("coordinator_address", "num_processes", "process_id"):
      if f[name].value is not None:
        raise flags.ValidationError(f"--{name} needs --multihost.")
    return
  jax.distributed.initialize(
      coordinator_address=f.coordinator_address,
      num_processes=f.num_processes, process_id=f.process_id)


def is_writer() -> bool:
  """Whether this process writes the results (process 0)."""
  return jax.process_index() == 0


def evaluate_on_writer(evaluate: Callable[..., Any], params: Any,
                       model_state: Any) -> tuple[float, float]:
  """``evaluate(params, model_state)`` as floats, computed by process 0 alone.

  In one process this is the plain call. In several, process 0 evaluates a
  host copy of the (replicated) params on its own devices, the others wait,
  and every process receives the figures.
  """
  if jax.process_count() == 1:
    error, loss = evaluate(params, model_state)
    return float(error), float(loss)
  figures = np.zeros((2,), np.float32)
  if is_writer():
    error, loss = evaluate(*to_host((params, model_state)))
    figures = np.array([error, loss], np.float32)
  figures = multihost_utils.broadcast_one_to_all(figures)
  return float(figures[0]), float(figures[1])
