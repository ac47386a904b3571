"""``lorafleet serve`` as a process serves the HTTP API beside gRPC: the ready line names it, one key
works on both, SIGTERM drains it (health 503) and stops it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import pytest
from enginelib import KERNEL_CACHE_ENV

from lorafleet import LoraFleetClient, Sampling
from lorafleet_server.tenants.keys import PepperSource, create_key

pytestmark = pytest.mark.slow  # a server process: ~25 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_starts_http_next_to_grpc_and_drains_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    key = create_key(
        tmp_path / "keys.json",
        PepperSource(tmp_path / "keys.json"),
        tenant="acme",
        role="tenant",
        now=datetime.now(UTC),
    ).key
    http_port = free_port()
    cmd = [
        *(sys.executable, "-m", "lorafleet_server", "serve", "--model", str(tiny_model_dir)),
        *("--data-dir", str(tmp_path), "--port", "0", "--metrics-port", "0", "--http-port", str(http_port)),
        *("--max-seq-len", "256", "--drain-seconds", "3", "--keys-poll-seconds", "0.2"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_") or k == KERNEL_CACHE_ENV}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    try:
        ready = ""
        for line in proc.stdout:
            if "lorafleet ready" in line:
                ready = line
                break
        match = re.search(r"gRPC on 127\.0\.0\.1:(\d+), OpenAI-compatible HTTP on http://127\.0\.0\.1:(\d+)", ready)
        assert match is not None and int(match.group(2)) == http_port, ready
        url = f"http://127.0.0.1:{http_port}"
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
        model = sdk.models.list().data[0].id
        over_http = sdk.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
        with LoraFleetClient(f"127.0.0.1:{match.group(1)}", api_key=key) as grpc_client:
            over_grpc = grpc_client.generate("Hello", sampling=Sampling(max_new_tokens=4, temperature=0))
        assert over_http.choices[0].text == over_grpc.text  # one engine, one key, same answer

        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        while httpx.get(f"{url}/health", timeout=5).status_code != 503:  # draining: still answering
            assert time.monotonic() < deadline, "health never turned 503 during the drain"
            time.sleep(0.05)
        assert sdk.completions.create(model=model, prompt="Hi", max_tokens=1).usage is not None  # still served
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, rest
        try:
            httpx.get(f"{url}/health", timeout=2)
            raise AssertionError("the HTTP port still answers after the server stopped")
        except httpx.ConnectError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
