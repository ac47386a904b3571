"""TLS and mutual TLS on a real server (tiny model). Certificates are made here with trustme: none is
committed. Plus the start-time checks of the TLS files."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import httpx
import pytest
import trustme
from enginelib import server_config
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorafleet import LoraFleetClient, Sampling, UnauthenticatedError, UnavailableError
from lorafleet_server.app import build_service
from lorafleet_server.config import ServerConfig
from lorafleet_server.errors import StartupError
from lorafleet_server.grpc.healthcheck import check
from lorafleet_server.grpc.server import BackgroundServer, server_credentials, server_keys
from lorafleet_server.http.server import BackgroundHttpServer
from lorafleet_server.tenants.keys import PepperSource, create_key

SHORT = Sampling(max_new_tokens=2)


@dataclass(frozen=True)
class Pki:
    ca: trustme.CA
    ca_pem: bytes
    cert: Path
    key: Path
    ca_file: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = out / "server.pem", out / "server.key", out / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(ca, ca.cert_pem.bytes(), cert, key, ca_file)


def serve(tiny_model_dir: Path, data: Path, **tls: Path) -> Iterator[str]:
    config = server_config(model=tiny_model_dir, data_dir=data, port=0, metrics_port=0, max_seq_len=256, **tls)
    server = BackgroundServer(build_service(config))
    port = server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls_target(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[str]:
    data = tmp_path_factory.mktemp("tls")
    keys_file = data / "keys.json"
    create_key(keys_file, PepperSource(keys_file), tenant="acme", role="tenant", now=datetime.now(UTC))
    yield from serve(tiny_model_dir, data, tls_cert=pki.cert, tls_key=pki.key)


@pytest.fixture(scope="module")
def mtls_target(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[str]:
    data = tmp_path_factory.mktemp("mtls")
    yield from serve(tiny_model_dir, data, tls_cert=pki.cert, tls_key=pki.key, tls_client_ca=pki.ca_file)


def _key_of(target_data: Path) -> str:
    keys_file = target_data / "keys.json"
    return create_key(keys_file, PepperSource(keys_file), tenant="acme", role="tenant", now=datetime.now(UTC)).key


def test_tls_serves_a_client_that_trusts_the_ca(tls_target: str, pki: Pki) -> None:
    with LoraFleetClient(tls_target, root_certificates=pki.ca_pem, api_key="", timeout=30) as client:
        with pytest.raises(UnauthenticatedError):  # TLS is no key: the keys file has one, so keys are on
            client.generate("Hello", sampling=SHORT)
        channel = client.channel
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_tls_with_a_key_works_end_to_end(tiny_model_dir: Path, tmp_path: Path, pki: Pki) -> None:
    key = _key_of(tmp_path)
    for target in serve(tiny_model_dir, tmp_path, tls_cert=pki.cert, tls_key=pki.key):
        with LoraFleetClient(target, api_key=key, root_certificates=pki.ca_pem, timeout=60) as client:
            assert client.generate("Hello", sampling=SHORT).generated_tokens > 0
            assert "".join(client.stream("Hello", sampling=SHORT)) is not None


def test_tls_refuses_plaintext_and_untrusted_clients(tls_target: str) -> None:
    with LoraFleetClient(tls_target, api_key="", tls=False, timeout=10) as plaintext:
        with pytest.raises(UnavailableError):
            plaintext.model_info()
    with LoraFleetClient(tls_target, api_key="", tls=True, timeout=10) as system_roots:  # not our CA
        with pytest.raises(UnavailableError):
            system_roots.model_info()


def test_the_container_probe_speaks_tls_and_mtls(tls_target: str, mtls_target: str, pki: Pki) -> None:
    """The Dockerfile's HEALTHCHECK against a TLS and an mTLS server: with mTLS it presents the server's
    own certificate (the same CA issued it); before, it presented none and an mTLS server's probe
    failed for ever (found following the README)."""
    for target, client_ca in ((tls_target, None), (mtls_target, pki.ca_file)):
        port = int(target.rsplit(":", 1)[1])
        config = ServerConfig(port=port, tls_cert=pki.cert, tls_key=pki.key, tls_client_ca=client_ca)
        assert check(config) == (True, f"127.0.0.1:{port}: SERVING")


def test_mtls_needs_a_client_certificate_from_the_ca(mtls_target: str, pki: Pki) -> None:
    with LoraFleetClient(mtls_target, root_certificates=pki.ca_pem, api_key="", timeout=10) as anonymous:
        with pytest.raises(UnavailableError):
            anonymous.model_info()
    stranger_ca = trustme.CA()
    stranger = stranger_ca.issue_cert("client@example.com")
    with LoraFleetClient(
        mtls_target,
        root_certificates=pki.ca_pem,
        client_certificate=stranger.cert_chain_pems[0].bytes(),
        client_key=stranger.private_key_pem.bytes(),
        timeout=10,
    ) as untrusted:
        with pytest.raises(UnavailableError):
            untrusted.model_info()
    client_cert = pki.ca.issue_cert("client@example.com")
    with LoraFleetClient(
        mtls_target,
        root_certificates=pki.ca_pem,
        client_certificate=client_cert.cert_chain_pems[0].bytes(),
        client_key=client_cert.private_key_pem.bytes(),
        api_key="",
        timeout=60,
    ) as client:
        assert client.generate("Hello", sampling=SHORT).generated_tokens > 0  # no keys file: open on loopback


@pytest.mark.parametrize("mutual", [False, True])
def test_the_http_api_serves_the_same_tls_as_grpc(tiny_model_dir: Path, tmp_path: Path, pki: Pki, mutual: bool) -> None:
    """The OpenAI-compatible port used to serve plaintext whatever --tls-cert said: API keys in clear,
    and with --tls-client-ca a client without a certificate got the whole API there."""
    tls = {"tls_cert": pki.cert, "tls_key": pki.key, **({"tls_client_ca": pki.ca_file} if mutual else {})}
    config = server_config(model=tiny_model_dir, data_dir=tmp_path, port=0, metrics_port=0, max_seq_len=256, **tls)
    service = build_service(config)
    service.engine.start()
    http = BackgroundHttpServer(service, server_keys(config))
    http.start()
    try:
        assert http.url.startswith("https://")
        plain = http.url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):  # a plaintext request gets no answer from a TLS port
            httpx.get(f"{plain}/health", timeout=10)
        ca = ssl.create_default_context(cafile=str(pki.ca_file))
        if mutual:
            with pytest.raises(httpx.HTTPError):  # no client certificate
                httpx.get(f"{http.url}/health", verify=ca, timeout=10)
            client_cert = pki.ca.issue_cert("client@example.com")
            client_cert.configure_cert(ca)
        assert httpx.get(f"{http.url}/health", verify=ca, timeout=10).json() == {"status": "SERVING"}
    finally:
        http.stop()
        service.engine.shutdown(10)


def test_client_tls_options_are_checked() -> None:
    with pytest.raises(ValueError, match="client_certificate and client_key go together"):
        LoraFleetClient("127.0.0.1:1", client_certificate=b"x")
    with pytest.raises(ValueError, match="either ready TLS credentials or certificates"):
        LoraFleetClient("127.0.0.1:1", tls=grpc.ssl_channel_credentials(), root_certificates=b"x")


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"tls_cert": Path("missing.pem")}, r"--tls-cert .*missing.pem: cannot read it: No such file"),
        ({"tls_key": Path("missing.key")}, r"--tls-key .*missing.key: cannot read it"),
        ({"tls_client_ca": Path("missing-ca.pem")}, r"--tls-client-ca .*missing-ca.pem: cannot read it"),
        ({"tls_cert": "not-pem"}, r"--tls-cert .*: not a PEM file"),
        ({"tls_key": "other-key"}, r"not a usable certificate and matching unencrypted private key"),
        ({"tls_client_ca": "bad-ca"}, r"--tls-client-ca .*: no usable CA certificate"),
    ],
)
def test_unusable_tls_files_stop_the_start(pki: Pki, tmp_path: Path, change: dict[str, object], says: str) -> None:
    other = trustme.CA().issue_cert("127.0.0.1")
    files = {
        "not-pem": tmp_path / "not.pem",
        "other-key": tmp_path / "other.key",
        "bad-ca": tmp_path / "bad-ca.pem",
    }
    files["not-pem"].write_text("hello\n")
    other.private_key_pem.write_to_path(str(files["other-key"]))
    files["bad-ca"].write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    settings: dict[str, object] = {"tls_cert": pki.cert, "tls_key": pki.key, "tls_client_ca": pki.ca_file}
    for name, value in change.items():
        settings[name] = files[value] if isinstance(value, str) else tmp_path / value  # type: ignore[operator]
    with pytest.raises(StartupError, match=says):
        server_credentials(ServerConfig(**settings))  # type: ignore[arg-type]
    assert server_credentials(ServerConfig(tls_cert=pki.cert, tls_key=pki.key, tls_client_ca=pki.ca_file))
    assert server_credentials(ServerConfig()) is None
