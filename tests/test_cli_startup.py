"""``lorafleet serve`` refuses what cannot run as configured in one line, without a traceback: a kernel
it was told to use by name (``native``) that cannot be built here, a context longer than the model's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attention-kernel", "native"], "error: native kernel: no C compiler found"),
        (["--max-seq-len", "100000"], "error: --max-seq-len 100000 exceeds the model's context of"),
    ],
)
def test_refused_in_one_line(tiny_model_dir: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env["CC"] = str(tmp_path / "no-such-compiler")  # and no library cached in this data directory
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafleet_server",
            "serve",
            "--model",
            str(tiny_model_dir),
            "--data-dir",
            str(tmp_path / "data"),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--max-seq-len",
            "256",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr and "lorafleet ready" not in done.stderr
