"""Hardening benchmark: a lorafleet server under four hostile or operational scenarios.

  oversized  an "other" client sends short chats back to back while 16 clients each send a ~3.6 MB
             prompt: the other client's TTFT alone and during the flood, how long the 16 took to get
             their status (and which), the server's RSS before, during and after.
  swaps      30 versions of one adapter published one after another, each picked up by RefreshAdapters
             and used by one request: RSS after the first and after the last, versions left in device slots.
  burst      400 Generate calls at once on --max-batch-size 32 --max-waiting 64: how many were served,
             how many got RESOURCE_EXHAUSTED (96 served when admission counts free rows + waiting).
  drain      SIGTERM with 2 long streams running and 3 requests queued: a timeline of health, probes,
             the queued and the running requests, and the process's exit.
  tenants    two tenants with keys: one sends 300 (quick: 100) Generate calls whose prompts cost ~0.1 s
             of tokenizing each, with a 0.5 s deadline, and abandons them; the other's 4-token
             Generate alone and right after (one tenant must not stall another before the queue).

The server runs as a subprocess (``--server-cmd``, ``--server-env``) and is reached over gRPC and HTTP
only, so an older build can be measured for before/after comparisons; flags that build lacks are
dropped (its ``--help`` is read once) and the output says which. Each scenario starts its own server
with its own temporary data directory and adapter store. Results: a table on stdout and JSON in
bench/results/hardening-<timestamp>.json.

    .venv/bin/python -m bench.hardening --quick --scenarios burst,drain
    .venv/bin/python -m bench.hardening                       # all four, several minutes on 2 cores
    .venv/bin/python -m bench.hardening --scenarios burst \\
        --server-env PYTHONPATH=/tmp/old/server:/tmp/old/adapters:/tmp/old/training:/tmp/old/proto/python
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.serving import SHAPES, Shape, make_adapters, percentile, say
from lorafleet import AsyncLoraFleetClient, LoraFleetClient, LoraFleetError, Message, Sampling

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
SCENARIOS = ("oversized", "swaps", "burst", "drain", "tenants")
READY = re.compile(r"lorafleet ready: gRPC on (\S+):(\d+), metrics on (\S+)")
READY_TIMEOUT = 300.0  # model load on a busy 2-core machine
CALL_TIMEOUT = 600.0
TENANT = "bench"
ADAPTER_NAME = "swapped"
MAX_LORA_RANK = 64  # the server's default --max-lora-rank, used for the store's import checks
OVERSIZED_PROMPT_WORDS = 720_000  # "word " * 720_000 = 3.6 MB, under the default 4 MiB message limit
# Random printable ASCII: within the prompt bound for a 2,048-token context (81 bytes a token at most),
# ~144,000 SmolLM2 tokens, ~0.1 s of tokenizing, refused only by the exact check.
FLOOD_PROMPT_CHARS = 160_000
FLOOD_DEADLINE = 0.5
DRAIN_PROMPT = "Once upon a time, in a small village by the sea, there lived"


# ----------------------------------------------------------------------------------- the server process


def proc_status_mib(pid: int, key: str = "VmRSS") -> float | None:
    """A memory line of /proc/<pid>/status (VmRSS: resident now, VmHWM: peak) in MiB; None when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def server_flags(command: Sequence[str], env: dict[str, str]) -> frozenset[str]:
    """The ``--flags`` the server command's ``--help`` mentions."""
    out = subprocess.run([*command, "--help"], capture_output=True, text=True, env=env, timeout=180, check=False)
    if out.returncode != 0:
        raise SystemExit(f"`{shlex.join([*command, '--help'])}` failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", out.stdout))


class ServerProcess:
    """One server subprocess; its stdout and stderr go to a log file that is read for the ready line."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = log_path.open("wb")
        # Its own session: a Ctrl-C on the benchmark reaches the benchmark only, which then stops it.
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.target = ""
        self.metrics_url = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Waits for ``lorafleet ready: gRPC on HOST:PORT, metrics on URL`` in the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = READY.search(self.log_path.read_text(errors="replace"))
            if match is not None:
                host = "127.0.0.1" if match.group(1) in ("0.0.0.0", "::", "[::]") else match.group(1)
                self.target = f"{host}:{match.group(2)}"
                self.metrics_url = match.group(3)
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it was ready:\n{self.tail()}")
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready within {timeout:.0f}s:\n{self.tail()}")

    def rss_mib(self) -> float | None:
        return proc_status_mib(self.pid)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGINT (a stop without the drain wait), SIGKILL after 30 s; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@dataclass
class Launcher:
    """How each scenario starts the server under test: command, environment, model and known flags."""

    command: list[str]
    env: dict[str, str]
    model: Path
    supported: frozenset[str]
    dropped: set[str] = field(default_factory=set)

    def start(self, root: Path, flags: dict[str, str]) -> ServerProcess:
        """Starts a server on any free ports with its data and store under ``root``; waits until ready.

        Flags the build does not know are left out (and remembered in ``dropped``)."""
        wanted = {
            "--model": str(self.model),
            "--port": "0",
            "--metrics-port": "0",
            "--http-port": "0",
            "--data-dir": str(root / "data"),
            "--adapter-store": str(root / "store"),
            **flags,
        }
        argv = list(self.command)
        for flag, value in wanted.items():
            if flag in self.supported:
                argv += [flag, value]
            elif flag not in self.dropped:
                self.dropped.add(flag)
                say(f"the server has no {flag}: left out")
        (root / "store").mkdir(parents=True, exist_ok=True)
        server = ServerProcess(argv, self.env, root / "server.log")
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
        return server


class RssSampler:
    """The largest VmRSS of a process, sampled every 50 ms while the ``with`` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = proc_status_mib(self.pid)
            if rss is not None and (self.peak_mib is None or rss > self.peak_mib):
                self.peak_mib = rss
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------------- requests


@dataclass
class Call:
    """One request's outcome; times are ``time.perf_counter()`` values until ``relative_to`` shifts them."""

    kind: str
    sent: float
    ended: float = 0.0
    status: str = "OK"  # or the gRPC status name
    first_text: float | None = None  # streams: the first non-empty text chunk
    tokens: int | None = None  # generated tokens, known when the call ended OK
    chunks: int = 0  # streams: text chunks received
    detail: str = ""  # the finish reason, or the error message

    def relative_to(self, t0: float) -> dict[str, Any]:
        out = asdict(self)
        for key in ("sent", "ended", "first_text"):
            if out[key] is not None:
                out[key] = round(out[key] - t0, 4)
        return out

    @property
    def ttft(self) -> float | None:
        return None if self.first_text is None else self.first_text - self.sent


async def timed_stream(
    client: AsyncLoraFleetClient,
    kind: str,
    max_new_tokens: int,
    *,
    prompt: str | None = None,
    messages: list[Message] | None = None,
    first_text: asyncio.Event | None = None,
) -> Call:
    """One GenerateStream call, timed; ``first_text`` is set when the first text arrives."""
    call = Call(kind, time.perf_counter())
    stream = client.stream(
        prompt=prompt,
        messages=messages,
        sampling=Sampling(max_new_tokens=max_new_tokens, temperature=0.0),
        timeout=CALL_TIMEOUT,
    )
    try:
        async for chunk in stream:
            call.chunks += 1
            if chunk and call.first_text is None:
                call.first_text = time.perf_counter()
                if first_text is not None:
                    first_text.set()
        call.tokens = stream.result.generated_tokens
        call.detail = stream.result.finish_reason
    except LoraFleetError as exc:
        call.status, call.detail = exc.code.name, exc.message[:200]
    call.ended = time.perf_counter()
    return call


async def timed_generate(
    client: AsyncLoraFleetClient, kind: str, prompt: str, max_new_tokens: int, timeout: float = CALL_TIMEOUT
) -> Call:
    """One unary Generate call, timed."""
    call = Call(kind, time.perf_counter())
    try:
        done = await client.generate(
            prompt, sampling=Sampling(max_new_tokens=max_new_tokens, temperature=0.0), timeout=timeout
        )
        call.tokens, call.detail = done.generated_tokens, done.finish_reason
    except LoraFleetError as exc:
        call.status, call.detail = exc.code.name, exc.message[:200]
    call.ended = time.perf_counter()
    return call


async def connected(target: str, count: int) -> list[AsyncLoraFleetClient]:
    """``count`` async clients (a channel each), connected."""
    clients = [AsyncLoraFleetClient(target, timeout=CALL_TIMEOUT) for _ in range(count)]
    await asyncio.gather(*(c.wait_for_ready(60) for c in clients))
    return clients


async def close_all(clients: Sequence[AsyncLoraFleetClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients))


def statuses(calls: Sequence[Call]) -> dict[str, int]:
    return dict(collections.Counter(c.status for c in calls).most_common())


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MiB"


@dataclass
class Outcome:
    """What one scenario measured: rows for the table, data for the JSON, optional extra lines."""

    name: str
    rows: list[tuple[str, str]]
    data: dict[str, Any]
    timeline: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- 1. oversized


async def short_chats(target: str, stop: threading.Event, count: int | None) -> list[Call]:
    """Short chats ("Hi", 8 new tokens) back to back: ``count`` of them, or until ``stop`` is set.

    Run in its own thread and event loop (``asyncio.run``), so its timing does not depend on the loop
    that sends the oversized prompts."""
    (client,) = await connected(target, 1)
    calls: list[Call] = []
    try:
        while (count is None and not stop.is_set()) or (count is not None and len(calls) < count):
            calls.append(await timed_stream(client, "short", 8, messages=[Message("user", "Hi")]))
    finally:
        await client.close()
    return calls


async def oversized_flood(server: ServerProcess, clients: int) -> tuple[list[Call], list[Call], float, float]:
    """Fires ``clients`` oversized prompts at once while the short chats go on; returns (oversized calls,
    short calls, flood start, flood end)."""
    big = "word " * OVERSIZED_PROMPT_WORDS
    senders = await connected(server.target, clients)
    stop = threading.Event()
    try:
        other = asyncio.ensure_future(asyncio.to_thread(asyncio.run, short_chats(server.target, stop, None)))
        await asyncio.sleep(0.2)  # the other client is connected and sending
        start = time.perf_counter()
        calls = await asyncio.gather(*(timed_generate(c, "oversized", big, 8) for c in senders))
        end = time.perf_counter()
        stop.set()
        short = await other
    finally:
        stop.set()
        await close_all(senders)
    return list(calls), short, start, end


def run_oversized(launcher: Launcher, root: Path, quick: bool) -> Outcome:
    """Scenario 1: short chats' TTFT alone and while 16 (quick: 4) clients send ~3.6 MB prompts."""
    clients = 4 if quick else 16
    server = launcher.start(root, {})
    try:
        asyncio.run(short_chats(server.target, threading.Event(), 1))  # warm-up, not measured
        baseline = asyncio.run(short_chats(server.target, threading.Event(), 5))
        rss_before = server.rss_mib()
        say(f"oversized: {clients} clients x {OVERSIZED_PROMPT_WORDS * 5 / 1e6:.1f} MB prompts")
        with RssSampler(server.pid) as sampler:
            big, short, start, end = asyncio.run(oversized_flood(server, clients))
        rss_after = server.rss_mib()
        tail = server.tail(40)
    finally:
        server.stop()
    during = [c for c in short if c.sent <= end and c.ended >= start]  # overlapped the flood
    during_ttft = [c.ttft for c in during if c.ttft is not None]
    base_p50 = percentile([c.ttft for c in baseline if c.ttft is not None], 50)
    flood_p50 = percentile(during_ttft, 50)
    status_text = ", ".join(f"{k} x{v}" for k, v in statuses(big).items())
    rows = [
        ("baseline TTFT p50 (5 alone)", ms(base_p50)),
        (f"TTFT p50 / max during flood (n={len(during)})", f"{ms(flood_p50)} / {ms(max(during_ttft, default=None))}"),
        ("short chats failed during flood", str(sum(c.status != "OK" for c in during))),
        (f"all {clients} oversized answered after", ms(end - start)),
        ("oversized statuses", status_text),
        ("RSS before / peak during / after", f"{mib(rss_before)} / {mib(sampler.peak_mib)} / {mib(rss_after)}"),
    ]
    data = {
        "clients": clients,
        "prompt_bytes": OVERSIZED_PROMPT_WORDS * 5,
        "baseline_ttft_p50": base_p50,
        "flood_ttft_p50": flood_p50,
        "flood_ttft_max": max(during_ttft, default=None),
        "flood_seconds": end - start,
        "oversized_statuses": statuses(big),
        "oversized_messages": sorted({c.detail for c in big if c.status != "OK"}),
        "rss_mib": {"before": rss_before, "peak_during": sampler.peak_mib, "after": rss_after},
        "baseline": [c.relative_to(baseline[0].sent) for c in baseline],
        "oversized": [c.relative_to(start) for c in big],
        "short": [c.relative_to(start) for c in short],
        "server_log_tail": tail,
    }
    return Outcome("oversized", rows, data)


# ----------------------------------------------------------------------------------- 2. swaps


def run_swaps(launcher: Launcher, root: Path, quick: bool, seed: int) -> Outcome:
    """Scenario 2: 30 (quick: 8) versions of one adapter, each published, refreshed and used once."""
    from transformers.utils import logging as hf_logging

    from lorafleet_adapters.store import AdapterStore
    from lorafleet_server.model.loader import base_spec_from_files

    versions = 8 if quick else 30
    shape: Shape = SHAPES["default"]  # r=8 on q_proj, v_proj
    say(f"swaps: making {versions} random adapters ({shape.label})")
    hf_logging.disable_progress_bar()
    dirs = make_adapters(launcher.model, [shape], versions, root / "made", seed)[shape.key]
    spec = base_spec_from_files(launcher.model, "none", MAX_LORA_RANK)
    store = AdapterStore(root / "store")
    ref = f"{TENANT}/{ADAPTER_NAME}"
    server = launcher.start(root, {"--adapter-poll-seconds": "0", "--max-loaded-adapters": "32"})
    steps: list[dict[str, Any]] = []
    try:
        with LoraFleetClient(server.target, timeout=CALL_TIMEOUT) as client:
            client.wait_for_ready(60)
            for path in dirs:
                started = time.perf_counter()
                key = store.import_peft(path, TENANT, ADAPTER_NAME, spec)
                refresh = client.refresh_adapters()
                done = client.generate("Hello", adapter=ref, sampling=Sampling(max_new_tokens=2, temperature=0.0))
                steps.append(
                    {
                        "version": key.version,
                        "served": done.adapter,
                        "swaps": [asdict(s) for s in refresh.swaps],
                        "failures": [asdict(f) for f in refresh.failures],
                        "seconds": time.perf_counter() - started,
                        "rss_mib": server.rss_mib(),
                    }
                )
            tiers = {v.version: v.tier for v in client.get_adapter(ref).versions}
        tail = server.tail(40)
    finally:
        server.stop()
    on_device = sorted(v for v, tier in tiers.items() if tier == "device")
    served_new = sum(s["served"] == f"{ref}@{s['version']}" for s in steps)
    failures = sum(len(s["failures"]) for s in steps)
    rows = [
        ("RSS after warm-up (version 1)", mib(steps[0]["rss_mib"])),
        (f"RSS after {versions - 1} swaps (version {versions})", mib(steps[-1]["rss_mib"])),
        ("requests served by the new version", f"{served_new}/{versions}"),
        ("refresh failures", str(failures)),
        ("versions in device slots at the end", f"{len(on_device)} {on_device}"),
        ("versions in the host cache at the end", str(sum(t == "host" for t in tiers.values()))),
    ]
    data = {
        "versions": versions,
        "shape": asdict(shape),
        "rss_mib_warm": steps[0]["rss_mib"],
        "rss_mib_end": steps[-1]["rss_mib"],
        "device_versions": on_device,
        "tiers": tiers,
        "steps": steps,
        "server_log_tail": tail,
    }
    return Outcome("swaps", rows, data)


# ----------------------------------------------------------------------------------- 3. burst


async def burst(target: str, requests: int, channels: int) -> tuple[list[Call], float]:
    """``requests`` Generate calls fired at once over ``channels`` connected channels."""
    clients = await connected(target, channels)
    try:
        await timed_generate(clients[0], "warm-up", "Hello", 2)
        start = time.perf_counter()
        calls = await asyncio.gather(
            *(timed_generate(clients[i % channels], "burst", f"Hello number {i}", 8) for i in range(requests))
        )
    finally:
        await close_all(clients)
    return list(calls), start


def run_burst(launcher: Launcher, root: Path) -> Outcome:
    """Scenario 3: 400 Generate calls at once against 32 rows + 64 waiting places."""
    batch, waiting, requests = 32, 64, 400
    server = launcher.start(root, {"--max-batch-size": str(batch), "--max-waiting": str(waiting)})
    try:
        calls, start = asyncio.run(burst(server.target, requests, 16))
        tail = server.tail(40)
    finally:
        server.stop()
    ok = [c for c in calls if c.status == "OK"]
    refused = [c for c in calls if c.status == "RESOURCE_EXHAUSTED"]
    other = [c for c in calls if c.status not in ("OK", "RESOURCE_EXHAUSTED")]
    wall = max(c.ended for c in calls) - start
    rows = [
        (f"admitted (OK) of {requests}", f"{len(ok)} (expected {batch + waiting} = rows {batch} + waiting {waiting})"),
        ("RESOURCE_EXHAUSTED", str(len(refused))),
        ("other statuses", ", ".join(f"{k} x{v}" for k, v in statuses(other).items()) or "none"),
        (
            "refusal latency p50 / max",
            f"{ms(percentile([c.ended - c.sent for c in refused], 50))} / "
            f"{ms(max((c.ended - c.sent for c in refused), default=None))}",
        ),
        (
            "served latency p50 / max",
            f"{ms(percentile([c.ended - c.sent for c in ok], 50))} / "
            f"{ms(max((c.ended - c.sent for c in ok), default=None))}",
        ),
        ("wall (first sent to last answer)", f"{wall:.1f} s"),
    ]
    data = {
        "requests": requests,
        "max_batch_size": batch,
        "max_waiting": waiting,
        "expected_admitted": batch + waiting,
        "statuses": statuses(calls),
        "messages": sorted({c.detail for c in calls if c.status != "OK"}),
        "wall_seconds": wall,
        "calls": [c.relative_to(start) for c in calls],
        "server_log_tail": tail,
    }
    return Outcome("burst", rows, data)


# ----------------------------------------------------------------------------------- 4. drain


def waiting_requests(metrics_url: str) -> int | None:
    """The server's ``lorafleet_waiting_requests`` gauge, None when it cannot be read."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    match = re.search(r"^lorafleet_waiting_requests (\S+)$", text, re.MULTILINE)
    return int(float(match.group(1))) if match else None


async def wait_until(condition: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    """Polls ``condition`` (run in a thread) until it holds; False after ``timeout`` seconds."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if await asyncio.to_thread(condition):
            return True
        await asyncio.sleep(every)
    return False


async def watch_health(channel: grpc.aio.Channel, until: asyncio.Event) -> tuple[float | None, str]:
    """Checks health (service "") every 50 ms; returns when and what it first reported other than SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    while not until.is_set():
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            status = f"error {exc.code().name}"
        if status != "SERVING":
            return time.perf_counter(), status
        await asyncio.sleep(0.05)
    return None, "SERVING until the process exited"


async def probe(client: AsyncLoraFleetClient, until: asyncio.Event, limit: float = 60.0) -> list[Call]:
    """A Generate of 1 token every 100 ms until one has failed, the process exited, or ``limit`` s passed."""
    tasks: list[asyncio.Future[Call]] = []
    deadline = time.perf_counter() + limit
    while not until.is_set() and time.perf_counter() < deadline:
        if any(t.done() and t.result().status != "OK" for t in tasks):
            break
        tasks.append(asyncio.ensure_future(timed_generate(client, "probe", "Hi", 1, timeout=60)))
        await asyncio.sleep(0.1)
    return list(await asyncio.gather(*tasks))


@dataclass
class DrainRun:
    """What the drain scenario saw; times are ``time.perf_counter()`` values, ``t0`` the SIGTERM's."""

    t0: float
    queued_confirmed: bool
    health: tuple[float | None, str]
    running: list[Call]
    queued: list[Call]
    probes: list[Call]
    exit_time: float | None
    exit_code: int | None


async def drain(server: ServerProcess, tokens: int) -> DrainRun:
    """Two long streams running, three requests queued behind them, then SIGTERM; watches what follows."""
    running_client, queued_client, probe_client = await connected(server.target, 3)
    try:
        await timed_generate(running_client, "warm-up", "Hello", 2)
        firsts = [asyncio.Event(), asyncio.Event()]
        running = [
            asyncio.ensure_future(timed_stream(running_client, "running", tokens, prompt=DRAIN_PROMPT, first_text=e))
            for e in firsts
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 300)
        queued = [asyncio.ensure_future(timed_generate(queued_client, "queued", "Hello", 8)) for _ in range(3)]
        confirmed = await wait_until(lambda: waiting_requests(server.metrics_url) == 3, 10)
        exited = asyncio.Event()
        t0 = time.perf_counter()
        os.kill(server.pid, signal.SIGTERM)
        health = asyncio.ensure_future(watch_health(probe_client.channel, exited))
        probes = asyncio.ensure_future(probe(probe_client, exited))
        try:
            code: int | None = await asyncio.to_thread(server.proc.wait, 120)
        except subprocess.TimeoutExpired:
            code = None
        exit_time = time.perf_counter() if code is not None else None
        exited.set()
        return DrainRun(
            t0,
            confirmed,
            await health,
            list(await asyncio.gather(*running)),
            list(await asyncio.gather(*queued)),
            await probes,
            exit_time,
            code,
        )
    finally:
        await close_all([running_client, queued_client, probe_client])


def drain_timeline(run: DrainRun) -> list[tuple[float, str]]:
    """The events of a drain run as (seconds after SIGTERM, what happened), in order."""
    events: list[tuple[float, str]] = [(0.0, "SIGTERM sent")]
    when, status = run.health
    if when is not None:
        events.append((when - run.t0, f"health first reports {status}"))
    groups: dict[tuple[str, str], list[Call]] = collections.defaultdict(list)
    for c in run.probes:  # probes that ended the same way, one line per group
        groups[(c.status, c.detail)].append(c)
    for (status, detail), calls in groups.items():
        sent = f"{min(c.sent for c in calls) - run.t0:+.2f}..{max(c.sent for c in calls) - run.t0:+.2f}s"
        ended = min(c.ended for c in calls) - run.t0
        upto = max(c.ended for c in calls) - run.t0
        events.append((ended, f"{len(calls)} probe(s) sent {sent} ended {status} by {upto:+.2f}s: {detail}"))
    for i, c in enumerate(run.queued, 1):
        outcome = f"{c.tokens} tokens ({c.detail})" if c.status == "OK" else c.detail
        events.append((c.ended - run.t0, f"queued #{i} ended {c.status}: {outcome}"))
    for i, c in enumerate(run.running, 1):
        tokens = f"{c.tokens} tokens" if c.tokens is not None else f"{c.chunks} text chunks"
        events.append((c.ended - run.t0, f"running #{i} ended {c.status}: {tokens} ({c.detail})"))
    if run.exit_time is not None:
        events.append((run.exit_time - run.t0, f"process exited with code {run.exit_code}"))
    else:
        events.append((120.0, "process still running 120 s after SIGTERM (killed)"))
    return sorted(events, key=lambda e: e[0])


def run_drain(launcher: Launcher, root: Path) -> Outcome:
    """Scenario 4: SIGTERM with 2 streams running and 3 requests queued; a timeline from the SIGTERM."""
    tokens = 200
    flags = {"--max-batch-size": "2", "--drain-seconds": "2", "--shutdown-grace-seconds": "30"}
    server = launcher.start(root, flags)
    try:
        run = asyncio.run(drain(server, tokens))
        tail = server.tail(40)
    finally:
        server.stop()
    events = drain_timeline(run)
    timeline = [f"{t:+8.2f}s  {what}" for t, what in events]
    ok_probes = [c for c in run.probes if c.status == "OK"]
    failed = sorted((c for c in run.probes if c.status != "OK"), key=lambda c: c.ended)
    when, status = run.health
    rows = [
        ("health not SERVING after", f"{ms(None if when is None else when - run.t0)} ({status})"),
        ("probes OK / sent (every 100 ms)", f"{len(ok_probes)} / {len(run.probes)}"),
        ("first failed probe answered at", f"{ms(failed[0].ended - run.t0)} ({failed[0].status})" if failed else "-"),
        ("queued (3) statuses", ", ".join(f"{k} x{v}" for k, v in statuses(run.queued).items())),
        ("queued ended at", ", ".join(ms(c.ended - run.t0) for c in run.queued)),
        (
            "running (2) statuses, tokens",
            ", ".join(f"{c.status} {c.tokens if c.tokens is not None else '?'}" for c in run.running),
        ),
        ("running ended at", ", ".join(ms(c.ended - run.t0) for c in run.running)),
        ("process exit", f"{ms(None if run.exit_time is None else run.exit_time - run.t0)}, code {run.exit_code}"),
    ]
    if not run.queued_confirmed:
        rows.append(("note", "the metrics never showed 3 queued requests before SIGTERM"))
    data = {
        "max_new_tokens": tokens,
        "flags": flags,
        "queued_confirmed_by_metrics": run.queued_confirmed,
        "health": {"seconds": None if when is None else when - run.t0, "status": status},
        "exit": {"seconds": None if run.exit_time is None else run.exit_time - run.t0, "code": run.exit_code},
        "timeline": [{"t": t, "event": what} for t, what in events],
        "running": [c.relative_to(run.t0) for c in run.running],
        "queued": [c.relative_to(run.t0) for c in run.queued],
        "probes": [c.relative_to(run.t0) for c in run.probes],
        "server_log_tail": tail,
    }
    return Outcome("drain", rows, data, timeline)


# ----------------------------------------------------------------------------------- main


# ----------------------------------------------------------------------------------- 5. tenants


def make_keys(launcher: Launcher, root: Path, tenants: Sequence[str]) -> dict[str, str]:
    """A tenant key for each of ``tenants`` in the server's keys file (``keys create`` beside ``serve``)."""
    if launcher.command[-1] != "serve":
        raise RuntimeError("the tenants scenario needs a --server-cmd ending in `serve` (it runs `keys create`)")
    keys = {}
    for tenant in tenants:
        argv = [*launcher.command[:-1], "keys", "create", "--data-dir", str(root / "data"), "--tenant", tenant]
        made = subprocess.run(
            [*argv, "--role", "tenant"], env=launcher.env, capture_output=True, text=True, check=True, timeout=120
        )
        keys[tenant] = made.stdout.strip().splitlines()[-1]
    return keys


async def tenant_flood(target: str, keys: dict[str, str], calls: int) -> tuple[list[float], list[float], int]:
    """The other tenant's 4-token Generate: 3 alone, then 3 right after the flood's callers left; and
    how many flood calls ended OK (none should: each is refused by the exact check or abandoned)."""
    import random
    import string

    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation
    prompts = ["".join(rng.choice(alphabet) for _ in range(FLOOD_PROMPT_CHARS)) for _ in range(8)]
    sampling = Sampling(max_new_tokens=4)

    async def timed(client: AsyncLoraFleetClient) -> float:
        start = time.perf_counter()
        await client.generate("Hi", sampling=sampling)
        return time.perf_counter() - start

    async with AsyncLoraFleetClient(target, api_key=keys["other"], timeout=CALL_TIMEOUT) as other:
        alone = [await timed(other) for _ in range(3)]
        async with AsyncLoraFleetClient(target, api_key=keys["flood"], timeout=FLOOD_DEADLINE) as flood:

            async def abandoned(i: int) -> bool:
                try:
                    await flood.generate(prompts[i % len(prompts)], sampling=sampling)
                except LoraFleetError:
                    return False
                return True

            sent = [asyncio.ensure_future(abandoned(i)) for i in range(calls)]
            await asyncio.sleep(FLOOD_DEADLINE + 0.1)  # every flood call's caller has left
            after = [await timed(other) for _ in range(3)]
            served = sum(await asyncio.gather(*sent))
    return alone, after, served


def run_tenants(launcher: Launcher, root: Path, quick: bool) -> Outcome:
    """Scenario 5: one tenant's abandoned expensive calls must not stall another tenant's request."""
    calls = 100 if quick else 300
    keys = make_keys(launcher, root, ("flood", "other"))
    server = launcher.start(root, {})
    try:
        say(f"tenants: {calls} abandoned calls of {FLOOD_PROMPT_CHARS:,}-character prompts")
        alone, after, served = asyncio.run(tenant_flood(server.target, keys, calls))
    finally:
        server.stop()
    rows = [
        ("other tenant's Generate alone (3)", " / ".join(ms(t) for t in alone)),
        (f"right after {calls} abandoned calls (3)", " / ".join(ms(t) for t in after)),
        ("flood calls answered OK", str(served)),
    ]
    data: dict[str, Any] = {"calls": calls, "prompt_chars": FLOOD_PROMPT_CHARS, "deadline": FLOOD_DEADLINE}
    data |= {"alone_seconds": alone, "after_seconds": after, "flood_served": served}
    return Outcome("tenants", rows, data)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.hardening", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--server-cmd",
        default=f"{shlex.quote(sys.executable)} -m lorafleet_server serve",
        help="command that starts the server (its pid must be the server's); flags are appended",
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the server, e.g. PYTHONPATH of an older checkout (repeatable)",
    )
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the prepared default model)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--quick", action="store_true", help="4 oversized clients instead of 16, 8 versions instead of 30")
    p.add_argument("--seed", type=int, default=0, help="seed of the random adapters")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenario_list) - set(SCENARIOS)
    if unknown or not args.scenario_list:
        p.error(f"unknown --scenarios {sorted(unknown)}; known: {','.join(SCENARIOS)}")
    for item in args.server_env:
        if "=" not in item:
            p.error(f"--server-env wants KEY=VALUE, got {item!r}")
    return args


def render(outcomes: Sequence[Outcome]) -> str:
    """The results table: one row per measure, the scenario's name on its first row."""
    width = max((len(m) for o in outcomes for m, _ in o.rows), default=10) + 2
    head = f"{'scenario':<11}{'measure':<{width}}value"
    lines = [head, "-" * (len(head) + 40)]
    for o in outcomes:
        for i, (measure, value) in enumerate(o.rows):
            lines.append(f"{o.name if i == 0 else '':<11}{measure:<{width}}{value}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # making the swap adapters loads the model here
    warnings.simplefilter("ignore", FutureWarning)
    for noisy in ("transformers", "peft", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from lorafleet_server.model.prepare import prepare_default_model

    started = time.perf_counter()
    model = (args.model or prepare_default_model(REPO / "data" / "models")).resolve()
    overrides = dict(item.split("=", 1) for item in args.server_env)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **overrides}
    command = shlex.split(args.server_cmd)
    launcher = Launcher(command, env, model, server_flags(command, env))
    say(f"server: {shlex.join(command)}" + (f" with {overrides}" if overrides else "") + f"; model {model}")

    runners: dict[str, Callable[[Path], Outcome]] = {
        "oversized": lambda root: run_oversized(launcher, root, args.quick),
        "swaps": lambda root: run_swaps(launcher, root, args.quick, args.seed),
        "burst": lambda root: run_burst(launcher, root),
        "drain": lambda root: run_drain(launcher, root),
        "tenants": lambda root: run_tenants(launcher, root, args.quick),
    }
    outcomes: list[Outcome] = []
    failed: dict[str, str] = {}
    for name in args.scenario_list:
        root = Path(tempfile.mkdtemp(prefix=f"lorafleet-hardening-{name}-"))
        say(f"{name}: starting a server")
        t = time.perf_counter()
        try:
            outcome = runners[name](root)
            outcome.data["seconds"] = time.perf_counter() - t
            outcomes.append(outcome)
            say(f"{name}: done in {time.perf_counter() - t:.0f}s")
        except Exception as exc:  # one broken scenario should not hide the others' results
            failed[name] = f"{type(exc).__name__}: {exc}"
            say(f"{name} FAILED: {failed[name]}")
        finally:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"lorafleet hardening benchmark — server `{shlex.join(command)}`" + (f" {overrides}" if overrides else ""))
    print(f"model {model}; {os.cpu_count()} CPUs; {'quick' if args.quick else 'full'} run")
    if launcher.dropped:
        print(f"flags this server build does not support, left out: {' '.join(sorted(launcher.dropped))}")
    print()
    print(render(outcomes))
    for o in outcomes:
        if o.timeline:
            print(f"\n{o.name} timeline (seconds after SIGTERM):")
            print("\n".join(o.timeline))
    for name, error in failed.items():
        print(f"\n{name} FAILED: {error}")

    elapsed = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"hardening-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "server_cmd": command,
        "server_env": overrides,
        "model": str(model),
        "quick": args.quick,
        "dropped_flags": sorted(launcher.dropped),
        "environment": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "elapsed_seconds": elapsed,
        "scenarios": {o.name: o.data for o in outcomes},
        "failed": failed,
    }
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\nJSON: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}  (total {elapsed:.0f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
