"""The native helper pool: where its helpers run (pinned to cores of their own, or not under a quota)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lorafleet_server.model.native import cgroup_cpu_limit, pin_helpers

HELPER_AFFINITY = textwrap.dedent(
    """
    import ctypes, os, sys, time
    from pathlib import Path
    from lorafleet_server.model import native
    native.cgroup_cpu_limit = lambda root=None: float(sys.argv[2]) if sys.argv[2] != "none" else None
    pool = native.load_native_pool(Path(sys.argv[1]), 2)
    run = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int)(
        pool.address.value
    )
    unit = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(lambda ctx, u: None)
    assert run(ctypes.cast(unit, ctypes.c_void_p), None, 64, 2) == 0 and pool.helpers == 1
    time.sleep(0.3)  # the helper pins itself when it first runs, which a call of trivial units may not wait for
    me = os.getpid()
    sets = set()
    for tid in os.listdir(f"/proc/{me}/task"):
        if int(tid) != me:
            status = Path(f"/proc/{me}/task/{tid}/status").read_text()
            sets.add(next(l.split()[1] for l in status.splitlines() if l.startswith("Cpus_allowed_list")))
    print(sorted(sets))
    """
)


def test_cgroup_cpu_limit_reads_v2_and_v1(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert cgroup_cpu_limit(tmp_path / "absent") is None


def test_helpers_are_pinned_only_where_the_quota_covers_the_cpu_set(tmp_path: Path) -> None:
    """Pods without exclusive cores see the whole node: each replica pinned its helpers to the same
    last cores of it. Under a quota smaller than the set, the scheduler places them."""
    assert pin_helpers(4, None) and pin_helpers(4, 4.0) and not pin_helpers(4, 2.0)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one CPU: no helper runs")

    def helper_sets(limit: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", HELPER_AFFINITY, str(tmp_path), limit], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()

    assert str(cpus[-1]) in helper_sets("none").split("'")  # pinned: the last CPU of the set, alone
    assert helper_sets("0.5") != helper_sets("none")  # a quota under the set: no thread pinned to one CPU
