"""oneDNN's per-shape caches are bounded (lorafleet_server/onednn.py): importing the package sets the
bounds before torch makes a primitive, an operator's own values win, and where torch's bf16 matmul
does JIT a kernel per shape (the AMX/AVX-512 CPUs), RSS then stops growing with new shapes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lorafleet_server.onednn import ONEDNN_CACHES, bound_onednn_caches, onednn_cache_summary

# Runs bf16 matmuls of 399 distinct shapes (rows 1, 4, ..., 397 at three widths) and prints the RSS they added, MiB.
_SHAPES = """
import os, sys
if sys.argv[1] == "package":
    import lorafleet_server  # noqa: F401
import torch
torch.set_num_threads(1)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
w = torch.randn(256, 576, dtype=torch.bfloat16)
torch.randn(1, 576, dtype=torch.bfloat16) @ w.T  # torch's own first-use allocations, before the baseline
before = rss()
for rows in range(1, 400, 3):
    for width in (64, 128, 256):
        torch.randn(rows, 576, dtype=torch.bfloat16) @ w[:width].T
print(rss() - before)
"""


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHES}


def _run(code: str, *args: str, env: dict[str, str]) -> str:
    run = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=180, check=True
    )
    return run.stdout.strip()


def test_importing_the_package_sets_the_bounds() -> None:
    shown = _run(
        "import lorafleet_server, os; print(*(os.environ[name] for name in "
        "('ONEDNN_PRIMITIVE_CACHE_CAPACITY', 'LRU_CACHE_CAPACITY')))",
        env=_clean_env(),
    )
    assert shown.split() == [ONEDNN_CACHES["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], ONEDNN_CACHES["LRU_CACHE_CAPACITY"]]


def test_an_operators_values_are_kept() -> None:
    environ = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8"}
    bound_onednn_caches(environ)
    assert environ == {
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8",
        "LRU_CACHE_CAPACITY": ONEDNN_CACHES["LRU_CACHE_CAPACITY"],
    }
    assert (
        onednn_cache_summary(environ)
        == f"ONEDNN_PRIMITIVE_CACHE_CAPACITY=8, LRU_CACHE_CAPACITY={ONEDNN_CACHES['LRU_CACHE_CAPACITY']}"
    )
    assert onednn_cache_summary({}) == "ONEDNN_PRIMITIVE_CACHE_CAPACITY=(unset), LRU_CACHE_CAPACITY=(unset)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_new_shapes_stop_growing_memory_once_the_caches_are_full() -> None:
    # The control keeps oneDNN's defaults (1,024 entries each), as a process without the package would.
    unbounded = float(
        _run(
            _SHAPES,
            "control",
            env={**_clean_env(), "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"},
        )
    )
    if unbounded < 100:
        pytest.skip(f"399 new bf16 matmul shapes added only {unbounded:.0f} MiB here: no per-shape JIT cache to bound")
    bounded = float(_run(_SHAPES, "package", env=_clean_env()))
    assert bounded < unbounded / 2, (bounded, unbounded)


@pytest.mark.parametrize(("given", "used"), [("0", "1"), ("-3", "1"), ("lots", "64"), ("256", "256")])
def test_a_capacity_torch_would_crash_on_is_replaced_with_a_warning(given: str, used: str) -> None:
    environ = {"LRU_CACHE_CAPACITY": given}
    if given == used:
        bound_onednn_caches(environ)
    else:
        with pytest.warns(UserWarning, match="crashes torch's oneDNN matmuls"):
            bound_onednn_caches(environ)
    assert environ["LRU_CACHE_CAPACITY"] == used


def test_a_process_told_zero_still_runs_bf16_matmuls() -> None:
    """``LRU_CACHE_CAPACITY=0`` in the environment: the package's import replaces it before torch reads it."""
    code = "import lorafleet_server, torch\nw = torch.randn(256, 576, dtype=torch.bfloat16)\n"
    code += "for n in (1, 7, 33):\n    torch.randn(n, 576, dtype=torch.bfloat16) @ w.T\nprint('ran')"
    assert _run(code, env={**_clean_env(), "LRU_CACHE_CAPACITY": "0"}) == "ran"
