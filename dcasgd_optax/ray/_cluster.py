"""Connecting to Ray, and refusing a cluster that lets anyone in.

A Ray cluster runs whatever code its clients send (pickled functions), so a
cluster that does not authenticate its clients belongs to whoever can reach
its ports; Ray's GCS and raylets listen on every network interface, even when
the cluster was reached as ``127.0.0.1``. Before :func:`connect` lets
``ray.init`` join an existing cluster, it makes one gRPC call to the cluster's
GCS (its ``GetClusterId``, read-only) *without* credentials:

* the cluster rejects it (``UNAUTHENTICATED``): token authentication is on.
  :func:`connect` then checks that this process will send a token the cluster
  accepts (the same call with the token), and otherwise raises a
  :class:`ray.exceptions.AuthenticationError` at once, where ``ray.init``
  would retry for about 20 s and raise a ``ConnectionError`` that does not
  name the token.
* the cluster answers it: anyone who can reach it can run code there.
  :func:`connect` refuses (``RuntimeError``) unless the caller passes
  ``allow_insecure_cluster=True``, or unless Ray's mutual TLS is on
  (``RAY_USE_TLS``): then a client needs a certificate signed by the
  cluster's CA, which authenticates it too.
* nothing answers within ``timeout_s``: ``ConnectionError``.

Ray has no public API for either step (finding the address ``ray.init``
would contact, and a call that any cluster authenticates), so this module
uses Ray's own address resolution and the names of two read-only RPCs,
tested with the Ray versions pyproject's ``ray`` extra pins
(:data:`TESTED_RAY`); a Ray that changed them gets a clear error.

The token is looked up as Ray does (:mod:`_token`).
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import pathlib
from typing import Any

import grpc
import ray

from dcasgd_optax import extend
from dcasgd_optax.ray._token import find_token
from dcasgd_optax.ray._token import sends_token
from dcasgd_optax.ray._token import warn_if_others_can_read

_log = logging.getLogger(__name__)

# Ray has no public API for what this module needs: the address resolution
# ray.init runs, and two cheap, read-only RPCs behind Ray's token check (one
# per kind of endpoint). Tested with these Ray versions (pyproject's `ray`
# extra pins the same); a Ray that changed them gets a clear error.
TESTED_RAY = ">=2.52,<2.61"
_GCS_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
_RAY_CLIENT_METHOD = "/ray.rpc.RayletDriver/ClusterInfo"
_RAY_CLIENT_PREFIX = "ray://"
_TLS_VARS = ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")
_LOCALHOST = "127.0.0.1"
# How long the probe of the cluster of a fresh local Ray may take.
_LOCAL_PROBE_TIMEOUT_S = 5.0
# The one-line fixes the errors name: for the cluster, and for this process.
_CLUSTER_FIX = (
    "`export RAY_AUTH_MODE=token` on every node before `ray start` and here, "
    "with the cluster's token (`ray get-auth-token --generate` once) in "
    "~/.ray/auth_token or `RAY_AUTH_TOKEN`"
)
_DRIVER_FIX = (
    "`export RAY_AUTH_MODE=token` here, with the cluster's token in "
    "~/.ray/auth_token or `RAY_AUTH_TOKEN`"
)


class Access(enum.Enum):
  """How a cluster answered a call that carried no credentials."""

  OPEN = "open"  # It answered: anyone who reaches it can run code there.
  TOKEN = "token"  # It rejected the call: token authentication is on.
  UNREACHABLE = "unreachable"  # Nothing answered in time.
  NOT_RAY = "not_ray"  # A gRPC server that does not know the method.


def uses_tls() -> bool:
  """Whether Ray's mutual TLS is on in this process (``RAY_USE_TLS``)."""
  return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def _open_channel(target: str) -> grpc.Channel:
  """A gRPC channel to ``target`` secured the way Ray's own channels are."""
  if not uses_tls():
    return grpc.insecure_channel(target)
  missing = [name for name in _TLS_VARS if not os.environ.get(name)]
  if missing:
    raise ValueError(
        f"RAY_USE_TLS is on but {', '.join(missing)} is not set: Ray's TLS "
        f"needs all of {', '.join(_TLS_VARS)}."
    )
  cert, key, ca = (pathlib.Path(os.environ[n]).read_bytes() for n in _TLS_VARS)
  credentials = grpc.ssl_channel_credentials(
      root_certificates=ca, private_key=key, certificate_chain=cert
  )
  return grpc.secure_channel(target, credentials)


def probe(
    target: str,
    *,
    token: str | None = None,
    method: str = _GCS_METHOD,
    timeout_s: float = 30.0,
) -> grpc.StatusCode:
  """Calls ``method`` at ``target`` once, with ``token`` if given.

  The request is empty; waits up to ``timeout_s`` for the server to come up.

  Returns:
    The call's status code (``grpc.StatusCode.OK`` if it succeeded).
  """
  metadata = [("authorization", f"Bearer {token}")] if token else None
  with _open_channel(target) as channel:
    call = channel.unary_unary(method)
    try:
      call(b"", timeout=timeout_s, metadata=metadata, wait_for_ready=True)
    except grpc.RpcError as e:
      return e.code()
  return grpc.StatusCode.OK


def cluster_access(
    target: str, *, method: str = _GCS_METHOD, timeout_s: float = 30.0
) -> Access:
  """How the cluster at ``target`` treats a call without credentials.

  Examples:
    >>> cluster_access("127.0.0.1:1", timeout_s=0.2)  # nothing listens there
    <Access.UNREACHABLE: 'unreachable'>
  """
  code = probe(target, method=method, timeout_s=timeout_s)
  if code == grpc.StatusCode.UNAUTHENTICATED:
    return Access.TOKEN
  if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
    return Access.UNREACHABLE
  if code == grpc.StatusCode.UNIMPLEMENTED:
    return Access.NOT_RAY
  # Any other answer (OK, or the method's own error) got past authentication.
  return Access.OPEN


def resolve(
    address: str | None, temp_dir: str | None = None
) -> tuple[str | None, str]:
  """The endpoint ``ray.init(address=address)`` would contact, and its RPC.

  ``temp_dir`` is ``ray.init``'s ``_temp_dir``, where ``ray start`` records
  the latest cluster's address.

  Returns:
    ``(target, method)``: ``target`` is ``"host:port"`` of the cluster's GCS
    (or of its Ray Client server, for ``"ray://..."``), or ``None`` when
    ``ray.init`` would start a new local Ray; ``method`` is the RPC to probe.

  Raises:
    ConnectionError: ``address="auto"`` and no running cluster is known.
  """
  if address is not None and address.startswith(_RAY_CLIENT_PREFIX):
    return address[len(_RAY_CLIENT_PREFIX):], _RAY_CLIENT_METHOD
  try:
    from ray._private import services  # pylint: disable=g-import-not-at-top
    canonicalize = services.canonicalize_bootstrap_address
  except (ImportError, AttributeError) as e:
    raise _internals_changed(
        "ray._private.services.canonicalize_bootstrap_address (the address "
        "resolution ray.init runs)") from e
  return canonicalize(address, temp_dir), _GCS_METHOD


def _internals_changed(what: str) -> RuntimeError:
  """The error for a Ray whose internals this module needs have changed."""
  return RuntimeError(
      f"dcasgd_optax.ray.connect needs {what}, which this Ray "
      f"({ray.__version__}) does not have: Ray's internals changed. It is "
      f"tested with ray{TESTED_RAY}; install one of those (`pip install "
      "'dcasgd-optax[ray]'`).")


def _where(target: str, address: str | None) -> str:
  """Names a cluster in messages: ``Ray cluster at host:port (address=...)``."""
  return f"Ray cluster at {target} (address={address!r})"


def _check_token(address: str | None, target: str, method: str,
                 timeout_s: float) -> None:
  """Raises unless this process sends a token that the cluster accepts."""
  token = find_token() if sends_token(address) else None
  if token is None:
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    raise ray.exceptions.AuthenticationError(
        f"The {_where(target, address)} requires token authentication, and "
        f"this process would connect without a token (RAY_AUTH_MODE is "
        f"{mode}). Fix: {_DRIVER_FIX}"
    )
  warn_if_others_can_read(token)
  code = probe(target, token=token.value, method=method, timeout_s=timeout_s)
  if code == grpc.StatusCode.UNAUTHENTICATED:
    raise ray.exceptions.AuthenticationError(
        f"The {_where(target, address)} rejected the token from "
        f"{token.source}: it is not this cluster's token"
    )


def check_cluster(
    address: str | None,
    target: str,
    *,
    method: str = _GCS_METHOD,
    allow_insecure_cluster: bool = False,
    timeout_s: float = 30.0,
) -> None:
  """Raises unless the cluster at ``target`` authenticates this process.

  Raises:
    ray.exceptions.AuthenticationError: the cluster needs a token and this
      process has none, or one the cluster rejects.
    RuntimeError: the cluster lets any client in, and
      ``allow_insecure_cluster`` is False (and Ray's TLS is off).
    ConnectionError: nothing (or no Ray) answered within ``timeout_s``.
  """
  access = cluster_access(target, method=method, timeout_s=timeout_s)
  if access == Access.TOKEN:
    _check_token(address, target, method, timeout_s)
  elif access == Access.UNREACHABLE:
    tls = "" if uses_tls() else (
        " If the cluster uses TLS, set RAY_USE_TLS=1 and "
        f"{', '.join(_TLS_VARS)} here as on its nodes.")
    raise ConnectionError(
        f"No Ray cluster answered at {target} (address={address!r}) within "
        f"{timeout_s:g} s.{tls}"
    )
  elif access == Access.NOT_RAY:
    raise ConnectionError(
        f"The server at {target} (address={address!r}) does not know the RPC "
        f"{method}: it is not a Ray cluster, or a Ray whose internal RPCs "
        f"changed (this is tested with ray{TESTED_RAY}; this process has "
        f"{ray.__version__})."
    )
  elif not (uses_tls() or allow_insecure_cluster):
    raise RuntimeError(
        f"Refusing to connect to the {_where(target, address)}: it runs code "
        "for any client without authentication, so anyone who can reach its "
        "ports "
        "can take it over, with the model and data sent to it. Fix: enable "
        f"token authentication ({_CLUSTER_FIX}); or, if only trusted machines "
        "can reach the cluster, pass `allow_insecure_cluster=True`."
    )


@functools.cache
def _warn_open_local_cluster(gcs_address: str) -> None:
  """Logs, once per cluster, that a local Ray started without authentication."""
  _log.warning(
      "The local Ray started at %s has token authentication off "
      "(RAY_AUTH_MODE=%s): its ports listen on every network interface, so "
      "anyone who can reach this machine can run code in it. Unset "
      "RAY_AUTH_MODE (Ray >= 2.59 then turns it on) or set "
      "RAY_AUTH_MODE=token.",
      gcs_address, os.environ.get("RAY_AUTH_MODE", "unset"),
  )


def _start_local(address: str | None, init_kwargs: dict[str, Any]) -> None:
  """Starts a local Ray, its dashboard on localhost unless told otherwise."""
  init_kwargs.setdefault("dashboard_host", _LOCALHOST)
  ray.init(address=address, **init_kwargs)
  gcs_address = ray.get_runtime_context().gcs_address
  access = cluster_access(gcs_address, timeout_s=_LOCAL_PROBE_TIMEOUT_S)
  if access == Access.OPEN and not uses_tls():
    _warn_open_local_cluster(gcs_address)


def connect(
    address: str | None = None,
    *,
    allow_insecure_cluster: bool = False,
    timeout_s: float = 30.0,
    **init_kwargs: Any,
) -> bool:
  """Connects to Ray like ``ray.init``, refusing a cluster that lets anyone in.

  An existing cluster (a ``"host:port"``, ``"ray://host:port"``, or one that
  ``None`` or ``"auto"`` finds) must authenticate its clients: a cluster with
  token authentication must accept this process's token, which is checked
  before ``ray.init`` (a clear error at once instead of Ray's retries); a
  cluster without it is refused unless ``allow_insecure_cluster=True`` (Ray's
  mutual TLS, ``RAY_USE_TLS``, counts as authentication). Refusing rather
  than warning: a cluster that runs anyone's code is taken over in practice
  (exposed Ray clusters have been), a warning scrolls past among Ray's own
  logs, and the opt-in is one explicit argument. A new local Ray
  (``"local"``, or ``None`` when none is known) is started with its
  dashboard bound to ``127.0.0.1``; if it has token authentication off, a
  warning says so once.

  Args:
    address: as for ``ray.init``: ``None``, ``"auto"``, ``"local"``,
      ``"host:port"`` or ``"ray://host:port"``.
    allow_insecure_cluster: connect to an existing cluster even though it
      runs code for any client that reaches it (only for a network that only
      trusted machines can reach).
    timeout_s: how long to wait for the cluster to answer (> 0).
    **init_kwargs: passed to ``ray.init``.

  Returns:
    True if this call initialised Ray (the caller shuts it down); False if
    Ray was already initialised, in which case nothing is checked or changed.

  Raises:
    ray.exceptions.AuthenticationError: the cluster needs a token and this
      process has none, or a wrong one.
    RuntimeError: the cluster runs code for any client (see
      ``allow_insecure_cluster``).
    ConnectionError: nothing answered at the address within ``timeout_s``.

  Examples:
    >>> import dcasgd_optax.ray
    >>> dcasgd_optax.ray.connect("10.0.0.5:6379")  # doctest: +SKIP
    Traceback (most recent call last):
    ...
    RuntimeError: Refusing to connect to the Ray cluster at 10.0.0.5:6379 ...
  """
  if address is not None and not isinstance(address, str):
    raise TypeError(f"`address` must be a str or None, got {address!r}.")
  if not isinstance(allow_insecure_cluster, bool):
    raise TypeError("`allow_insecure_cluster` must be a bool, got "
                    f"{allow_insecure_cluster!r}.")
  extend.check_scalar_range("timeout_s", timeout_s, low=0.0,
                             low_inclusive=False)
  if ray.is_initialized():
    return False
  target, method = resolve(address, init_kwargs.get("_temp_dir"))
  if target is None:
    _start_local(address, init_kwargs)
    return True
  check_cluster(address, target, method=method, timeout_s=timeout_s,
                allow_insecure_cluster=allow_insecure_cluster)
  ray.init(address=address, **init_kwargs)
  return True
