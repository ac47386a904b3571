"""The OpenMP wait policy (lorafleet_server/openmp.py) reaches libgomp: importing the package sets it
before torch loads, an operator's own values win, and a late call changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

from lorafleet_server.openmp import OPENMP_WAIT, openmp_wait_summary, set_openmp_wait_policy


def _libgomp_settings(env: dict[str, str]) -> str:
    """What libgomp itself reports (OMP_DISPLAY_ENV) after ``import lorafleet_server, torch``."""
    run = subprocess.run(
        [sys.executable, "-c", "import lorafleet_server, torch; torch.ones(4).sum()"],
        env={**env, "OMP_DISPLAY_ENV": "VERBOSE"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return run.stderr + run.stdout


def test_importing_the_package_sets_the_policy_libgomp_then_reads() -> None:
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_WAIT}
    shown = _libgomp_settings(env)
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in shown
    assert "GOMP_SPINCOUNT = '20000'" in shown


def test_an_operators_values_are_kept() -> None:
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_WAIT}
    shown = _libgomp_settings({**env, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "5"})
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in shown
    assert "GOMP_SPINCOUNT = '5'" in shown


def test_after_torch_is_imported_nothing_is_set() -> None:
    import torch  # noqa: F401  # this process has loaded libgomp already

    environ: dict[str, str] = {}
    assert not set_openmp_wait_policy(environ)
    assert environ == {}
    assert openmp_wait_summary(environ) == "OMP_WAIT_POLICY=(unset), GOMP_SPINCOUNT=(unset)"
