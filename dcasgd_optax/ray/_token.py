"""The Ray authentication token this process would send, found as Ray does.

The token is looked up as Ray does: ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``; Ray sends it only when
``RAY_AUTH_MODE=token``, or, with ``RAY_AUTH_MODE`` unset, for
``address=None`` or ``"auto"`` when a token exists. :mod:`_cluster` uses it
to check, before ``ray.init``, that a cluster will accept this process.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
from typing import NamedTuple

_log = logging.getLogger(__name__)


class Token(NamedTuple):
  """A Ray authentication token and where it was found (for messages)."""

  value: str
  source: str
  path: pathlib.Path | None = None  # The file it was read from, if any.


def find_token() -> Token | None:
  """The token Ray would send, looked up in Ray's order; None if none.

  Returns:
    A :class:`Token` from ``RAY_AUTH_TOKEN``, else from the file named by
    ``RAY_AUTH_TOKEN_PATH``, else from ``~/.ray/auth_token``; ``None`` if
    none of them holds one. It does not look at ``RAY_AUTH_MODE``.

  Examples:
    >>> import os
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"RAY_AUTH_TOKEN": "0123abcd"}):
    ...   find_token()
    Token(value='0123abcd', source='RAY_AUTH_TOKEN', path=None)
  """
  value = os.environ.get("RAY_AUTH_TOKEN", "").strip()
  if value:
    return Token(value, "RAY_AUTH_TOKEN")
  env_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
  source = f"RAY_AUTH_TOKEN_PATH ({env_path})"
  if env_path:
    path = pathlib.Path(env_path)
  else:
    path = pathlib.Path.home() / ".ray" / "auth_token"
    source = str(path)
  try:
    value = path.read_text().strip()
  except OSError:
    return None
  return Token(value, source, path) if value else None


def sends_token(address: str | None) -> bool:
  """Whether ``ray.init(address=address)`` in this process sends a token.

  Mirrors Ray: ``RAY_AUTH_MODE=token`` sends one, any other value does not;
  with ``RAY_AUTH_MODE`` unset, Ray turns token mode on only for a cluster it
  finds itself (``address`` None or ``"auto"``) and only if a token exists,
  so that an explicit address never receives a token unasked.
  """
  mode = os.environ.get("RAY_AUTH_MODE")
  if mode is not None:
    return mode.lower() == "token"
  return address in (None, "auto") and find_token() is not None


def warn_if_others_can_read(token: Token) -> None:
  """Warns (once per file) if a token file is readable by other users."""
  path = token.path
  if path is not None and path.stat().st_mode & 0o077:
    _warn_token_readable(str(path), path.stat().st_mode & 0o777)


@functools.cache
def _warn_token_readable(path: str, mode: int) -> None:
  _log.warning(
      "The Ray token file %s has mode %o: other users of this machine can "
      "read it and run code on the cluster. Fix: chmod 600 %s",
      path,
      mode,
      path,
  )
