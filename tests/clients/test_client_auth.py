"""The client's API key (argument or $LORAFLEET_API_KEY, sent as a Bearer header) and TLS options."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from lorafleet import AsyncLoraFleetClient, LoraFleetClient
from lorafleet._channel import channel_credentials, resolve_api_key
from lorafleet.cli import main

if TYPE_CHECKING:
    from conftest import FakeServer


def test_the_key_comes_from_the_argument_else_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_api_key(None) is None
    monkeypatch.setenv("LORAFLEET_API_KEY", "lf_from_env")
    assert resolve_api_key(None) == "lf_from_env"
    assert resolve_api_key("lf_given") == "lf_given"
    assert resolve_api_key("") is None  # "" sends none, whatever the environment says
    monkeypatch.setenv("LORAFLEET_API_KEY", "")
    assert resolve_api_key(None) is None


def test_sync_and_async_clients_send_the_environments_key_on_every_call(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFLEET_API_KEY", "lf_env_key")
    with LoraFleetClient(fake_server.target, timeout=10) as client:
        client.generate("hi")
        assert fake_server.recorder.metadata["authorization"] == "Bearer lf_env_key"
        assert "".join(client.stream("hi")) == "Hello, wörld"
        assert fake_server.recorder.metadata["authorization"] == "Bearer lf_env_key"
        client.list_adapters()
        assert fake_server.recorder.metadata["authorization"] == "Bearer lf_env_key"
    with LoraFleetClient(fake_server.target, api_key="", timeout=10) as client:
        client.generate("hi")
        assert "authorization" not in fake_server.recorder.metadata

    async def run() -> None:
        async with AsyncLoraFleetClient(fake_server.target, timeout=10) as client:
            await client.tokenize("ab")
            assert fake_server.recorder.metadata["authorization"] == "Bearer lf_env_key"
            assert [c async for c in client.stream("hi")] == ["Hel", "lo, ", "wörld"]
            assert fake_server.recorder.metadata["authorization"] == "Bearer lf_env_key"

    asyncio.run(run())


def test_tls_options() -> None:
    assert channel_credentials(None) is None and channel_credentials(False) is None
    assert channel_credentials(True) is not None
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    assert channel_credentials(False, root_certificates=pem) is not None  # a certificate implies TLS
    with pytest.raises(ValueError, match="root_certificates is not PEM"):  # a path, or garbage: say so now
        channel_credentials(True, root_certificates=b"/etc/ssl/ca.pem")
    ready = grpc.ssl_channel_credentials()
    assert channel_credentials(ready) is ready
    with pytest.raises(ValueError, match="client_certificate and client_key go together"):
        channel_credentials(True, client_key=b"key")
    with pytest.raises(ValueError, match="not both"):
        channel_credentials(ready, client_certificate=b"c", client_key=b"k")


def test_cli_api_key_from_the_environment(fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_API_KEY", "lf_env_key")
    assert main(["tokenize", "--target", fake_server.target, "ab"]) == 0
    assert fake_server.recorder.metadata["authorization"] == "Bearer lf_env_key"
    assert main(["tokenize", "--target", fake_server.target, "--api-key", "lf_flag", "ab"]) == 0
    assert fake_server.recorder.metadata["authorization"] == "Bearer lf_flag"


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--tls-cert", "client.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-ca", "missing-ca.pem"], "--tls-ca missing-ca.pem: No such file"),
    ],
)
def test_cli_tls_flag_errors_are_usage_errors(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["info", "--target", "127.0.0.1:1", *flags]) == 2
    assert says in capsys.readouterr().err


def test_cli_help_lists_the_connection_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--api-key", "--tls", "--tls-ca", "--tls-cert", "--tls-key", "LORAFLEET_API_KEY"):
        assert flag in out
