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
    text = fleet_script.render_envoy(
        50050, 9901, [("replica-0", 1001), ("replica-1", 1002)], 8080, [("replica-0", 2001), ("replica-1", 2002)]
    )
    assert "port_value: 50050" in text and "port_value: 9901" in text and "port_value: 8080" in text
    assert '"hash_key": "replica-1"' in text and '"port_value": 1002' in text and '"port_value": 2002' in text
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


def test_the_env_file_survives_a_path_with_a_space(tmp_path: Path) -> None:
    env = {"LORAFLEET_ADAPTER_STORE": str(tmp_path / "sp ace" / "store"), "AWS_SECRET_ACCESS_KEY": "a'b$c"}
    path = tmp_path / "env"
    path.write_text(fleet_script.env_text(env))
    out = subprocess.run(
        ["bash", "-c", f'. "{path}" && printf "%s\\n%s" "$LORAFLEET_ADAPTER_STORE" "$AWS_SECRET_ACCESS_KEY"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split("\n") == [env["LORAFLEET_ADAPTER_STORE"], env["AWS_SECRET_ACCESS_KEY"]]


# On SIGTERM: the "replica" drains for a second before it exits, the "envoy" notes whether the replica had
# finished when its own SIGTERM came.
_REPLICA = """
import pathlib, signal, sys, time
def drain(*_):
    time.sleep(1.0)
    pathlib.Path(sys.argv[1] + ".drained").write_text("done")
    sys.exit(0)
signal.signal(signal.SIGTERM, drain)
pathlib.Path(sys.argv[1] + ".ready").write_text("")
time.sleep(60)
"""
_ENVOY = """
import pathlib, signal, sys, time
def stop(*_):
    pathlib.Path(sys.argv[1] + ".saw").write_text(str(pathlib.Path(sys.argv[2] + ".drained").exists()))
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
pathlib.Path(sys.argv[1] + ".ready").write_text("")
time.sleep(60)
"""


def test_down_stops_envoy_only_after_the_replicas_drained(tmp_path: Path) -> None:
    """Every group used to get its SIGTERM at once: Envoy went while the replicas drained behind it."""
    replica, envoy = tmp_path / "replica-0", tmp_path / "envoy"
    procs = {
        "replica-0": subprocess.Popen([sys.executable, "-c", _REPLICA, str(replica)], start_new_session=True),
        "envoy": subprocess.Popen([sys.executable, "-c", _ENVOY, str(envoy), str(replica)], start_new_session=True),
    }
    try:
        (tmp_path / "pids").mkdir()
        for name, proc in procs.items():
            (tmp_path / "pids" / f"{name}.pid").write_text(str(proc.pid))
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"{name}.ready").exists() for name in procs):  # handlers installed
            assert time.monotonic() < deadline, "the children never became ready"
            time.sleep(0.01)
        assert fleet_script.stop(tmp_path, grace=10) == ["replica-0", "envoy"]
        assert (tmp_path / "envoy.saw").read_text() == "True"
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_down_leaves_no_seaweedfs_socket_behind(tmp_path: Path) -> None:
    from seaweedlib import SOCKET_DIR

    launcher = fleet_script.Launcher(tmp_path)
    _, pid, endpoint = fleet_script._start_s3(launcher, tmp_path)
    port = int(endpoint.rsplit(":", 1)[1])
    try:
        assert list(SOCKET_DIR.glob(f"seaweedfs-*-{port}.sock"))  # SeaweedFS made its sockets
        assert fleet_script.stop(tmp_path, grace=10) == ["s3"]
        assert not list(SOCKET_DIR.glob(f"seaweedfs-*-{port}.sock"))  # they went with it
    finally:
        if fleet_script._pid_alive(pid):
            os.killpg(pid, 9)
