"""dcasgd_optax.ray.connect: what it refuses, and why, before Ray starts.

The clusters here are small in-process gRPC servers that answer as Ray's
do, by Ray's documented contract: with token authentication on, a call
without ``authorization: Bearer <token>`` is rejected with
``UNAUTHENTICATED``; without it, the call is answered. Every case below is
one that ``connect`` must refuse before ``ray.init`` (so Ray is never
started); tests/test_ray_auth.py runs the accepted cases, and the same
refusals, against real Ray clusters (slow).
"""

from __future__ import annotations

from concurrent import futures
import datetime
import ipaddress
import logging

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

import dcasgd_optax.ray as dray  # noqa: E402  (after the importorskip)

try:  # Only the TLS test needs it (Ray's own TLS tooling uses it too).
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID
except ImportError:
  x509 = None

GCS_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
RAY_CLIENT_METHOD = "/ray.rpc.RayletDriver/ClusterInfo"
TOKEN = "f00dfeedf00dfeedf00dfeedf00dfeed"
_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
        "RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY",
        "RAY_TLS_CA_CERT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
  """No Ray auth or TLS settings, a HOME without a token; Ray never starts."""
  for name in _ENV:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert not ray.is_initialized()
  yield
  assert not ray.is_initialized()


class FakeRay(grpc.GenericRpcHandler):
  """Answers ``method`` as Ray does; checks the token if it has one."""

  def __init__(self, token=None, method=GCS_METHOD):
    self.token = token
    self.method = method

  def service(self, handler_call_details):
    if handler_call_details.method != self.method:
      return None  # grpc answers UNIMPLEMENTED.

    def answer(request, context):
      del request
      metadata = dict(context.invocation_metadata())
      if self.token and metadata.get("authorization") != f"Bearer {self.token}":
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken")
      return b""

    return grpc.unary_unary_rpc_method_handler(answer)


@pytest.fixture
def serve():
  """Starts servers for the test (stopped after it); returns their port."""
  servers = []

  def start(handler, credentials=None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    # On every interface: Ray turns 127.0.0.1 into this host's address.
    if credentials is None:
      port = server.add_insecure_port("[::]:0")
    else:
      port = server.add_secure_port("[::]:0", credentials)
    server.start()
    servers.append(server)
    return port

  yield start
  for server in servers:
    server.stop(None)


# ------------------------------------------------------------ open cluster


def test_cluster_without_authentication_is_refused(serve):  # pylint: disable=redefined-outer-name
  port = serve(FakeRay())
  with pytest.raises(RuntimeError, match="Refusing to connect") as e:
    dray.connect(f"127.0.0.1:{port}", timeout_s=10)
  message = str(e.value)
  assert f":{port} (address='127.0.0.1:{port}')" in message
  assert "take it over" in message  # the risk
  assert "`export RAY_AUTH_MODE=token`" in message  # the fix
  assert "allow_insecure_cluster=True" in message  # the way out


# ----------------------------------------------------------- token cluster


@pytest.mark.parametrize(
    "env, match",
    [
        ({}, "requires token authentication.*RAY_AUTH_MODE is unset"),
        # Ray never sends a token to an explicit address unless told to.
        ({"RAY_AUTH_TOKEN": TOKEN},
         "requires token authentication.*RAY_AUTH_MODE is unset"),
        ({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": TOKEN},
         "RAY_AUTH_MODE is disabled"),
        ({"RAY_AUTH_MODE": "token"}, "this process would connect without a"),
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32},
         "rejected the token from RAY_AUTH_TOKEN: it is not"),
    ],
)
def test_token_cluster_refuses_a_missing_or_wrong_token(
    serve, monkeypatch, env, match):  # pylint: disable=redefined-outer-name
  port = serve(FakeRay(TOKEN))
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ray.exceptions.AuthenticationError, match=match):
    dray.connect(f"127.0.0.1:{port}", timeout_s=10)


def test_token_is_looked_up_in_rays_order(serve, monkeypatch, tmp_path,
                                          caplog):  # pylint: disable=redefined-outer-name
  """RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token; the
  error names the one that was sent (all wrong here)."""
  port = serve(FakeRay(TOKEN))
  monkeypatch.setenv("RAY_AUTH_MODE", "token")
  home_token = tmp_path / "home" / ".ray" / "auth_token"
  home_token.parent.mkdir(parents=True)
  home_token.write_text("wrong-home\n")
  home_token.chmod(0o644)
  path_token = tmp_path / "token"
  path_token.write_text("wrong-path")
  path_token.chmod(0o600)
  sources = [str(home_token), "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"]
  settings = [{}, {"RAY_AUTH_TOKEN_PATH": str(path_token)},
              {"RAY_AUTH_TOKEN": "wrong-env"}]
  for source, setting in zip(sources, settings):
    for name, value in setting.items():
      monkeypatch.setenv(name, value)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dcasgd_optax.ray"):
      with pytest.raises(ray.exceptions.AuthenticationError,
                         match=f"rejected the token from {source}"):
        dray.connect(f"127.0.0.1:{port}", timeout_s=10)
    # Only the home file is readable by others (mode 644): that is reported.
    assert (f"chmod 600 {home_token}" in caplog.text) is (not setting), source


def test_ray_client_address_probes_the_ray_client_server(serve):  # pylint: disable=redefined-outer-name
  port = serve(FakeRay(TOKEN, method=RAY_CLIENT_METHOD))
  with pytest.raises(ray.exceptions.AuthenticationError,
                     match="requires token authentication"):
    dray.connect(f"ray://127.0.0.1:{port}", timeout_s=10)


# ---------------------------------------------------- nothing, or not Ray


def test_nothing_listening_is_a_connection_error_after_timeout_s():
  with pytest.raises(
      ConnectionError,
      match=r"No Ray cluster answered .* within 0.3 s.*RAY_USE_TLS",
  ):
    dray.connect("127.0.0.1:1", timeout_s=0.3)


def test_a_grpc_server_that_is_not_ray_is_a_connection_error(serve):  # pylint: disable=redefined-outer-name
  port = serve(FakeRay(method="/other.Service/Method"))
  with pytest.raises(ConnectionError, match="is not a Ray cluster"):
    dray.connect(f"127.0.0.1:{port}", timeout_s=10)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(allow_insecure_cluster="yes"),
            TypeError,
            "allow_insecure_cluster",
        ),
        (dict(timeout_s=0), ValueError, "timeout_s"),
        (dict(address=6379), TypeError, "`address` must be a str or None"),
    ],
)
def test_bad_arguments_fail_before_anything_is_contacted(kwargs, error, match):
  kwargs.setdefault("address", "127.0.0.1:1")
  with pytest.raises(error, match=match):
    dray.connect(**kwargs)


# ---------------------------------------------------------------------- TLS


def self_signed(tmp_path):
  """A key and a self-signed certificate (its own CA) for this host's
  address, which is where Ray (and so connect) sends 127.0.0.1."""
  host = ipaddress.ip_address(ray.util.get_node_ip_address())
  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
  now = datetime.datetime.now(datetime.UTC)
  cert = (
      x509.CertificateBuilder().subject_name(name).issuer_name(name)
      .public_key(key.public_key()).serial_number(x509.random_serial_number())
      .not_valid_before(now - datetime.timedelta(minutes=1))
      .not_valid_after(now + datetime.timedelta(days=1))
      .add_extension(x509.SubjectAlternativeName([x509.IPAddress(host)]),
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
def test_tls_cluster_is_probed_over_rays_tls_settings(serve, monkeypatch,
                                                      tmp_path):  # pylint: disable=redefined-outer-name
  cert_pem, key_pem = self_signed(tmp_path)
  port = serve(FakeRay(TOKEN), grpc.ssl_server_credentials(
      [(key_pem, cert_pem)], root_certificates=cert_pem,
      require_client_auth=True))
  address = f"127.0.0.1:{port}"
  # A plain client gets no answer from a TLS server: the error says TLS.
  with pytest.raises(ConnectionError, match="set RAY_USE_TLS=1"):
    dray.connect(address, timeout_s=0.5)
  monkeypatch.setenv("RAY_USE_TLS", "1")
  with pytest.raises(ValueError, match="RAY_TLS_SERVER_CERT"):
    dray.connect(address, timeout_s=10)
  monkeypatch.setenv("RAY_TLS_SERVER_CERT", str(tmp_path / "cert.pem"))
  monkeypatch.setenv("RAY_TLS_SERVER_KEY", str(tmp_path / "key.pem"))
  monkeypatch.setenv("RAY_TLS_CA_CERT", str(tmp_path / "cert.pem"))
  # Over TLS the server answers, and asks for the token as Ray's would.
  with pytest.raises(ray.exceptions.AuthenticationError,
                     match="requires token authentication"):
    dray.connect(address, timeout_s=10)
