"""Proto tooling and packaging: generated code is current, buf lint passes, the client installs alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from installlib import add_to_path, build_wheels, fresh_venv, link_site_packages, pip_install, run

import lorafleet

REPO = Path(__file__).resolve().parents[2]
CLIENT_ROOT = REPO / "clients" / "python"
PROTO_ROOT = REPO / "proto" / "python"


def _run(
    cmd: list[str | Path], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300, check=False)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_generated_code_is_current() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    _run(["bash", REPO / "scripts" / "gen_proto.sh", "--check"], env=env)


def test_gen_proto_check_detects_stale_code(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "proto", copy / "proto")
    shutil.copytree(REPO / "scripts", copy / "scripts")
    stale = copy / "proto" / "python" / "lorafleet_proto" / "v1" / "inference_pb2.py"
    stale.write_text(stale.read_text() + "# edited\n")
    env = {**os.environ, "PYTHON": sys.executable}
    script = copy / "scripts" / "gen_proto.sh"
    result = subprocess.run(["bash", script, "--check"], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 1 and "stale" in result.stderr
    _run(["bash", script], env=env)
    _run(["bash", script, "--check"], env=env)


@pytest.mark.slow
def test_buf_lint_passes() -> None:
    if shutil.which("npm") is None and not (REPO / ".tools" / "buf").exists():
        pytest.skip("npm is not available to install buf")
    _run(["bash", REPO / "scripts" / "buf_lint.sh"])


def test_version_matches_pyproject() -> None:
    project = tomllib.loads((CLIENT_ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == lorafleet.__version__
    assert not any(dep.lower().startswith("torch") for dep in project["dependencies"])


@pytest.mark.slow
def test_client_installs_alone_without_torch(tmp_path: Path) -> None:
    """pip installs the client and lorafleet-proto from their folders into a fresh venv that has only
    grpcio and protobuf (linked from this interpreter: offline), and nothing pulls torch in."""
    python, site_packages = fresh_venv(tmp_path / "venv")
    add_to_path(site_packages, link_site_packages(tmp_path / "deps", keep=("grpc", "google", "protobuf", "typing_")))
    pip_install(python, build_wheels(tmp_path / "wheels", PROTO_ROOT, CLIENT_ROOT), "lorafleet-client")

    check = (
        "import importlib.util, pathlib, sys\n"
        "import lorafleet, lorafleet.client, lorafleet.cli, lorafleet.aio, lorafleet_proto.v1\n"
        "assert 'torch' not in sys.modules\n"
        "assert importlib.util.find_spec('torch') is None\n"
        "root = pathlib.Path(lorafleet.__file__).parent\n"
        "assert (root / 'py.typed').is_file()\n"
        "assert (pathlib.Path(lorafleet_proto.v1.__file__).parent / 'inference_pb2.pyi').is_file()\n"
        "print(root)\n"
        "print(lorafleet.__version__)\n"
    )
    root, version = run([python, "-c", check], cwd=tmp_path).stdout.split()
    assert Path(root).is_relative_to(site_packages) and version == lorafleet.__version__
    assert "generate" in run([python.parent / "lorafleet-client", "--help"], cwd=tmp_path).stdout
    installed = run([python, "-m", "pip", "list", "--format=freeze"], cwd=tmp_path).stdout.lower()
    assert "lorafleet-client==0.1.0" in installed and "lorafleet-proto==0.1.0" in installed
    assert "torch" not in installed
