"""Packaging and layers as a user and a reviewer see them.

- A serving-only install claims no generic import names and carries no peft; ``lorafleet train`` then
  says which extra to install; with the ``train`` extra ``lorafleet train --help`` works.
- The import-linter contracts pass on the tree, and a contract fails when a forbidden import is added.

The install test uses a fresh virtual environment whose third-party packages (torch, transformers, ...)
are the ones already installed in this interpreter, linked in through a .pth file, so pip resolves the
real requirements of our distributions without downloading anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OURS = ("lorafleet", "lorafleet_server", "lorafleet_adapters", "lorafleet_training", "lorafleet_proto")
PIP_OWN = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "__pycache__")


def _run(cmd: list[str | Path], *, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300, check=False)
    if check:
        assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _link_site_packages(dest: Path, keep: tuple[str, ...] | None, drop: tuple[str, ...]) -> None:
    """Symlink entries of this interpreter's site-packages into ``dest``: those whose name starts with
    one of ``keep`` (all when None), minus ours, pip's own and those starting with one of ``drop``."""
    site = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower().replace("-", "_")
        if name.endswith(".pth") or name.startswith(("__editable__", *OURS, *PIP_OWN, *drop)):
            continue
        if keep is None or name.startswith(keep):
            (dest / entry.name).symlink_to(entry)


def _fresh_venv(tmp_path: Path) -> Path:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    _link_site_packages(tmp_path / "deps", None, drop=("peft", "tqdm"))
    purelib = _run(
        [env_dir / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path
    ).stdout.strip()
    Path(purelib, "_deps.pth").write_text(f"{tmp_path / 'deps'}\n")
    return env_dir


@pytest.mark.slow
def test_serving_install_has_no_generic_names_and_no_peft_then_the_train_extra(tmp_path: Path) -> None:
    env_dir = _fresh_venv(tmp_path)
    python, lorafleet = env_dir / "bin" / "python", env_dir / "bin" / "lorafleet"
    _run([python, "-m", "pip", "install", "--quiet", REPO / "proto" / "python", REPO], cwd=tmp_path)

    # Run from the repository root too: its source folders must not pass for packages there either.
    for cwd in (tmp_path, REPO):
        for name in ("server", "adapters", "training", "peft"):
            failed = _run([python, "-c", f"import {name}"], cwd=cwd, check=False)
            assert failed.returncode != 0 and "Error" in failed.stderr, (name, cwd, failed.stderr)
    site = _run(
        [python, "-c", "import lorafleet_server, pathlib; print(pathlib.Path(lorafleet_server.__file__))"], cwd=tmp_path
    ).stdout
    assert "site-packages" in site and str(REPO) not in site
    installed = {p.name for p in Path(site).parents[1].iterdir()}
    assert not {"server", "adapters", "training"} & installed
    assert {"lorafleet_server", "lorafleet_adapters", "lorafleet_training", "lorafleet_proto"} <= installed

    assert "serve" in _run([lorafleet, "--help"], cwd=tmp_path).stdout
    assert "--max-batch-size" in _run([lorafleet, "serve", "--help"], cwd=tmp_path).stdout
    refused = _run([lorafleet, "train", "--help"], cwd=tmp_path, check=False)
    assert refused.returncode != 0
    assert "training extra" in refused.stderr and "[train]" in refused.stderr and "peft" in refused.stderr

    # The extra: peft and tqdm become available (linked in as above), pip resolves `.[train]` with them.
    _link_site_packages(tmp_path / "train-deps", keep=("peft", "tqdm"), drop=())
    purelib = Path(site).parents[1]
    (purelib / "_train_deps.pth").write_text(f"{tmp_path / 'train-deps'}\n")
    _run([python, "-m", "pip", "install", "--quiet", f"{REPO}[train]"], cwd=tmp_path)
    helped = _run([lorafleet, "train", "--help"], cwd=tmp_path).stdout
    assert "--data" in helped and "--method" in helped
    requires = _run(
        [python, "-c", "import importlib.metadata as m; print(m.requires('lorafleet'))"], cwd=tmp_path
    ).stdout
    assert "peft" in requires and all("extra" in r for r in requires.split(",") if "peft" in r)


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).parent / "lint-imports"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            str(root / d) for d in ("server", "adapters", "training", "proto/python", "clients/python")
        ),
    }
    return subprocess.run([lint], capture_output=True, text=True, cwd=root, env=env, timeout=120, check=False)


def test_import_contracts_pass() -> None:
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout and result.stdout.count("KEPT") >= 4


@pytest.mark.parametrize(
    ("module", "bad_import", "contract"),
    [
        ("adapters/lorafleet_adapters/store.py", "import lorafleet_server.engine.engine", "adapters never imports"),
        ("server/lorafleet_server/engine/engine.py", "import lorafleet_training.trainer", "serving never imports"),
        ("server/lorafleet_server/model/runner.py", "import lorafleet_server.engine.engine", "serving layers"),
        ("server/lorafleet_server/engine/types.py", "import lorafleet_proto.v1.inference_pb2", "generated protobuf"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, module: str, bad_import: str, contract: str) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(
        REPO,
        copy,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "data", ".tools", "node_modules", "__pycache__", "*_cache", "bench", "demo"
        ),
    )
    target = copy / module
    target.write_text(target.read_text() + f"\n{bad_import}  # added by the test\n")
    result = _lint_imports(copy)
    assert result.returncode != 0, result.stdout
    broken = result.stdout[result.stdout.index("Broken contracts") :]
    assert contract in broken, result.stdout
