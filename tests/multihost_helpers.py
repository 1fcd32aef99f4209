"""A multi-controller JAX program on one machine, for tests: a launcher.

:func:`launch` runs the same Python code in ``num_processes`` fresh
subprocesses that join one JAX program (``jax.distributed.initialize`` with
a coordinator on a free loopback port, collectives across processes over
gloo), each with ``devices_per_process`` fake CPU devices: 2 x 4 is a
two-host pod slice in miniature, and 1 x 8 the same devices in one process.

Every process gets the prelude :data:`PRELUDE` (JAX joined, ``PROCESS``,
``NUM_PROCESSES`` and ``OUT``, a directory the processes share, defined),
then the code. Nothing here ever waits unbounded: the processes run under
one deadline, after which every one still alive is killed (its whole
process group) and the result says so.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = textwrap.dedent("""
    import os, sys
    PROCESS = int(os.environ["DCASGD_TEST_PROCESS"])
    NUM_PROCESSES = int(os.environ["DCASGD_TEST_NUM_PROCESSES"])
    OUT = os.environ["DCASGD_TEST_OUT"]
    import jax
    jax.config.update("jax_numpy_rank_promotion", "raise")
    if NUM_PROCESSES > 1:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(
          coordinator_address=os.environ["DCASGD_TEST_COORDINATOR"],
          num_processes=NUM_PROCESSES, process_id=PROCESS,
          initialization_timeout=int(os.environ["DCASGD_TEST_INIT_TIMEOUT"]),
          heartbeat_timeout_seconds=int(
              os.environ["DCASGD_TEST_HEARTBEAT_TIMEOUT"]))
""")


@dataclasses.dataclass
class Result:
  """What each process did: exit codes (None: killed at the deadline),
  outputs, and the directory they shared."""

  returncodes: list[int | None]
  stdouts: list[str]
  stderrs: list[str]
  out: str
  seconds: float

  @property
  def ok(self) -> bool:
    return all(rc == 0 for rc in self.returncodes)

  def report(self) -> str:
    return "\n".join(
        f"--- process {i} (rc={rc}):\n{out}\n{err[-4000:]}"
        for i, (rc, out, err) in enumerate(
            zip(self.returncodes, self.stdouts, self.stderrs)))


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(code: str, num_processes: int, devices_per_process: int, *,
           timeout: float = 120.0, out: str | None = None,
           coordinator: str | None = None, init_timeout: int = 30,
           heartbeat_timeout: int = 10, args: tuple[str, ...] = (),
           env: dict[str, str] | None = None,
           only: tuple[int, ...] | None = None) -> Result:
  """Runs ``code`` (after :data:`PRELUDE`) in ``num_processes`` processes.

  Args:
    code: Python source, run by every process.
    num_processes: processes joined into one JAX program (1: no
      ``jax.distributed``).
    devices_per_process: fake CPU devices each process has.
    timeout: seconds for all of them together; any still running then is
      killed (its return code is ``None``).
    out: the directory the processes share (default: a new one).
    coordinator: ``host:port`` of the coordinator (default: a free loopback
      port, process 0 serving it).
    init_timeout: ``jax.distributed.initialize``'s initialization_timeout.
    heartbeat_timeout: its heartbeat_timeout_seconds.
    args: ``sys.argv[1:]`` of every process.
    env: extra environment variables.
    only: the process ids to start (default all): the others are missing,
      as if their hosts were down.
  """
  out = out or tempfile.mkdtemp(prefix="multihost-")
  os.makedirs(out, exist_ok=True)
  coordinator = coordinator or f"127.0.0.1:{free_port()}"
  script = os.path.join(out, "_program.py")
  with open(script, "w") as f:
    f.write(PRELUDE + "\n" + textwrap.dedent(code))
  procs, files = [], []
  for i in (range(num_processes) if only is None else only):
    child = dict(os.environ)
    child.update(env or {})
    child.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=(f"--xla_force_host_platform_device_count="
                   f"{devices_per_process}"),
        DCASGD_TEST_PROCESS=str(i),
        DCASGD_TEST_NUM_PROCESSES=str(num_processes),
        DCASGD_TEST_COORDINATOR=coordinator,
        DCASGD_TEST_OUT=out,
        DCASGD_TEST_INIT_TIMEOUT=str(init_timeout),
        DCASGD_TEST_HEARTBEAT_TIMEOUT=str(heartbeat_timeout),
        PYTHONPATH=ROOT + os.pathsep + child.get("PYTHONPATH", ""),
    )
    stdout = tempfile.TemporaryFile(mode="w+")
    stderr = tempfile.TemporaryFile(mode="w+")
    files.append((stdout, stderr))
    procs.append(subprocess.Popen(
        [sys.executable, script, *args], cwd=ROOT, env=child, stdout=stdout,
        stderr=stderr, start_new_session=True))
  start = time.monotonic()
  returncodes: list[int | None] = []
  for proc in procs:
    left = max(0.0, timeout - (time.monotonic() - start))
    try:
      returncodes.append(proc.wait(timeout=left))
    except subprocess.TimeoutExpired:
      returncodes.append(None)
  for proc, rc in zip(procs, returncodes):
    if rc is None:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      proc.wait()
  seconds = time.monotonic() - start
  outs, errs = [], []
  for stdout, stderr in files:
    stdout.seek(0)
    stderr.seek(0)
    outs.append(stdout.read())
    errs.append(stderr.read())
    stdout.close()
    stderr.close()
  return Result(returncodes, outs, errs, out, seconds)
