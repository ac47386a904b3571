"""``lorafleet serve`` as a process: secure by default at start, and no secret on its stderr."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from enginelib import KERNEL_CACHE_ENV

from lorafleet import LoraFleetClient, Sampling, UnauthenticatedError
from lorafleet_server.tenants.keys import PepperSource, create_key, format_key, revoke_key

SHORT = Sampling(max_new_tokens=2)


def serve_command(tiny_model_dir: Path, data: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lorafleet_server",
        "serve",
        "--model",
        str(tiny_model_dir),
        "--data-dir",
        str(data),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--http-port",
        "0",
        "--max-seq-len",
        "256",
        *extra,
    ]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_") or k == KERNEL_CACHE_ENV}


def start(cmd: list[str]) -> tuple[subprocess.Popen[str], str, list[str]]:
    """Start the server; return it, its port and the output lines up to the ready line."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env())
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if (match := re.search(r"lorafleet ready: gRPC on \S+:(\d+)", line)) is not None:
            return proc, match.group(1), lines
    proc.wait(30)
    raise AssertionError("no ready line:\n" + "".join(lines))


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    return rest


def test_no_keys_on_a_non_loopback_address_refuses_to_start(tiny_model_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        serve_command(tiny_model_dir, tmp_path, "--host", "0.0.0.0"),
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert done.returncode == 2, done.stderr
    assert "error: refusing to start: no API keys in" in done.stderr
    assert "host '0.0.0.0' is not a loopback address" in done.stderr and "--insecure-no-auth" in done.stderr
    assert "Traceback" not in done.stderr and "lorafleet ready" not in done.stderr


def test_insecure_no_auth_starts_open_on_a_non_loopback_address_and_says_so(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    proc, port, lines = start(serve_command(tiny_model_dir, tmp_path, "--host", "0.0.0.0", "--insecure-no-auth"))
    try:
        text = "".join(lines)
        assert "authentication OFF on 0.0.0.0 (--insecure-no-auth)" in text
        assert "plaintext, API keys OFF" in lines[-1]
        with LoraFleetClient(f"127.0.0.1:{port}", api_key="", timeout=60) as client:
            assert client.generate("Hello", sampling=SHORT).generated_tokens > 0
    finally:
        stop(proc)


def test_a_half_tls_configuration_is_a_usage_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        serve_command(tiny_model_dir, tmp_path, "--tls-cert", str(tmp_path / "c.pem")),
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert done.returncode == 2 and "tls_cert and tls_key go together" in done.stderr


def test_no_secret_reaches_the_servers_stderr(tiny_model_dir: Path, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    pepper = PepperSource(keys_file)
    now = datetime.now(UTC)
    good = create_key(keys_file, pepper, tenant="acme", role="tenant", now=now)
    revoked = create_key(keys_file, pepper, tenant="acme", role="admin", now=now)
    revoke_key(keys_file, revoked.record.key_id, now)
    wrong = format_key(good.record.key_id, "q" * 32)
    proc, port, lines = start(serve_command(tiny_model_dir, tmp_path, "--log-level", "DEBUG"))
    try:
        assert "plaintext, API keys on" in lines[-1]
        with LoraFleetClient(f"127.0.0.1:{port}", api_key=good.key, timeout=60) as client:
            assert client.generate("Hello", sampling=SHORT).generated_tokens > 0
            with pytest.raises(Exception, match="PERMISSION_DENIED"):
                client.load_adapter("acme/x")
        for key in (wrong, revoked.key, f"{good.key}x"):
            with LoraFleetClient(f"127.0.0.1:{port}", api_key=key, timeout=60) as client:
                with pytest.raises(UnauthenticatedError):
                    client.tokenize("hi")
    finally:
        output = "".join(lines) + stop(proc)
    assert good.record.key_id in output  # the request log names the key by its id
    assert "UNAUTHENTICATED" in output and "PERMISSION_DENIED" in output
    for key in (good.key, revoked.key, wrong):
        assert key.split("_")[2] not in output
    assert not re.search(r"lf_[a-z2-7]{12}_[a-z2-7]{32}", output)
