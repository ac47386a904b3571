"""Prometheus metrics (README, "Metrics and logs"): prefix ``lorafleet_``, base units, ``_total`` counters.

Everything lives on an injected CollectorRegistry (never the global one) and no label carries a
tenant or adapter name: those are unbounded and go to the request log instead. The one exception is
``lorafleet_adapter_resident`` (residency, for routers: docs/fleet.md): one series per adapter version
held right now, so at most the device slots plus the host cache's entries.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from lorafleet_server.engine.types import FinishReason, Summary

log = logging.getLogger(__name__)

# From a fast decode token (ms) to a long generation (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
# Up to an S3 read that exhausts its retries (3 attempts of a 15 s read timeout, ~47 s) and beyond.
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_COUNT_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
TIERS = ("host", "device")
DISK_TIER = "disk"  # the local disk cache of versions read from an S3 store (events only, no residency gauge)
KEYS_RELOAD_RESULTS = ("ok", "error")
# The status codes the alert rules and the dashboard's error panels select (deploy/prometheus/alerts.yml;
# a test checks this covers them), and OK: every RPC's series exist from the start for these.
WATCHED_CODES = ("OK", "INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED")


class ResidencyCollector(Collector):
    """``lorafleet_adapter_resident{adapter="tenant/name@version", tier="device"|"host"} 1`` for each
    adapter version a replica holds, read at scrape time: what a router needs to send an adapter's
    requests where it is already hot. Bounded by the slots and the host cache."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "lorafleet_adapter_resident",
            "Adapter versions held by this replica (1 per version and tier: device slot or host cache).",
            labels=["adapter", "tier"],
        )
        for adapter, tier in self._read():
            family.add_metric([adapter, tier], 1.0)
        yield family


class Metrics:
    """The server's instruments. Methods are thread-safe (prometheus_client's own locking)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.request_duration = Histogram(
            "lorafleet_request_duration_seconds",
            "End-to-end latency of an RPC, by RPC (HTTP: one value per route, e.g. 'POST /v1/chat/completions').",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "lorafleet_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "lorafleet_time_per_output_token_seconds",
            "Mean time per generated token after the first.",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "lorafleet_queue_wait_seconds",
            "Time from a request's arrival until it joined the running batch (its wait for a worker thread, "
            "adapter store reads and tokenizing included; for one cancelled or cut first, until then).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_load = Histogram(
            "lorafleet_adapter_load_duration_seconds",
            "Time to make an adapter ready, by the tier it came from (store: disk to host; host: host to device).",
            ["source"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.prompt_tokens_per_request = Histogram(
            "lorafleet_request_prompt_tokens",
            "Prompt tokens per request.",
            buckets=TOKEN_COUNT_BUCKETS,
            registry=r,
        )
        self.generated_tokens_per_request = Histogram(
            "lorafleet_request_generated_tokens",
            "Generated tokens per request.",
            buckets=TOKEN_COUNT_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "lorafleet_requests",
            "Finished RPCs (and HTTP requests, by route) by RPC and final gRPC status code.",
            ["rpc", "code"],
            registry=r,
        )
        self.prompt_tokens = Counter("lorafleet_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generated_tokens = Counter("lorafleet_generated_tokens", "Tokens generated.", registry=r)
        self.preemptions = Counter(
            "lorafleet_preemptions",
            "Running requests that gave their batch row back for fair share (they resume later).",
            registry=r,
        )
        self.finished = Counter(
            "lorafleet_generations", "Finished generations by finish reason.", ["reason"], registry=r
        )
        self.cache_hits = Counter("lorafleet_adapter_cache_hits", "Adapter cache hits by tier.", ["tier"], registry=r)
        self.cache_misses = Counter(
            "lorafleet_adapter_cache_misses", "Adapter cache misses by tier.", ["tier"], registry=r
        )
        self.evictions = Counter("lorafleet_adapter_evictions", "Adapters evicted by tier.", ["tier"], registry=r)
        self.loads = Counter("lorafleet_adapter_loads", "Adapters loaded into a tier.", ["tier"], registry=r)
        self.load_failures = Counter(
            "lorafleet_adapter_load_failures", "Adapter loads that failed (bad files, incompatible base).", registry=r
        )
        self.swaps = Counter(
            "lorafleet_adapter_swaps", "Adapters whose latest version moved to a newly published one.", registry=r
        )
        self.swap_failures = Counter(
            "lorafleet_adapter_swap_failures", "New versions refused: the previous one keeps serving.", registry=r
        )
        self.store_unavailable = Counter(
            "lorafleet_adapter_store_unavailable",
            "Adapter store calls that got no answer (unreachable, timed out, refused credentials): the version "
            "watcher's polls and requests' reads of adapters not at hand.",
            registry=r,
        )
        self.store_answered_at = Gauge(
            "lorafleet_adapter_store_last_answer_timestamp_seconds",
            "Unix time the adapter store last answered the version watcher's poll or a request's read (0: not yet).",
            registry=r,
        )
        self.keys_reloads = Counter(
            "lorafleet_keys_reloads",
            "Loads of the API keys file by result (error: it did not load and the last good keys stay).",
            ["result"],
            registry=r,
        )
        self.running = Gauge("lorafleet_running_requests", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("lorafleet_waiting_requests", "Requests queued for the running batch.", registry=r)
        self.batch_rows = Gauge("lorafleet_batch_rows", "Rows in the last forward pass.", registry=r)
        self.batch_tokens = Gauge("lorafleet_batch_tokens", "Tokens in the last forward pass.", registry=r)
        self.resident = Gauge("lorafleet_adapters_resident", "Adapter versions held, by tier.", ["tier"], registry=r)
        self.pinned = Gauge("lorafleet_adapters_pinned", "Adapter versions pinned in device slots.", registry=r)
        self.device_memory = Gauge(
            "lorafleet_device_memory_used_bytes", "Memory allocated on the accelerator (CUDA only).", registry=r
        )
        self.slot_memory = Gauge(
            "lorafleet_adapter_slot_memory_bytes",
            "Memory held by the LoRA weights of the device slots, all wrapped Linears together: per Linear, "
            "every slot padded to the largest rank a loaded adapter has on it.",
            registry=r,
        )
        self.prefix_hits = Counter(
            "lorafleet_prefix_cache_hits",
            "Prompts that reused cached K/V of at least one prefix block (same adapter version).",
            registry=r,
        )
        self.prefix_misses = Counter(
            "lorafleet_prefix_cache_misses", "Prompts that reused no cached prefix block.", registry=r
        )
        self.prefix_lookup_tokens = Counter(
            "lorafleet_prefix_cache_lookup_tokens",
            "Prompt tokens looked up in the prefix cache (all but each prompt's last).",
            registry=r,
        )
        self.prefix_hit_tokens = Counter(
            "lorafleet_prefix_cache_hit_tokens", "Prompt tokens whose K/V came from the prefix cache.", registry=r
        )
        self.prefix_evictions = Counter(
            "lorafleet_prefix_cache_evictions", "Prefix blocks evicted to stay within the byte bound.", registry=r
        )
        self.prefix_bytes = Gauge(
            "lorafleet_prefix_cache_bytes", "Memory held by cached prefix blocks (K/V).", registry=r
        )
        self.build = Info("lorafleet_build", "Server version and the model it serves.", registry=r)
        self.ready = Gauge(
            "lorafleet_ready",
            "1 while the replica serves (gRPC health SERVING); 0 while its model loads (the metrics port opens "
            "first), while it drains or stops, and once its engine has stopped taking requests.",
            registry=r,
        )
        self.draining = Gauge(
            "lorafleet_draining",
            "1 from the start of a stop (SIGTERM's drain, or SIGINT) until the process exits: not ready, and "
            "on purpose.",
            registry=r,
        )
        self.started = Gauge(
            "lorafleet_start_time_seconds",
            "Unix time this server process started (its metrics were made): how long it has been not ready, "
            "and how often it restarts.",
            registry=r,
        )
        self.started.set(time.time())
        for tier in TIERS:
            for family in (self.cache_hits, self.cache_misses, self.evictions, self.loads, self.resident):
                family.labels(tier=tier)
        for family in (self.cache_hits, self.cache_misses, self.evictions, self.loads):
            family.labels(tier=DISK_TIER)
        for reason in FinishReason:
            self.finished.labels(reason=reason.value)
        for result in KEYS_RELOAD_RESULTS:
            self.keys_reloads.labels(result=result)

    # -- engine side --------------------------------------------------------------------------
    def observe_step(self, rows: int, tokens: int) -> None:
        self.batch_rows.set(rows)
        self.batch_tokens.set(tokens)

    def observe_admitted(self, queue_seconds: float, prompt_tokens: int) -> None:
        """A request took its first row: its wait, and its prompt tokens, counted now (as the tokens
        it generates are, one by one): counted at its end, a long request moved neither counter while
        it ran, and LorafleetNoProgress paged a replica whose every request outlasted its window, and
        a failed request's tokens were never counted (an outside review)."""
        self.queue_wait.observe(queue_seconds)
        self.prompt_tokens.inc(prompt_tokens)
        self.prompt_tokens_per_request.observe(prompt_tokens)

    def observe_generated(self, tokens: int) -> None:
        self.generated_tokens.inc(tokens)

    def observe_left_queue(self, queue_seconds: float) -> None:
        """A request that ended before it got a row (cancelled, cut, failed): its wait, in the queue-wait
        histogram, which only admitted requests were in, so callers giving up in a full queue left its
        panel at zero (an outside review)."""
        self.queue_wait.observe(queue_seconds)

    def observe_preempted(self) -> None:
        self.preemptions.inc()

    def observe_first_token(self, ttft_seconds: float) -> None:
        """Time to first token, observed when the token comes: observed at the request's end, the
        histogram (and the TTFT alert) lagged by the whole generation, and a request that never ended
        was never counted (an outside review)."""
        self.ttft.observe(ttft_seconds)

    def observe_finished(self, s: Summary, pooled: bool = False, admitted: bool = True) -> None:
        """``pooled``: an Embed or Classify request (no generation: its summary's finish reason is
        "length", which the generations counter would count as a cut answer). ``admitted``: it took a
        row; one that ends before that (cancelled, its deadline passed, cut) leaves its wait in the
        queue-wait histogram (``observe_left_queue``)."""
        if not admitted:
            self.observe_left_queue(s.queue_seconds)
        if not pooled:
            self.finished.labels(reason=s.finish_reason.value).inc()
        if s.generated_tokens:
            self.generated_tokens_per_request.observe(s.generated_tokens)
        if s.ttft_seconds is not None:
            if s.generated_tokens > 1:
                self.tpot.observe(max(s.total_seconds - s.ttft_seconds, 0.0) / (s.generated_tokens - 1))

    def bind_load(self, load: Callable[[], tuple[int, int]]) -> None:
        """Gauges read at scrape time from the engine: (running, waiting)."""
        self.running.set_function(lambda: load()[0])
        self.waiting.set_function(lambda: load()[1])

    def bind_device_memory(self, read: Callable[[], float]) -> None:
        self.device_memory.set_function(read)

    def bind_slot_memory(self, read: Callable[[], float]) -> None:
        """Read at scrape time: the slot buffers grow and shrink as adapters of other ranks come and go."""
        self.slot_memory.set_function(read)

    # -- prefix cache (PrefixCacheObserver) ----------------------------------------------------
    def prefix_lookup(self, lookup_tokens: int, hit_tokens: int) -> None:
        (self.prefix_hits if hit_tokens else self.prefix_misses).inc()
        self.prefix_lookup_tokens.inc(lookup_tokens)
        self.prefix_hit_tokens.inc(hit_tokens)

    def prefix_evicted(self, blocks: int) -> None:
        self.prefix_evictions.inc(blocks)

    def bind_prefix_cache_bytes(self, read: Callable[[], float]) -> None:
        self.prefix_bytes.set_function(read)

    # -- adapter tiers ------------------------------------------------------------------------
    def adapter_event(self, tier: str, event: str) -> None:
        """Events of HostCache ("hit", "miss", "load", "evict"), DeviceSlots ("load", "evict", "unload")
        and the S3 store's disk cache (tier "disk": "hit", "miss", "load", "evict")."""
        if event == "hit":
            self.cache_hits.labels(tier=tier).inc()
        elif event == "miss":
            self.cache_misses.labels(tier=tier).inc()
        elif event in ("evict", "unload"):
            self.evictions.labels(tier=tier).inc()
        elif event == "load":
            self.loads.labels(tier=tier).inc()

    def adapter_loaded(self, source: str, seconds: float) -> None:
        self.adapter_load.labels(source=source).observe(seconds)

    def adapter_load_failed(self) -> None:
        self.load_failures.inc()

    def adapter_swapped(self) -> None:
        self.swaps.inc()

    def adapter_swap_failed(self) -> None:
        self.swap_failures.inc()

    def adapter_store_failed(self) -> None:
        self.store_unavailable.inc()

    def adapter_store_answered(self) -> None:
        self.store_answered_at.set(time.time())

    def bind_adapters(self, host: Callable[[], int], device: Callable[[], int], pinned: Callable[[], int]) -> None:
        self.resident.labels(tier="host").set_function(host)
        self.resident.labels(tier="device").set_function(device)
        self.pinned.set_function(pinned)

    def bind_residency(self, read: Callable[[], Iterable[tuple[str, str]]]) -> None:
        """``read``: (adapter version, tier) of every adapter held, at scrape time (ResidencyCollector)."""
        self.registry.register(ResidencyCollector(read))

    # -- gRPC edge ----------------------------------------------------------------------------
    def keys_reloaded(self, ok: bool) -> None:
        """A load of the keys file (KeyFileWatcher's ``on_reload``): ok, or error (last good keys kept)."""
        self.keys_reloads.labels(result="ok" if ok else "error").inc()

    def declare_rpcs(self, rpcs: Iterable[str]) -> None:
        """Export ``rpcs``' series at 0 from the start, for every code an alert or the error panels
        watch: a series first seen at 1 has no earlier sample, so ``rate`` and ``increase`` missed the
        first INTERNAL (or any rare failure) after each start (an outside review)."""
        for rpc in rpcs:
            self.request_duration.labels(rpc=rpc)
            for code in WATCHED_CODES:
                self.requests.labels(rpc=rpc, code=code)

    def observe_rpc(self, rpc: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc=rpc, code=code).inc()
        self.request_duration.labels(rpc=rpc).observe(seconds)


@dataclass(frozen=True)
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server=server, thread=thread)
