"""dcasgd_optax.ray._cluster: finding the token, probing a cluster, refusing.

The probes run against small in-process gRPC servers that behave as Ray's GCS
does (Ray's documented contract: a call without ``authorization: Bearer
<token>`` is rejected with ``UNAUTHENTICATED`` when token authentication is
on, and answered otherwise). tests/test_ray_auth.py checks the same code
against real Ray clusters (slow).
"""

from __future__ import annotations

import datetime
from concurrent import futures

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

import dcasgd_optax.ray as dray  # pylint: disable=g-import-not-at-top
from dcasgd_optax.ray import _cluster  # pylint: disable=g-import-not-at-top

try:  # Only the TLS test needs it (Ray's TLS tooling uses it too).
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID
except ImportError:
  x509 = None

GCS_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
TOKEN = "f00dfeedf00dfeedf00dfeedf00dfeed"
_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
        "RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY",
        "RAY_TLS_CA_CERT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
  """No Ray auth or TLS settings, and a HOME without ~/.ray/auth_token."""
  for name in _ENV:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))


class FakeGcs(grpc.GenericRpcHandler):
  """Answers GetClusterId like Ray's GCS; checks the token if it has one."""

  def __init__(self, token=None):
    self.token = token

  def service(self, handler_call_details):
    if handler_call_details.method != GCS_METHOD:
      return None  # grpc answers UNIMPLEMENTED.

    def get_cluster_id(request, context):
      del request
      metadata = dict(context.invocation_metadata())
      if self.token and metadata.get("authorization") != f"Bearer {self.token}":
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken")
      return b"\x0a\x04abcd"

    return grpc.unary_unary_rpc_method_handler(get_cluster_id)


def serve(handler, credentials=None):
  """Starts a gRPC server on every interface; returns (server, port)."""
  server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
  server.add_generic_rpc_handlers((handler,))
  if credentials is None:
    port = server.add_insecure_port("[::]:0")
  else:
    port = server.add_secure_port("localhost:0", credentials)
  server.start()
  return server, port


@pytest.fixture
def open_gcs():
  server, port = serve(FakeGcs())
  yield f"127.0.0.1:{port}"
  server.stop(None)


@pytest.fixture
def token_gcs():
  server, port = serve(FakeGcs(TOKEN))
  yield f"127.0.0.1:{port}"
  server.stop(None)


# ------------------------------------------------------------------- tokens


def test_token_is_found_in_rays_order(monkeypatch, tmp_path):
  assert _cluster.find_token() is None
  default = tmp_path / "home" / ".ray" / "auth_token"
  default.parent.mkdir(parents=True)
  default.write_text("from-home\n")
  assert _cluster.find_token() == ("from-home", str(default), default)
  path = tmp_path / "token"
  path.write_text("  from-path ")
  monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
  assert _cluster.find_token().value == "from-path"
  assert "RAY_AUTH_TOKEN_PATH" in _cluster.find_token().source
  monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
  assert _cluster.find_token() == ("from-env", "RAY_AUTH_TOKEN", None)


def test_empty_or_unreadable_token_is_no_token(monkeypatch, tmp_path):
  monkeypatch.setenv("RAY_AUTH_TOKEN", "  ")
  monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
  assert _cluster.find_token() is None
  (tmp_path / "empty").write_text("\n")
  monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "empty"))
  assert _cluster.find_token() is None


@pytest.mark.parametrize(
    "mode, address, has_token, expected",
    [
        ("token", "10.0.0.1:6379", True, True),
        ("TOKEN", None, False, True),  # Ray then fails: no token to send.
        ("disabled", None, True, False),
        (None, "10.0.0.1:6379", True, False),  # explicit address: never
        (None, "auto", True, True),
        (None, None, True, True),
        (None, "auto", False, False),
    ],
)
def test_sends_token_follows_ray(monkeypatch, mode, address, has_token,
                                 expected):
  if mode is not None:
    monkeypatch.setenv("RAY_AUTH_MODE", mode)
  if has_token:
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
  assert _cluster.sends_token(address) is expected


# ------------------------------------------------------------------- probes


def test_probe_tells_open_token_unreachable_and_not_ray(open_gcs, token_gcs):
  assert _cluster.cluster_access(open_gcs, timeout_s=10) is _cluster.Access.OPEN
  assert (_cluster.cluster_access(token_gcs, timeout_s=10)
          is _cluster.Access.TOKEN)
  assert _cluster.probe(token_gcs, token=TOKEN, timeout_s=10) == grpc.StatusCode.OK
  assert (_cluster.probe(token_gcs, token="wrong", timeout_s=10)
          == grpc.StatusCode.UNAUTHENTICATED)
  assert (_cluster.cluster_access(open_gcs, method="/ray.rpc.X/Y", timeout_s=10)
          is _cluster.Access.NOT_RAY)
  server, port = serve(FakeGcs())
  server.stop(None)  # The port is now closed.
  assert (_cluster.cluster_access(f"127.0.0.1:{port}", timeout_s=0.3)
          is _cluster.Access.UNREACHABLE)


def test_open_cluster_is_refused_unless_allowed(open_gcs):
  with pytest.raises(RuntimeError, match="allow_insecure_cluster=True") as e:
    _cluster.check_cluster("auto", open_gcs, timeout_s=10)
  assert "RAY_AUTH_MODE=token" in str(e.value)  # the fix
  assert "take it over" in str(e.value)  # the risk
  _cluster.check_cluster("auto", open_gcs, timeout_s=10,
                         allow_insecure_cluster=True)


def test_token_cluster_needs_this_process_to_send_its_token(
    monkeypatch, token_gcs):
  check = lambda: _cluster.check_cluster(token_gcs, token_gcs, timeout_s=10)
  with pytest.raises(ray.exceptions.AuthenticationError,
                     match="requires token authentication.*RAY_AUTH_MODE is unset"):
    check()
  monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
  with pytest.raises(ray.exceptions.AuthenticationError,
                     match="RAY_AUTH_MODE is unset"):
    check()  # An explicit address never gets a token unless the mode says so.
  monkeypatch.setenv("RAY_AUTH_MODE", "token")
  check()
  monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
  with pytest.raises(ray.exceptions.AuthenticationError,
                     match="rejected the token from RAY_AUTH_TOKEN"):
    check()


@pytest.mark.parametrize("mode, warns", [(0o644, True), (0o600, False)])
def test_token_file_that_others_can_read_is_reported(
    monkeypatch, tmp_path, caplog, token_gcs, mode, warns):
  path = tmp_path / "token"
  path.write_text(TOKEN)
  path.chmod(mode)
  monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
  monkeypatch.setenv("RAY_AUTH_MODE", "token")
  with caplog.at_level("WARNING", logger=_cluster.__name__):
    _cluster.check_cluster(token_gcs, token_gcs, timeout_s=10)
  assert (f"chmod 600 {path}" in caplog.text) is warns


def test_nothing_listening_is_a_connection_error():
  server, port = serve(FakeGcs())
  server.stop(None)
  with pytest.raises(ConnectionError, match="within 0.3 s.*RAY_USE_TLS"):
    _cluster.check_cluster(None, f"127.0.0.1:{port}", timeout_s=0.3)


def test_connect_refuses_before_ray_starts(open_gcs):
  assert not ray.is_initialized()
  with pytest.raises(RuntimeError, match="Refusing to connect to the Ray cluster"):
    dray.connect(open_gcs, timeout_s=10)
  assert not ray.is_initialized()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(allow_insecure_cluster="yes"), TypeError, "allow_insecure_cluster"),
        (dict(timeout_s=0), ValueError, "timeout_s"),
        (dict(address=6379), TypeError, "`address` must be a str or None"),
    ],
)
def test_connect_bad_arguments_fail_before_ray_starts(kwargs, error, match):
  kwargs.setdefault("address", "127.0.0.1:1")
  with pytest.raises(error, match=match):
    dray.connect(**kwargs)
  assert not ray.is_initialized()


def test_ray_client_address_probes_the_client_server():
  target, method = _cluster.resolve("ray://10.0.0.1:10001")
  assert target == "10.0.0.1:10001"
  assert method.startswith("/ray.rpc.RayletDriver/")
  assert _cluster.resolve("local") == (None, GCS_METHOD)


# ---------------------------------------------------------------------- TLS


def self_signed(tmp_path):
  """A key and a self-signed certificate for localhost (its own CA)."""
  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
  now = datetime.datetime.now(datetime.timezone.utc)
  cert = (
      x509.CertificateBuilder().subject_name(name).issuer_name(name)
      .public_key(key.public_key()).serial_number(x509.random_serial_number())
      .not_valid_before(now - datetime.timedelta(minutes=1))
      .not_valid_after(now + datetime.timedelta(days=1))
      .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                     critical=False)
      .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                     critical=True)
      .sign(key, hashes.SHA256())
  )
  cert_pem = cert.public_bytes(serialization.Encoding.PEM)
  key_pem = key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
  (tmp_path / "cert.pem").write_bytes(cert_pem)
  (tmp_path / "key.pem").write_bytes(key_pem)
  return cert_pem, key_pem


@pytest.mark.skipif(x509 is None, reason="needs the cryptography package")
def test_mutual_tls_counts_as_authentication(monkeypatch, tmp_path):
  cert_pem, key_pem = self_signed(tmp_path)
  credentials = grpc.ssl_server_credentials(
      [(key_pem, cert_pem)], root_certificates=cert_pem,
      require_client_auth=True)
  server, port = serve(FakeGcs(), credentials)
  target = f"localhost:{port}"
  try:
    with pytest.raises(ConnectionError, match="RAY_USE_TLS=1"):
      _cluster.check_cluster(target, target, timeout_s=0.5)  # plain client
    monkeypatch.setenv("RAY_USE_TLS", "1")
    with pytest.raises(ValueError, match="RAY_TLS_SERVER_CERT"):
      _cluster.check_cluster(target, target, timeout_s=10)
    monkeypatch.setenv("RAY_TLS_SERVER_CERT", str(tmp_path / "cert.pem"))
    monkeypatch.setenv("RAY_TLS_SERVER_KEY", str(tmp_path / "key.pem"))
    monkeypatch.setenv("RAY_TLS_CA_CERT", str(tmp_path / "cert.pem"))
    assert _cluster.cluster_access(target, timeout_s=10) is _cluster.Access.OPEN
    _cluster.check_cluster(target, target, timeout_s=10)  # no refusal
  finally:
    server.stop(None)
