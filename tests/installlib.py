"""Fresh virtual environments for install tests, offline.

A test builds wheels of our own distributions with this interpreter's setuptools and installs them with
pip for real (``--no-index``); the third-party packages they need are the ones this interpreter
already has, linked into a folder that a .pth file puts on the new venv's path. pip sees them as
installed, resolves our requirements against them, and downloads nothing.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

from packaging.requirements import Requirement

OURS = ("lorafleet", "lorafleet_server", "lorafleet_adapters", "lorafleet_training", "lorafleet_proto")
PIP_OWN = ("pip", "__pycache__")


def run(cmd: list[str | Path], *, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300, check=False)
    if check:
        assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def link_site_packages(dest: Path, *, keep: tuple[str, ...] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """Symlink entries of this interpreter's site-packages into ``dest``: those whose normalised name
    starts with one of ``keep`` (all when None), never ours or pip's own, nor those starting with ``drop``."""
    site = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower().replace("-", "_")
        if name.endswith(".pth") or name.startswith(("__editable__", *OURS, *PIP_OWN, *drop)):
            continue
        if keep is None or name.startswith(keep):
            (dest / entry.name).symlink_to(entry)
    return dest


def requirements_of(project: Path, *extras: str) -> tuple[str, ...]:
    """What installing ``project`` (a folder with a pyproject.toml) with ``extras`` asks pip for."""
    spec = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    optional = spec.get("optional-dependencies", {})
    return (*spec.get("dependencies", ()), *(r for extra in extras for r in optional[extra]))


def link_requirements(
    dest: Path, requirements: tuple[str, ...], *, skip: frozenset[str] = frozenset()
) -> tuple[Path, frozenset[str]]:
    """Symlink into ``dest`` the installed distributions ``requirements`` name, with what they need in
    turn (their declared requirements, with the extras asked for): what pip would install for them, so
    a package our code uses that no requirement brings is missing, as from a real install. Ours are
    neither linked nor followed (pass their requirements: ``requirements_of``), nor is any distribution
    in ``skip`` (linked already). Returns ``dest`` and the distributions linked or skipped."""
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    todo = [Requirement(r) for r in requirements]
    seen = set(skip)
    entries: set[str] = set()
    while todo:
        req = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen or name.replace("-", "_").startswith(OURS):
            continue
        seen.add(name)
        dist = importlib.metadata.distribution(req.name)
        for needed in dist.requires or ():
            sub = Requirement(needed)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                todo.append(sub)
        for file in dist.files or ():
            path = Path(str(dist.locate_file(file))).resolve()
            if path.is_relative_to(site):  # not the scripts in bin/ (outside site-packages)
                entries.add(path.relative_to(site).parts[0])
    dest.mkdir()
    for entry in sorted(entries):
        if entry != "__pycache__" and not entry.endswith(".pth") and (site / entry).exists():
            (dest / entry).symlink_to(site / entry)
    return dest, frozenset(seen)


def fresh_venv(path: Path) -> tuple[Path, Path]:
    """A new venv at ``path``: (its python, its site-packages). Its own old setuptools goes, so the
    linked-in one (torch needs a recent one) is what pip sees."""
    venv.create(path, with_pip=True, system_site_packages=False)
    python = path / "bin" / "python"
    run([python, "-m", "pip", "uninstall", "--quiet", "--yes", "setuptools"], cwd=path)
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path).stdout
    return python, Path(site.strip())


def add_to_path(site_packages: Path, folder: Path) -> None:
    """Put ``folder`` on the venv's import path (and so in pip's view of what is installed)."""
    (site_packages / f"_{folder.name}.pth").write_text(f"{folder}\n")


# What a project copy for a build leaves out: caches, venvs, model data, the other projects' outputs.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv*", "data", ".tools", "node_modules", "build", "dist", "*.egg-info", "__pycache__", "*_cache"
)


def build_wheels(dest: Path, *projects: Path) -> Path:
    """Wheels of our projects in ``dest``, each built from a copy of its folder (setuptools builds in
    the tree it is given; the repository stays clean) with this interpreter's setuptools, offline."""
    cmd: list[str | Path] = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    copies = []
    for i, project in enumerate(projects):
        copy = dest.parent / f"src-{i}-{project.name}"
        shutil.copytree(project, copy, ignore=_NOT_SOURCES)
        copies.append(copy)
    run([*cmd, "--wheel-dir", dest, *copies], cwd=dest.parent)
    return dest


def pip_install(python: Path, wheels: Path, *requirements: str) -> None:
    """Install from ``wheels`` only: what is not there must already be on the venv's path."""
    run([python, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", wheels, *requirements], cwd=wheels)
