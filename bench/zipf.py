"""1,000 adapters under Zipf traffic: bounded host memory, hit ratios and cold loads (issue 13, goal 5).

What it does, in one invocation:

1. Makes ``--adapters`` adapters (default 1,000; half r=8 on q_proj/v_proj, half r=16 on every linear,
   alternating along the popularity ranking so both shapes are spread over hot and cold) with random
   weights in PEFT's exact format (one PeftModel gives each shape's config and tensor names) and
   imports them into a local store, the publish path the CLI uses (validated, hashed, fsync'd).
2. Starts the real server (``lorafleet serve``, a child process) on that store, bf16 by default
   (``--dtype``), with ``--host-cache-bytes`` small enough that the host tier must evict, and a
   prefix cache sized for the run (``--prefix-cache-bytes``, reported, since it also grows RSS).
3. Sends ``--requests`` requests (default 10,000) whose adapters are drawn from Zipf(``--zipf``, 1.1)
   over the adapters with a fixed seed, ``--new-tokens`` (8) greedy tokens each, from ``--clients``
   (16) concurrent clients. It is a cache benchmark: short generations keep the run in minutes.
   The server's RSS is sampled every 0.5 s from /proc; the first ``--warmup`` share of requests (20%)
   is the warm-up, after which RSS must stay within 5% ("flat").
4. Reports, from the server's own counters (the metrics endpoint) over the measured window: host and
   device hit ratios; from its log (one line per load): store -> host and host -> device times per
   shape, split into first loads in the process (the weights file is hashed) and reloads (checked by
   its fstat identity: adapters/lorafleet_adapters/verified_read.py); routing: every response must
   name the adapter version its request asked for (the server names the version it resolved at
   submit, so this cannot see a wrong slot), and a sample of (adapter, prompt) pairs is sent again one
   at a time after the run: the text should equal what the mixed run gave. Each that differs is a
   replay mismatch, counted on its own; its prompt is then sent alone on the adapters whose requests
   overlapped it in the mixed run (those that could share its batches) and on the base model: a mixed
   text equal to one of those is a real mis-route (a wrong slot) and counts as mis-routed, one equal to
   none is a rounding difference (kernels that round differently by batch).
5. Then, with the server stopped (quiet machine), times isolated cold loads in-process, the goal's
   number: ``--cold-loads`` per shape and kind (first load, reload), store -> host and host -> device.

``--store s3`` publishes into a bucket on SeaweedFS (started for the run, tests/seaweedlib.py) and
serves from it, as a fleet replica does: cold loads are downloads into the replica's disk cache
(``--adapter-cache-mib``) or reads from it. ``--poll-seconds 5`` turns the server's version watcher
on (the default 0 keeps it off); ``--rescan-seconds 0`` makes every poll read every pointer, as
polls did before the store's publish marker.

Results: a table on stdout and JSON in bench/results/zipf-<timestamp>.json.

    .venv/bin/python -m bench.zipf --quick        # ~3 minutes: 200 adapters, 1,000 requests
    .venv/bin/python -m bench.zipf                # 1,000 adapters, 10,000 requests (~15-20 minutes here)
    .venv/bin/python -m bench.serving --scenario zipf --quick   # the same, through bench/serving.py
    .venv/bin/python -m bench.zipf --store s3 --poll-seconds 5 --keep /tmp/zipf-s3   # a replica on S3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.serving import SHAPES, Shape, make_adapters, percentile, prompt_text, quiet_logging
from lorafleet_adapters.backend import StoreSettings, open_store

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
TENANT = "zipf"
# lora_B's scale per shape: large enough that most adapters' greedy text differs from the base model's
# and from each other's, which the routing replay needs to see a mis-route (an r=8 q/v adapter at 0.05
# gave the base's text for most prompts); the r=16 all-linear ones change every module already
LORA_B_STD = {"default": 0.15, "r16all": 0.05}
STORE_FORMAT = 2  # 2: LORA_B_STD per shape (1: 0.05 for both)
BUCKET = "zipf"
MiB = 1 << 20

log = logging.getLogger("bench.zipf")


def say(msg: str) -> None:
    print(f"[zipf {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- adapters


def shape_of_rank(rank: int, r16_every: int) -> Shape:
    """The shape of the adapter at popularity ``rank`` (0 = most popular): every ``r16_every``-th is r=16."""
    return SHAPES["r16all"] if r16_every and rank % r16_every == r16_every - 1 else SHAPES["default"]


def adapter_name(rank: int, shape: Shape) -> str:
    return f"{shape.key}-{rank:04d}"


def make_store(model_dir: Path, spec: Any, store: Any, count: int, r16_every: int, seed: int) -> dict[str, Shape]:
    """``count`` random adapters published into ``store`` (a directory or a bucket); returns ref -> shape.

    Each adapter is written as a PEFT directory (the template's adapter_config.json, its own random
    tensors under the template's names), imported, and its source removed, so the disk holds one copy.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    work = Path(tempfile.mkdtemp(prefix="lorafleet-zipf-sources-"))  # PEFT directories, one at a time
    try:
        shapes = [SHAPES["default"], SHAPES["r16all"]] if r16_every else [SHAPES["default"]]
        templates = make_adapters(model_dir, shapes, 1, work / "templates", seed)
        layouts: dict[str, dict[str, list[int]]] = {}
        for key, dirs in templates.items():
            with safe_open(str(dirs[0] / "adapter_model.safetensors"), "pt") as fh:
                layouts[key] = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
        gen = torch.Generator().manual_seed(seed)
        refs: dict[str, Shape] = {}
        started = time.perf_counter()
        for rank in range(count):
            shape = shape_of_rank(rank, r16_every)
            src = work / "one"
            src.mkdir(parents=True)
            shutil.copy(templates[shape.key][0] / "adapter_config.json", src / "adapter_config.json")
            tensors = {}
            for name, dims in layouts[shape.key].items():
                std = LORA_B_STD[shape.key] if "lora_B" in name else dims[1] ** -0.5
                tensors[name] = torch.randn(*dims, generator=gen) * std  # [r, in] or [out, r]
            save_file(tensors, str(src / "adapter_model.safetensors"), metadata={"format": "pt"})
            name = adapter_name(rank, shape)
            store.import_peft(src, TENANT, name, spec)
            shutil.rmtree(src)
            refs[f"{TENANT}/{name}"] = shape
            if (rank + 1) % 100 == 0:
                say(f"published {rank + 1}/{count} adapters ({time.perf_counter() - started:.0f}s)")
    finally:  # also when a publish fails or the run is interrupted
        shutil.rmtree(work, ignore_errors=True)
    return refs


def start_bucket(directory: Path) -> tuple[Any, str]:
    """SeaweedFS on ``directory`` (its data kept there, so --keep reuses the bucket) with the bucket
    ``zipf``; its credentials and endpoint go into this process's environment, which the server
    inherits. Returns (the server, the store URL)."""
    sys.path.insert(0, str(REPO / "tests"))
    from seaweedlib import SeaweedFS

    # 1,000 adapters are ~10 GB (half r=16 all-linear at 19.5 MB): room for 32 GiB
    s3 = SeaweedFS.start(directory / "seaweed", die_with_parent=True, max_volumes=512)
    s3.create_bucket(BUCKET)  # there already in a kept store: fine
    os.environ.update(s3.env())
    return s3, f"s3://{BUCKET}/adapters"


def zipf_ranks(count: int, requests: int, exponent: float, seed: int) -> list[int]:
    """``requests`` popularity ranks in [0, count): P(rank k) proportional to 1 / (k + 1) ** exponent."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, count + 1, dtype=torch.float64) ** -exponent
    return [int(i) for i in torch.multinomial(weights, requests, replacement=True, generator=gen)]


# ----------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of the metrics endpoint: (name, sorted labels) -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): float(s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(args: argparse.Namespace, model_dir: Path, store: str, data_dir: Path) -> ServerProcess:
    port, metrics_port = free_port(), free_port()
    log_path = data_dir / "server.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    flags = {
        "--model": model_dir,
        "--adapter-store": store,
        "--data-dir": data_dir,
        "--host": "127.0.0.1",
        "--port": port,
        "--metrics-port": metrics_port,
        "--http-port": 0,
        "--dtype": args.dtype,
        "--max-lora-rank": 16,
        "--max-loaded-adapters": args.slots,
        "--host-cache-bytes": args.host_cache_mib * MiB,
        "--prefix-cache-bytes": args.prefix_cache_mib * MiB,
        "--max-batch-size": args.max_batch_size,
        "--adapter-poll-seconds": args.poll_seconds,
        "--adapter-rescan-seconds": args.rescan_seconds,
        "--log-level": "INFO",  # one line per adapter load: the per-shape cold-load times come from it
    }
    if args.store == "s3":
        flags["--adapter-cache-dir"] = data_dir / "adapter-cache"
        flags["--adapter-cache-bytes"] = args.adapter_cache_mib * MiB
    if args.threads:
        flags["--torch-threads"] = args.threads
    command = [str(Path(sys.executable).parent / "lorafleet"), "serve"]
    for flag, value in flags.items():
        command += [flag, str(value)]
    command.append("--metrics-adapter-residency")  # the host cache's bytes come from its series
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    return ServerProcess(proc, port, metrics_port, log_path)


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class RssSampler:
    """The server's resident set, every ``period`` seconds, on a thread: (seconds since start, bytes)."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        self.samples: list[tuple[float, int]] = []
        self._pid, self._period = pid, period
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = rss_bytes(self._pid)
            if rss is not None:
                self.samples.append((self.now(), rss))
            self._stop.wait(self._period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------------- traffic


@dataclass
class Reply:
    index: int
    adapter: str  # the reference sent
    prompt: int  # prompt index
    served: str  # the adapter version the server says served it
    text: str
    seconds: float
    error: str | None = None
    started: float = 0.0  # time.perf_counter() when it was sent: which requests overlapped it


async def run_traffic(
    target: str,
    refs: Sequence[str],
    ranks: Sequence[int],
    *,
    clients: int,
    new_tokens: int,
    prompts: int,
    on_done: Any,
) -> list[Reply]:
    """Every request of ``ranks`` once, ``clients`` at a time (each takes the next unsent one)."""
    from lorafleet import AsyncLoraFleetClient, LoraFleetError

    conns = [AsyncLoraFleetClient(target, timeout=900) for _ in range(clients)]
    replies: list[Reply] = []
    next_index = 0
    try:
        await asyncio.gather(*(c.wait_for_ready(120) for c in conns))

        async def client_task(conn: Any) -> None:
            nonlocal next_index
            while next_index < len(ranks):
                i = next_index
                next_index += 1
                ref, prompt = refs[ranks[i]], i % prompts
                started = time.perf_counter()
                try:
                    done = await ask(conn, ref, prompt, new_tokens)
                    reply = Reply(
                        i, ref, prompt, done.adapter, done.text, time.perf_counter() - started, started=started
                    )
                except LoraFleetError as exc:
                    reply = Reply(i, ref, prompt, "", "", time.perf_counter() - started, repr(exc), started)
                replies.append(reply)
                await on_done(len(replies))

        await asyncio.gather(*(client_task(c) for c in conns))
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    return replies


async def server_dtype(target: str) -> str:
    """The compute dtype the server reports ("bfloat16", "float32")."""
    from lorafleet import AsyncLoraFleetClient

    async with AsyncLoraFleetClient(target, timeout=120) as conn:
        await conn.wait_for_ready(120)
        return (await conn.model_info()).dtype


async def replay_alone(target: str, pairs: Sequence[tuple[str, int]], new_tokens: int) -> list[str]:
    """Each (adapter, prompt) sent again, one request at a time: what that adapter alone gives (adapter
    "": the base model)."""
    from lorafleet import AsyncLoraFleetClient

    texts = []
    async with AsyncLoraFleetClient(target, timeout=900) as conn:
        for ref, prompt in pairs:
            texts.append((await ask(conn, ref, prompt, new_tokens)).text)
    return texts


async def ask(conn: Any, ref: str, prompt: int, new_tokens: int) -> Any:
    """Prompt number ``prompt`` to ``ref`` (adapter "": the base model), greedy: the one request both the
    traffic and its replay send. A chat of one user turn, as the serving benchmark sends (a plain prompt
    made the model end at once)."""
    from lorafleet import Message, Sampling

    return await conn.generate(
        messages=[Message("user", prompt_text(prompt))],
        adapter=ref,
        sampling=Sampling(max_new_tokens=new_tokens, temperature=0.0),
    )


# ----------------------------------------------------------------------------------- routing evidence

NEIGHBOURS = 64  # at most this many other adapters replayed per replay mismatch


def neighbours(replies: Sequence[Reply], reply: Reply, limit: int = NEIGHBOURS) -> list[str]:
    """The other adapters whose requests were in flight while ``reply``'s was (those that could share
    its batches), nearest start first, at most ``limit``, then "" (the base model: a request given no
    adapter's delta)."""
    end = reply.started + reply.seconds
    overlapping = sorted(
        (r for r in replies if not r.error and r.started < end and reply.started < r.started + r.seconds),
        key=lambda r: abs(r.started - reply.started),
    )
    refs = [r.adapter for r in overlapping if r.adapter != reply.adapter]
    return [*list(dict.fromkeys(refs))[:limit], ""]


def replay_mismatches(
    sample: dict[tuple[str, int], Reply],
    alone: Sequence[str],
    candidates: dict[tuple[str, int], list[str]],
    others: dict[tuple[str, int], str],
) -> list[dict[str, Any]]:
    """The sampled replies whose mixed-run text differs from the text their adapter gives alone
    (``alone``, in ``sample``'s order), each with the candidates (``candidates[(adapter, prompt)]``,
    ``neighbours``) whose alone text for the same prompt (``others[(candidate, prompt)]``) equals its
    mixed text: ``wrong_adapter`` is then true, a real mis-route; false is a rounding difference."""
    out = []
    for ((ref, prompt), reply), own in zip(sample.items(), alone, strict=True):
        if reply.text == own:
            continue
        tried = candidates.get((ref, prompt), [])
        equal = [c for c in tried if c != ref and others.get((c, prompt)) == reply.text]
        out.append(
            {
                "adapter": ref,
                "prompt": prompt,
                "mixed": reply.text,
                "alone": own,
                "common_prefix_chars": common_prefix(reply.text, own),
                "others_tried": len(tried),
                "equals_alone_text_of": equal,  # "" is the base model
                "wrong_adapter": bool(equal),
            }
        )
    return out


def check_replay(
    target: str, replies: Sequence[Reply], sample: dict[tuple[str, int], Reply], new_tokens: int
) -> tuple[list[dict[str, Any]], int]:
    """Replay ``sample`` alone, and each of its prompts on the base model; for each mismatch, replay its
    prompt alone on its ``neighbours`` too. Returns the mismatches and how many sampled pairs could
    show a mis-route at all (``discriminating``)."""
    alone = asyncio.run(replay_alone(target, list(sample), new_tokens)) if sample else []
    base_pairs = list(dict.fromkeys(("", prompt) for _, prompt in sample))
    base = dict(zip(base_pairs, asyncio.run(replay_alone(target, base_pairs, new_tokens)), strict=True))
    candidates = {
        pair: neighbours(replies, reply)
        for (pair, reply), own in zip(sample.items(), alone, strict=True)
        if reply.text != own
    }
    known = dict(zip(sample, alone, strict=True)) | base
    pairs = list(dict.fromkeys((c, prompt) for (_, prompt), refs in candidates.items() for c in refs))
    pairs = [pair for pair in pairs if pair not in known]
    if pairs:
        say(f"{len(candidates)} replay mismatches: their prompts alone on {len(pairs)} other adapters")
        known |= dict(zip(pairs, asyncio.run(replay_alone(target, pairs, new_tokens)), strict=True))
    return replay_mismatches(sample, alone, candidates, known), discriminating(sample, alone, base)


def discriminating(sample: dict[tuple[str, int], Reply], alone: Sequence[str], base: dict[tuple[str, int], str]) -> int:
    """How many sampled pairs' alone text differs from the base model's for the same prompt: only those
    can show a row served without its adapter (an adapter whose text is the base's hides that)."""
    return sum(own != base[("", prompt)] for (_, prompt), own in zip(sample, alone, strict=True))


# ----------------------------------------------------------------------------------- reading results

_STORE_LINE = re.compile(r"adapter (\S+)@(\d+) read from the store in ([0-9.]+)s")
_DEVICE_LINE = re.compile(r"adapter (\S+)@(\d+) written to device slot \d+ in ([0-9.]+)s")


@dataclass
class LoadTimes:
    store_first: list[float] = field(default_factory=list)  # first load in the process: hashed
    store_again: list[float] = field(default_factory=list)  # reloads: fstat identity checked
    device: list[float] = field(default_factory=list)


def parse_loads(log_text: str, refs: dict[str, Shape], since_line: int = 0) -> dict[str, LoadTimes]:
    """Per shape, the load times the server logged (lines from ``since_line`` on count)."""
    out = {shape.key: LoadTimes() for shape in refs.values()}
    seen: set[str] = set()
    for number, line in enumerate(log_text.splitlines()):
        if m := _STORE_LINE.search(line):
            ref, seconds = m[1], float(m[3])
            first = ref not in seen
            seen.add(ref)
            if number >= since_line and ref in refs:
                times = out[refs[ref].key]
                (times.store_first if first else times.store_again).append(seconds)
        elif (m := _DEVICE_LINE.search(line)) and number >= since_line and m[1] in refs:
            out[refs[m[1]].key].device.append(float(m[3]))
    return out


def counter(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def tier_ratios(before: dict[Any, float], after: dict[Any, float]) -> dict[str, dict[str, float | None]]:
    """Hits, misses and hit ratio per tier between two scrapes of the metrics endpoint (None: no lookup)."""
    out = {}
    for tier in ("device", "host"):
        hits = counter(after, "lorafleet_adapter_cache_hits_total", tier=tier) - counter(
            before, "lorafleet_adapter_cache_hits_total", tier=tier
        )
        misses = counter(after, "lorafleet_adapter_cache_misses_total", tier=tier) - counter(
            before, "lorafleet_adapter_cache_misses_total", tier=tier
        )
        evictions = counter(after, "lorafleet_adapter_evictions_total", tier=tier) - counter(
            before, "lorafleet_adapter_evictions_total", tier=tier
        )
        total = hits + misses
        out[tier] = {
            "hits": hits,
            "misses": misses,
            "evictions": evictions,
            "hit_ratio": hits / total if total else None,
        }
    return out


def host_bytes(metrics: dict[Any, float], refs: dict[str, Shape], per_shape: dict[str, int]) -> int:
    """Bytes of adapter weights in the host cache, from the residency series (one per held version; the
    server exports them with ``--metrics-adapter-residency``). A scrape with none is refused: it read
    0 bytes for a day after the series went behind that flag."""
    total = 0
    series = [labels for name, labels in metrics if name == "lorafleet_adapter_resident"]
    if not series:
        raise RuntimeError(
            "no lorafleet_adapter_resident series: was the server started with --metrics-adapter-residency?"
        )
    for labels in series:
        if ("tier", "host") not in labels:
            continue
        ref = dict(labels)["adapter"].rsplit("@", 1)[0]
        if ref in refs:
            total += per_shape[refs[ref].key]
    return total


def host_weight_bytes(shape: Shape, spec: Any, element_size: int) -> int:
    """What one adapter of ``shape`` holds on the host: A [r, in] and B^T [r, out] per targeted module."""
    targets = shape.target_modules
    total = 0
    for module, (out_f, in_f) in spec.target_shapes.items():
        leaf = module.rsplit(".", 1)[-1]
        if targets == "all-linear" or leaf in targets:
            total += shape.r * (in_f + out_f)
    return total * element_size


def common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def p(xs: Sequence[float], q: float) -> float | None:
    return percentile(list(xs), q)


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f} ms"


# ----------------------------------------------------------------------------------- isolated cold loads


def isolated_cold_loads(
    args: argparse.Namespace, model_dir: Path, store: Path, refs: dict[str, Shape]
) -> list[dict[str, Any]]:
    """Cold loads with the server stopped, per shape: ``--cold-loads`` first loads (versions this store
    object never read: the file is hashed) and as many reloads (versions it read before: fstat identity),
    each timed store -> host (``AdapterStore.load`` in the slots' dtype) and host -> device (the slot
    write), interleaved so that the machine's drift hits every kind alike. Both store objects live long,
    as the server's does: their read buffers are warm, their memos are what differs."""
    from lorafleet_adapters.store import AdapterStore
    from lorafleet_server.app import build_service
    from lorafleet_server.config import ServerConfig

    config = ServerConfig(
        model=model_dir,
        data_dir=Path(tempfile.mkdtemp(prefix="lorafleet-zipf-cold-")),
        adapter_store=store,
        port=0,
        dtype=args.dtype,
        max_lora_rank=16,
        max_loaded_adapters=4,
        torch_threads=args.threads or 1,
        metrics_port=0,
        log_level="WARNING",
        prefix_cache_bytes=0,
        adapter_poll_seconds=0,
    )
    service = build_service(config)
    try:
        spec, dtype, slots = service.base.spec, service.base.dtype, service.engine.adapters.slots
        transpose = service.engine.adapters.host_transpose  # the server's host layout kernel
        by_shape: dict[str, list[str]] = {}
        for ref, shape in refs.items():
            by_shape.setdefault(shape.key, []).append(ref)
        n = min([args.cold_loads] + [len(v) // 2 for v in by_shape.values()])
        first = AdapterStore(store)  # reads versions it never read: each is hashed
        reuse = AdapterStore(store)  # reads versions it hashed once: a stat check
        rows: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
        from lorafleet_adapters.ref import AdapterRef

        def keys_of(refs_: list[str]) -> list[Any]:
            return [service.store.resolve(AdapterRef.parse(r)) for r in refs_]

        plans = {k: (keys_of(v[-2 * n : -n]), keys_of(v[-n:])) for k, v in by_shape.items()}
        for k, (_, reload_keys) in plans.items():
            for key in reload_keys:
                reuse.load(key, spec, dtype=dtype, transpose=transpose)
            resident = keys_of(by_shape[k][:1])[0]  # not measured; sizes the first store's read buffer
            slots.install(resident, first.load(resident, spec, dtype=dtype, transpose=transpose))
            slots.pin(resident)  # the slot buffers keep this rank: no measured write resizes them
        for i in range(n):
            for k, (first_keys, reload_keys) in plans.items():
                for kind, source, key in (
                    ("first load (hash)", first, first_keys[i]),
                    ("reload (fstat check)", reuse, reload_keys[i]),
                ):
                    slots.unload(key)
                    t0 = time.perf_counter()
                    weights = source.load(key, spec, dtype=dtype, transpose=transpose)
                    t1 = time.perf_counter()
                    slots.install(key, weights)
                    t2 = time.perf_counter()
                    slots.unload(key)
                    store_s, device_s = rows.setdefault((k, kind), ([], []))
                    store_s.append(t1 - t0)
                    device_s.append(t2 - t1)
        out = []
        for (k, kind), (store_s, device_s) in rows.items():
            total = [a + b for a, b in zip(store_s, device_s, strict=True)]
            out.append(
                {
                    "shape": k,
                    "kind": kind,
                    "n": len(total),
                    "store_to_host_p50_s": statistics.median(store_s),
                    "host_to_device_p50_s": statistics.median(device_s),
                    "total_p50_s": statistics.median(total),
                    "total_p90_s": p(total, 90),
                    "dtype": str(dtype).removeprefix("torch."),
                }
            )
        return out
    finally:
        service.engine.adapters.close()
        shutil.rmtree(config.data_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p_ = argparse.ArgumentParser(prog="bench.zipf", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p_.add_argument("--quick", action="store_true", help="200 adapters, 1,000 requests (~3 minutes)")
    p_.add_argument("--adapters", type=int, help="registered adapters (default 1000; quick 200)")
    p_.add_argument("--requests", type=int, help="requests (default 10000; quick 1000)")
    p_.add_argument("--r16-every", type=int, default=2, help="every Nth popularity rank is r=16 all-linear (0: none)")
    p_.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    p_.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p_.add_argument("--new-tokens", type=int, default=8, help="greedy tokens per request")
    p_.add_argument("--prompts", type=int, default=64, help="distinct prompts (request i uses prompt i %% N)")
    p_.add_argument("--warmup", type=float, default=0.2, help="share of requests before RSS and ratios are measured")
    p_.add_argument("--host-cache-mib", type=int, help="--host-cache-bytes of the server, in MiB (512; quick 256)")
    p_.add_argument("--prefix-cache-mib", type=int, default=64, help="--prefix-cache-bytes of the server, in MiB")
    p_.add_argument("--slots", type=int, default=32, help="--max-loaded-adapters of the server")
    p_.add_argument("--max-batch-size", type=int, default=32)
    p_.add_argument("--dtype", default="auto", help="server compute dtype (auto: bf16 where the CPU has it)")
    p_.add_argument("--threads", type=int, default=0, help="server torch threads (0: its default)")
    p_.add_argument("--replay", type=int, default=32, help="(adapter, prompt) pairs replayed alone after the run")
    p_.add_argument("--cold-loads", type=int, default=20, help="isolated cold loads per shape and kind (0: none)")
    p_.add_argument("--cold-only", action="store_true", help="no server and no traffic: the isolated cold loads only")
    p_.add_argument("--model", type=Path, help="model directory (default: the prepared SmolLM2-135M-Instruct)")
    p_.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    p_.add_argument("--seed", type=int, default=0)
    p_.add_argument("--keep", type=Path, help="keep the store in this directory (reused when it exists)")
    p_.add_argument(
        "--store",
        choices=("local", "s3"),
        default="local",
        help="a local directory, or a bucket on SeaweedFS started for the run (the fleet's store; no isolated "
        "cold loads)",
    )
    p_.add_argument("--poll-seconds", type=float, default=0.0, help="the server's --adapter-poll-seconds (0: off)")
    p_.add_argument("--rescan-seconds", type=float, default=60.0, help="the server's --adapter-rescan-seconds")
    p_.add_argument("--adapter-cache-mib", type=int, default=2048, help="S3: the replica's disk cache, in MiB")
    args = p_.parse_args(argv)
    args.adapters = args.adapters or (200 if args.quick else 1000)
    args.requests = args.requests or (1000 if args.quick else 10000)
    args.host_cache_mib = args.host_cache_mib or (256 if args.quick else 512)
    if args.adapters < 1 or args.requests < 1 or args.clients < 1:
        p_.error("--adapters, --requests and --clients must be >= 1")
    if args.store == "s3" and args.cold_only:
        p_.error("--cold-only times loads from a local directory: not with --store s3")
    return args


# bench.serving's options ``--scenario zipf`` passes on (any other given to it is refused); --dtype and
# --threads only when given (their defaults differ: bench.serving runs one thread, zipf the server's own)
FROM_SERVING = frozenset({"seed", "out", "max_batch_size", "quick", "model", "dtype", "threads"})


def kept_refs(refs_file: Path, made: dict[str, Any]) -> dict[str, Shape]:
    """The adapters of a ``--keep`` store, refused unless made with ``made``'s count, shape mix and
    seed: a 200-adapter quick store reused by a full run reported "over 1000 adapters"."""
    kept = json.loads(refs_file.read_text())
    if kept.get("made") != made:
        was = kept.get("made", "before they were recorded")
        raise SystemExit(f"{refs_file.parent} was made with {was}, not {made}: pass another --keep, or delete it")
    return {r: SHAPES[k] for r, k in kept["refs"].items()}


def argv_from_serving(args: argparse.Namespace, defaults: argparse.Namespace) -> list[str]:
    """``bench.serving --scenario zipf``: the options both benchmarks share (``FROM_SERVING``), passed on."""
    argv = ["--seed", str(args.seed), "--out", str(args.out), "--max-batch-size", str(args.max_batch_size)]
    if args.dtype is not None:  # bench.serving's default (None) is the server's own, as zipf's "auto"
        argv += ["--dtype", args.dtype]
    if args.threads != defaults.threads:
        argv += ["--threads", str(args.threads)]
    if args.quick:
        argv.append("--quick")
    if args.model is not None:
        argv += ["--model", str(args.model)]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    from lorafleet_server.model.loader import base_spec_from_files
    from lorafleet_server.model.prepare import prepare_default_model

    started = time.perf_counter()
    model_dir = args.model or prepare_default_model(REPO / "data" / "models")
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-zipf-"))
    kept = args.keep or work / "store"  # the local store, or SeaweedFS's data and the refs file
    spec = base_spec_from_files(model_dir, "none", 16)
    ran = list(argv) if argv is not None else sys.argv[1:]  # what ran (bench.serving passes its own)
    result: dict[str, Any] = {"argv": ran, "args": {k: str(v) for k, v in vars(args).items()}}
    s3: Any = None
    try:
        if args.store == "s3":
            s3, location = start_bucket(kept)
        else:
            location = str(kept)
        refs_file = kept / "zipf-refs.json"
        made = {"adapters": args.adapters, "r16_every": args.r16_every, "seed": args.seed, "format": STORE_FORMAT}
        if refs_file.is_file():
            refs = kept_refs(refs_file, made)
            say(f"reusing {len(refs)} adapters in {location}")
        else:
            say(f"publishing {args.adapters} adapters into {location}")
            publisher = open_store(StoreSettings(location, cache_dir=work / "publisher-cache"))
            refs = make_store(model_dir, spec, publisher, args.adapters, args.r16_every, args.seed)
            kept.mkdir(parents=True, exist_ok=True)
            refs_file.write_text(json.dumps({"made": made, "refs": {r: s.key for r, s in refs.items()}}))
        ordered = list(refs)  # popularity rank -> reference
        ranks = zipf_ranks(len(ordered), args.requests, args.zipf, args.seed)
        distinct = len(set(ranks))
        result["setup_seconds"] = time.perf_counter() - started
        say(f"{args.requests} requests over {distinct} distinct adapters (Zipf {args.zipf}, seed {args.seed})")

        if not args.cold_only:
            server = start_server(args, model_dir, location, work / "server")
            sampler = RssSampler(server.proc.pid)
            try:
                result |= drive(args, server, sampler, refs, ordered, ranks, spec)
            finally:
                sampler.stop()
                server.stop()
            result["rss_samples"] = sampler.samples
        if args.cold_loads and args.store == "local":
            say("isolated cold loads (server stopped)")
            result["cold_loads"] = isolated_cold_loads(args, model_dir, kept, refs)
    finally:
        if s3 is not None:
            s3.stop()
        shutil.rmtree(work, ignore_errors=True)  # the server's log and, without --keep, the store
    result["elapsed_seconds"] = time.perf_counter() - started
    report(args, result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"zipf-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    say(f"wrote {path}")
    return 0


def drive(
    args: argparse.Namespace,
    server: ServerProcess,
    sampler: RssSampler,
    refs: dict[str, Shape],
    ordered: list[str],
    ranks: list[int],
    spec: Any,
) -> dict[str, Any]:
    """The traffic against a started server, and what its counters, log and RSS say about it."""
    warmup_at = max(1, int(len(ranks) * args.warmup))
    marks: dict[str, Any] = {}

    async def on_done(count: int) -> None:
        if count == warmup_at:
            marks["warmup_t"] = sampler.now()
            marks["warmup_metrics"] = await asyncio.to_thread(server.metrics)
            marks["warmup_log_line"] = len(server.log_path.read_text().splitlines())
        if count % max(1, len(ranks) // 10) == 0:
            say(f"{count}/{len(ranks)} requests done")

    t0 = time.perf_counter()
    try:
        replies = asyncio.run(
            run_traffic(
                server.target,
                ordered,
                ranks,
                clients=args.clients,
                new_tokens=args.new_tokens,
                prompts=args.prompts,
                on_done=on_done,
            )
        )
    except BaseException:
        say("the run failed; server log tail:\n" + "\n".join(server.log_path.read_text().splitlines()[-30:]))
        raise
    wall = time.perf_counter() - t0
    end_metrics = server.metrics()
    end_t = sampler.now()

    # routing: the version that served each request is the one it asked for (every adapter has version 1).
    # The server names the version it resolved at submit, so this cannot see a wrong slot: the replay can
    # (a mixed text equal to another adapter's alone text).
    errors = [r for r in replies if r.error]
    misnamed = [r for r in replies if not r.error and r.served != f"{r.adapter}@1"]
    sample: dict[tuple[str, int], Reply] = {}
    for r in replies[len(replies) // 2 :]:  # after warm-up, many adapters, hot and cold
        if not r.error and (r.adapter, r.prompt) not in sample and len(sample) < args.replay:
            sample[(r.adapter, r.prompt)] = r
    text_mismatch, telling = check_replay(server.target, replies, sample, args.new_tokens)
    wrong_adapter = [m for m in text_mismatch if m["wrong_adapter"]]

    dtype = asyncio.run(server_dtype(server.target))
    element = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    per_shape = {s.key: host_weight_bytes(s, spec, element) for s in SHAPES.values()}
    warm_metrics = marks.get("warmup_metrics", {})
    samples = sampler.samples
    warm_t = marks.get("warmup_t", 0.0)
    after = [b for t, b in samples if warm_t <= t <= end_t]
    rss_warm = after[0] if after else None
    rss_end = after[-1] if after else None
    rss_max = max(after) if after else None
    log_text = server.log_path.read_text()
    loads = parse_loads(log_text, refs, marks.get("warmup_log_line", 0))
    loads_all = parse_loads(log_text, refs)
    served_tokens = sum(len(r.text) for r in replies)
    served = [r for r in replies if not r.error]  # rate and latency of those answered (errors apart)
    return {
        "server_dtype": dtype,
        "requests": len(replies),
        "distinct_adapters": len(set(ranks)),
        "wall_seconds": wall,
        "requests_per_second": len(served) / wall,
        "errors": len(errors),
        "error_examples": [r.error for r in errors[:5]],
        # served version != requested, plus replay mismatches whose text is another adapter's
        "misrouted": len(
            {r.index for r in misnamed} | {sample[m["adapter"], m["prompt"]].index for m in wrong_adapter}
        ),
        "misrouted_served_version": len(misnamed),
        "misrouted_replay": len(wrong_adapter),
        "misrouted_examples": [asdict(r) for r in misnamed[:5]],
        "replayed": len(sample),
        "replay_discriminating": telling,
        "replay_mismatches": len(text_mismatch),
        "replay_text_mismatches": text_mismatch,
        "ratios_after_warmup": tier_ratios(warm_metrics, end_metrics),
        "ratios_whole_run": tier_ratios({}, end_metrics),
        "rss_after_warmup": rss_warm,
        "rss_end": rss_end,
        "rss_max_after_warmup": rss_max,
        "rss_growth_after_warmup": (rss_max - rss_warm) / rss_warm if rss_warm and rss_max else None,
        "host_cache_bytes_end": host_bytes(end_metrics, refs, per_shape),
        "host_cache_bytes_warmup": host_bytes(warm_metrics, refs, per_shape),
        "host_weight_bytes_per_shape": per_shape,
        "prefix_cache_bytes_warmup": counter(warm_metrics, "lorafleet_prefix_cache_bytes"),
        "prefix_cache_bytes_end": counter(end_metrics, "lorafleet_prefix_cache_bytes"),
        "slot_memory_bytes_warmup": counter(warm_metrics, "lorafleet_adapter_slot_memory_bytes"),
        "slot_memory_bytes_end": counter(end_metrics, "lorafleet_adapter_slot_memory_bytes"),
        "loads_after_warmup": {k: asdict(v) for k, v in loads.items()},
        "loads_whole_run": {k: asdict(v) for k, v in loads_all.items()},
        "latency_p50_s": p([r.seconds for r in served], 50),
        "latency_p99_s": p([r.seconds for r in served], 99),
        "text_chars": served_tokens,
    }


def report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    if "requests" in r:
        report_traffic(args, r)
    if r.get("cold_loads"):
        print()
        print("isolated cold loads (server stopped, interleaved):")
        print("| shape | kind | n | store->host p50 | host->device p50 | total p50 | total p90 |")
        print("|---|---|---|---|---|---|---|")
        for row in r["cold_loads"]:
            print(
                f"| {row['shape']} | {row['kind']} | {row['n']} | {ms(row['store_to_host_p50_s'])} | "
                f"{ms(row['host_to_device_p50_s'])} | {ms(row['total_p50_s'])} | {ms(row['total_p90_s'])} |"
            )
    print()


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def report_traffic(args: argparse.Namespace, r: dict[str, Any]) -> None:
    mib = 1 / MiB
    print()
    print(
        f"Zipf({args.zipf}) over {args.adapters} adapters (every {args.r16_every}th rank r=16 all-linear, the rest "
        f"r=8 q/v), {r['requests']} requests ({r['distinct_adapters']} distinct adapters), {args.new_tokens} new "
        f"tokens, {args.clients} clients, dtype {r.get('server_dtype', args.dtype)}, host cache "
        f"{args.host_cache_mib} MiB, prefix cache {args.prefix_cache_mib} MiB, {args.slots} device slots; store "
        + (f"S3 (SeaweedFS, disk cache {args.adapter_cache_mib} MiB)" if args.store == "s3" else "a local directory")
        + (
            f", polls every {args.poll_seconds:g}s (rescan {args.rescan_seconds:g}s)"
            if args.poll_seconds
            else ", no polls"
        )
    )
    print(f"command: .venv/bin/python -m bench.zipf {' '.join(r['argv'])}")
    print()
    print(
        f"wall {r['wall_seconds']:.0f}s, {r['requests_per_second']:.1f} requests/s, latency p50 "
        f"{ms(r['latency_p50_s'])} p99 {ms(r['latency_p99_s'])}; errors {r['errors']}; mis-routed "
        f"{r['misrouted']} ({r['misrouted_served_version']} served version != requested, "
        f"{r['misrouted_replay']} replayed text = another adapter's); replay mismatches "
        f"{r['replay_mismatches']} of {r['replayed']} replayed alone ({r.get('replay_discriminating', '?')} of "
        "them with a text other than the base model's: those could show a mis-route)"
    )
    for m in r["replay_text_mismatches"]:
        equal = ", ".join(x or "the base model" for x in m["equals_alone_text_of"])
        print(
            f"  replay mismatch {m['adapter']} prompt {m['prompt']}: same text for {m['common_prefix_chars']} chars; "
            + (
                f"equals the alone text of {equal}: MIS-ROUTED"
                if equal
                else f"equals no other's alone text ({m['others_tried']} tried, the base model among them)"
            )
        )
    print()
    print("| tier | hits | misses | hit ratio (after warm-up) | hit ratio (whole run) | evictions |")
    print("|---|---|---|---|---|---|")
    for tier in ("device", "host"):
        a, w = r["ratios_after_warmup"][tier], r["ratios_whole_run"][tier]
        print(
            f"| {tier} | {a['hits']:.0f} | {a['misses']:.0f} | {ratio(a['hit_ratio'])} | {ratio(w['hit_ratio'])} "
            f"| {a['evictions']:.0f} |"
        )
    print()
    growth = r["rss_growth_after_warmup"]
    print("| memory | after warm-up | end |")
    print("|---|---|---|")
    rss_w, rss_e, rss_max = (r[k] or 0 for k in ("rss_after_warmup", "rss_end", "rss_max_after_warmup"))
    rows = [
        ("server RSS", rss_w, f"{rss_e * mib:.0f} MiB (max {rss_max * mib:.0f})"),
        ("host cache (adapter weights)", r["host_cache_bytes_warmup"], f"{r['host_cache_bytes_end'] * mib:.0f} MiB"),
        ("prefix cache", r["prefix_cache_bytes_warmup"], f"{r['prefix_cache_bytes_end'] * mib:.0f} MiB"),
        ("device slots", r["slot_memory_bytes_warmup"], f"{r['slot_memory_bytes_end'] * mib:.0f} MiB"),
    ]
    for label, warm, end in rows:
        print(f"| {label} | {warm * mib:.0f} MiB | {end} |")
    print()
    if growth is not None:
        verdict = "flat" if growth <= 0.05 else "NOT flat"
        print(f"RSS growth after warm-up (max vs first sample): {growth * 100:+.1f}% -> {verdict} (<= 5%)")
    print()
    print("cold loads inside the server under traffic (after warm-up; from its log):")
    print(
        "| shape | store->host first load (hash) p50/p90 | store->host reload p50/p90 | host->device p50/p90 "
        "| n (first/reload/device) |"
    )
    print("|---|---|---|---|---|")
    for k, t in r["loads_after_warmup"].items():
        print(
            f"| {k} | {ms(p(t['store_first'], 50))} / {ms(p(t['store_first'], 90))} | {ms(p(t['store_again'], 50))} / "
            f"{ms(p(t['store_again'], 90))} | {ms(p(t['device'], 50))} / {ms(p(t['device'], 90))} | "
            f"{len(t['store_first'])}/{len(t['store_again'])}/{len(t['device'])} |"
        )


if __name__ == "__main__":
    sys.exit(main())
