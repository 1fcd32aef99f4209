"""Builds the CPU kernel of ``dcasgd`` ahead of time.

``python -m dcasgd_optax.build_kernel [CACHE_DIR]`` compiles it into the
cache (``$DCASGD_OPTAX_CACHE_DIR``, else ``~/.cache/dcasgd_optax``, or
``CACHE_DIR``), as the first ``dcasgd`` update on CPU otherwise does, and
prints its path; a failure is printed and exits with status 1. See
:func:`dcasgd_optax.build_cpu_kernel`.
"""

from __future__ import annotations

import sys

from dcasgd_optax._src._kernel_build import build_cpu_kernel


def main(argv: list[str]) -> int:
  """Builds the kernel into ``argv[0]`` (or the default cache); exit status."""
  if len(argv) > 1 or any(a.startswith("-") for a in argv):
    print(
        "usage: python -m dcasgd_optax.build_kernel [CACHE_DIR]",
        file=sys.stderr,
    )
    return 2
  try:
    path = build_cpu_kernel(argv[0] if argv else None)
  except (OSError, RuntimeError) as e:
    print(f"dcasgd_optax: could not build the CPU kernel: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
