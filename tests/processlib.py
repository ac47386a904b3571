"""Running a Python snippet in a child process of its own, for settings a process reads once at start
(OpenMP's environment, read when libgomp loads)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_python(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """``script`` run by this interpreter with ``args`` and this environment plus ``env``; its stdout.
    Fails the test (AssertionError with the child's stderr) when the child exits non-zero."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
