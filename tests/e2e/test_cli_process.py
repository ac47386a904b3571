"""The `lorafleet` command as a user runs it: import an adapter, serve, call, stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

LORAFLEET = [sys.executable, "-m", "lorafleet_server"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LORAFLEET, *args], capture_output=True, text=True, timeout=300, check=False)


def test_import_serve_generate_and_graceful_stop(
    tmp_path: Path, default_model_dir: Path, real_adapters: dict[str, Path]
) -> None:
    common = ["--data-dir", str(tmp_path), "--model", str(default_model_dir)]
    imported = _run("adapters", "import", str(real_adapters["support"]), "acme/cli", *common)
    assert imported.returncode == 0, imported.stderr
    assert "published acme/cli@1" in imported.stdout
    listed = _run("adapters", "list", *common)
    assert "acme/cli\tlatest=1\tversions=1" in listed.stdout
    refused = _run("adapters", "import", str(tmp_path / "missing"), "acme/x", *common)
    assert refused.returncode != 0 and "error" in refused.stderr.lower()

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            *LORAFLEET,
            "serve",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--max-seq-len",
            "512",
            *common,
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        port = None
        frozen = 0
        deadline = time.monotonic() + 120
        assert proc.stderr is not None
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}")
            gc_line = re.search(r"garbage collector: (\d+) startup objects frozen", line)
            if gc_line:
                frozen = int(gc_line.group(1))
            match = re.search(r"lorafleet ready: gRPC on 127\.0\.0\.1:(\d+)", line)
            if match:
                port = int(match.group(1))
        assert port, "the server never logged that it is ready"
        assert frozen > 100_000  # the model's and libraries' objects, out of full collections' way
        out = subprocess.run(
            [
                *LORAFLEET,
                "generate",
                "--target",
                f"127.0.0.1:{port}",
                "--chat",
                "--adapter",
                "acme/cli",
                "--max-new-tokens",
                "8",
                "Hello!",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip()
        assert "acme/cli@1" in out.stderr
        bad = subprocess.run(
            [*LORAFLEET, "generate", "--target", f"127.0.0.1:{port}", "--adapter", "../x", "Hello!"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a hung server must not outlive the test, holding its port
            proc.kill()
            proc.wait()
            raise
    assert code == 0, "the server did not stop cleanly on SIGTERM"
