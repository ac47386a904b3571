"""Proto tooling and packaging: generated code is current, buf lint passes, the client installs alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

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
    ignore = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    source, proto_source = tmp_path / "src", tmp_path / "proto-src"
    shutil.copytree(CLIENT_ROOT, source, ignore=ignore)
    shutil.copytree(PROTO_ROOT, proto_source, ignore=ignore)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    python = env_dir / "bin" / "python"
    _run([python, "-m", "pip", "install", "--quiet", proto_source, source])

    check = (
        "import importlib.util, pathlib, sys\n"
        "import lorafleet, lorafleet.client, lorafleet.cli, lorafleet.aio, lorafleet_proto.v1\n"
        "assert 'torch' not in sys.modules\n"
        "assert importlib.util.find_spec('torch') is None\n"
        "root = pathlib.Path(lorafleet.__file__).parent\n"
        "assert (root / 'py.typed').is_file()\n"
        "assert (pathlib.Path(lorafleet_proto.v1.__file__).parent / 'inference_pb2.pyi').is_file()\n"
        "assert 'site-packages' in str(root)\n"
        "print(lorafleet.__version__)\n"
    )
    assert _run([python, "-c", check], cwd=tmp_path).stdout.strip() == lorafleet.__version__
    assert "generate" in _run([env_dir / "bin" / "lorafleet-client", "--help"], cwd=tmp_path).stdout
    installed = _run([python, "-m", "pip", "list", "--format=freeze"]).stdout.lower()
    assert "lorafleet-client==0.1.0" in installed and "torch" not in installed
