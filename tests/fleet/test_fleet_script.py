"""scripts/fleet.py without a fleet: `down` stops only processes that `up` started from that directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fleetlib import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import fleet as fleet_script  # scripts/fleet.py, what `make fleet` runs


def test_down_ignores_pid_files_of_other_processes(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    (pids / "replica-0.pid").write_text(str(os.getpid()))  # a stale file whose pid is now someone else's
    (pids / "envoy.pid").write_text("not a pid")
    assert fleet_script.running_pids(tmp_path) == {}
    assert fleet_script.stop(tmp_path, grace=1) == []
    assert not list(pids.glob("*.pid"))  # the stale files are gone, this process lives on


def test_down_stops_its_own_process_group(tmp_path: Path) -> None:
    marker = tmp_path / "replica-0"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time, sys; time.sleep(60)", str(marker)], start_new_session=True
    )
    try:
        (tmp_path / "pids").mkdir()
        (tmp_path / "pids" / "replica-0.pid").write_text(str(proc.pid))
        # Popen returns once exec has begun; the kernel fills /proc/PID/cmdline a moment later (a loaded
        # CI machine once read it empty here), and `up` never stops a fleet that fast.
        deadline = time.monotonic() + 10
        while str(marker).encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the child's command line never appeared"
            time.sleep(0.01)
        assert fleet_script.running_pids(tmp_path) == {"replica-0": proc.pid}
        assert fleet_script.stop(tmp_path, grace=5) == ["replica-0"]
        assert proc.wait(timeout=10) != 0
    finally:
        proc.kill()
        proc.wait()


def test_envoy_template_renders_every_replica() -> None:
    text = fleet_script.render_envoy(50050, 9901, [("replica-0", 1001), ("replica-1", 1002)])
    assert "port_value: 50050" in text and "port_value: 9901" in text
    assert '"hash_key": "replica-1"' in text and '"port_value": 1002' in text
    assert "$" not in text  # every placeholder filled


def test_the_files_holding_credentials_are_written_private(tmp_path: Path) -> None:
    """fleet.json and env hold the S3 secret: fleet.json was written with the umask's mode."""
    old_umask = os.umask(0o022)
    try:
        existing = tmp_path / "fleet.json"
        existing.write_text("{}")
        existing.chmod(0o644)  # a file of an earlier run keeps no wider mode either
        for path in (existing, tmp_path / "env"):
            fleet_script.write_private(path, "AWS_SECRET_ACCESS_KEY=s3cr3t\n")
            assert path.stat().st_mode & 0o777 == 0o600
            assert path.read_text() == "AWS_SECRET_ACCESS_KEY=s3cr3t\n"
    finally:
        os.umask(old_umask)
