"""Store → host cache → device slots, as the engine sees it.

Host loads (disk read, checksum, header check, conversion to the slots' dtype and layout) run on a
small thread pool so the engine keeps stepping; installing into a device slot happens on the engine
thread between steps. Each load is logged with its time (``read from the store in``, ``written to
device slot ... in``), which bench/zipf.py reads per adapter shape.
Concurrent requests for the same cold adapter share one load (single flight).

Everything outside the engine package (admin included) goes through these methods rather than the
store, host cache or slots themselves, so loads are counted in one place and the engine-thread-only
rule for device slots is stated once, on the methods below.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Protocol

import torch

from lorafleet_adapters.backend import Store
from lorafleet_adapters.device_slots import DeviceSlots, SlotInfo
from lorafleet_adapters.errors import AdapterError, AdapterFormatError
from lorafleet_adapters.head import ClassifierHead, load_head
from lorafleet_adapters.host_cache import HostCache
from lorafleet_adapters.lru import LruMap
from lorafleet_adapters.manifest import Manifest, check_servable
from lorafleet_adapters.peft_format import AdapterWeights, BaseModelSpec, Transposer
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_adapters.store import AdapterSummary
from lorafleet_server.engine.store_gate import StoreGate
from lorafleet_server.engine.versions import FULL_RESCAN_SECONDS, RefreshResult, VersionWatcher
from lorafleet_server.errors import AdapterBusy

log = logging.getLogger(__name__)

ABANDONED_LOAD_SECONDS = 30.0  # a finished load no request polls for this long is forgotten
# Engine steps an adapter's weights wait, every slot leased, before a slot is reserved for it.
SLOT_WAIT_STEPS = 16
# Versions are immutable, so these keep what was read to save reading it again; least recently used
# out first. Beside --host-cache-bytes (LoRA weights) a server holds at most this much of the others.
MANIFESTS_KEPT = 4096  # ~4 KB each
PROMPT_BYTES_KEPT = 64 << 20  # templates are at most 256 KiB each
HEAD_BYTES_KEPT = 256 << 20  # a head is [labels, hidden] float32: 2.4 MB at 1,024 labels of SmolLM2
SMALL_ENTRIES_KEPT = 4096


class Tier(enum.Enum):
    """Where a version's weights are: the store (disk), host memory, or a device slot."""

    STORE = "store"
    HOST = "host"
    DEVICE = "device"


class AdapterObserver(Protocol):
    def adapter_event(self, tier: str, event: str) -> None: ...
    def adapter_loaded(self, source: str, seconds: float) -> None: ...
    def adapter_load_failed(self) -> None: ...
    def adapter_swapped(self) -> None: ...
    def adapter_swap_failed(self) -> None: ...
    def adapter_store_failed(self) -> None: ...
    def adapter_store_answered(self) -> None: ...


class _NullAdapterObserver:
    def adapter_event(self, tier: str, event: str) -> None:
        return None

    def adapter_loaded(self, source: str, seconds: float) -> None:
        return None

    def adapter_load_failed(self) -> None:
        return None

    def adapter_swapped(self) -> None:
        return None

    def adapter_swap_failed(self) -> None:
        return None

    def adapter_store_failed(self) -> None:
        return None

    def adapter_store_answered(self) -> None:
        return None


class AdapterManager:
    def __init__(
        self,
        store: Store,
        spec: BaseModelSpec,
        host_cache: HostCache,
        slots: DeviceSlots,
        *,
        load_workers: int = 2,
        observer: AdapterObserver | None = None,
        poll_seconds: float = 0.0,
        rescan_seconds: float = FULL_RESCAN_SECONDS,
        host_dtype: torch.dtype = torch.float32,
        host_transpose: Transposer | None = None,
    ) -> None:
        self.store = store
        self.spec = spec
        # Host weights are kept in the slots' dtype and layout, so installing one is a plain copy and a
        # bf16 server's host cache holds twice the adapters (the values equal what a copy of the fp32
        # weights into the slots gives: the scaling is applied in fp32 and rounded once).
        self.host_dtype = host_dtype
        self.host_transpose = host_transpose  # lays them out (the server's native kernel; None: portable)
        self.host_cache = host_cache
        self.slots = slots
        self._executor = ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix="adapter-load")
        self._pending: dict[AdapterKey, Future[AdapterWeights]] = {}
        # When the engine thread first saw each pending load done: a load nobody polls again (its
        # requests were cancelled or timed out) is dropped ABANDONED_LOAD_SECONDS later, not kept.
        self._done_seen: dict[AdapterKey, float] = {}
        self._next_sweep = 0.0
        self._lock = threading.Lock()  # guards _retired (any thread)
        self._manifests: LruMap[AdapterKey, Manifest] = LruMap(MANIFESTS_KEPT)
        self._prompts: LruMap[AdapterKey, PromptTemplate] = LruMap(
            SMALL_ENTRIES_KEPT, PROMPT_BYTES_KEPT, lambda template: len(template.to_json())
        )
        self._heads: LruMap[AdapterKey, ClassifierHead] = LruMap(SMALL_ENTRIES_KEPT, HEAD_BYTES_KEPT, _head_bytes)
        self.observer: AdapterObserver = observer or _NullAdapterObserver()
        # A request's store reads go through it: refused at once for a while after the store did not answer.
        self.gate = StoreGate(
            on_failed=lambda: self.observer.adapter_store_failed(),
            on_answered=lambda: self.observer.adapter_store_answered(),
            round_trips=getattr(store, "round_trips", None),  # an S3 store's; a directory has no cache
        )
        self.versions = VersionWatcher(
            store,
            lambda key: self.verify(key, count_failures=False),  # a refused version counts as a failed swap
            self.observer,
            poll_seconds,
            self._superseded,
            rescan_seconds=rescan_seconds,
            gate=self.gate,
            servable=self._servable,
        )
        self._blocked_since: dict[AdapterKey, int] = {}  # engine step each adapter's install first failed
        self._retired: list[tuple[AdapterKey, AdapterKey]] = []  # (old, new) swaps to retire (lock guards)
        self._wake: Callable[[], None] = lambda: None
        self._prompt_fits: Callable[[PromptTemplate], None] = lambda _template: None

    def set_prompt_check(self, fits: Callable[[PromptTemplate], None]) -> None:
        """``fits`` raises (``AdapterIncompatible``) for a prompt adapter's template no request could
        follow within the context; ``verify`` runs it, so such a version is never swapped to."""
        self._prompt_fits = fits

    def set_wake(self, wake: Callable[[], None]) -> None:
        """Called when a background load finishes, so the engine polls again."""
        self._wake = wake

    # -- any thread ---------------------------------------------------------------------------
    def resolve(self, ref: AdapterRef) -> AdapterKey:
        """Pin a reference to one concrete version: the one this server serves for it (versions.py).
        A version asked for by number whose manifest is held exists (versions are immutable and never
        deleted): no store read, so it serves while the store does not answer, as its name does."""
        if ref.version is not None:
            key = AdapterKey(ref.tenant, ref.name, ref.version)
            if key in self._manifests:
                return key
        return self.versions.resolve(ref)

    def _servable(self, key: AdapterKey) -> None:
        """Refuse a version this server cannot serve, with the checks a swap to it runs short of loading
        LoRA weights: its manifest (base, prompt format), a prompt adapter's template against the
        context, a head's files and width. A name's first use takes the newest version that passes, so a
        replica new to the name agrees with those whose watcher refused the newer ones."""
        manifest = self.manifest(key)
        check_servable(key, manifest, self.spec)
        if manifest.kind == "prompt":
            self._prompt_fits(self.prompt(key))
        elif manifest.kind == "head":
            self.head(key)

    def known_without_store(self, ref: AdapterRef) -> bool:
        """Whether admitting a request for ``ref`` reads nothing from the store: its version is known,
        and that version's manifest is kept, and its template or head where it is of those kinds (a
        hint for where to admit it; no side effect)."""
        key = self.versions.peek(ref)
        manifest = self._manifests.peek(key) if key is not None else None
        if key is None or manifest is None:
            return False
        if manifest.kind == "prompt":
            return key in self._prompts
        if manifest.kind == "head":
            return key in self._heads
        return True

    def kind(self, key: AdapterKey, count_failures: bool = True) -> str:
        """ "lora", "prompt" or "head" (manifests are immutable, so they are read once).

        ``count_failures``: a failure counts as a failed adapter load (not when the version watcher
        checks a new version: that one counts as a failed swap, once)."""
        with self._load_failures(count_failures):
            return self.manifest(key).kind

    def prompt(self, key: AdapterKey, count_failures: bool = True) -> PromptTemplate:
        """A prompt adapter's template, verified against its manifest on first use."""
        template = self._prompts.get(key)
        if template is None:
            with self._load_failures(count_failures), self.gate.call(f"read prompt adapter {key}"):
                template = self.store.load_prompt(key)
            self._prompts.put(key, template)
        return template

    def head(self, key: AdapterKey, count_failures: bool = True) -> ClassifierHead:
        """A classifier head, verified (checksums, base, shapes) on first use and then kept in memory.

        Heads are small ([labels, hidden] floats) and run on the engine thread after the pooled
        forward, so they take no device slot; the LoRA version they read features from does.
        """
        head = self._heads.get(key)
        if head is None:
            with self._load_failures(count_failures), self.gate.call(f"read head {key}"):
                head = load_head(self.store, key, self.spec)
            self._heads.put(key, head)
        return head

    @contextmanager
    def _load_failures(self, counted: bool) -> Iterator[None]:
        """An AdapterError inside is counted as a failed adapter load (when ``counted``), then raised."""
        try:
            yield
        except AdapterError:
            if counted:
                self.observer.adapter_load_failed()
            raise

    def verify(self, key: AdapterKey, count_failures: bool = True) -> None:
        """Check a version end to end (files, base, shapes) and keep it in host memory."""
        kind = self.kind(key, count_failures)
        if kind == "prompt":
            with self._load_failures(count_failures):
                self._prompt_fits(self.prompt(key, count_failures))
        elif kind == "head":
            head = self.head(key, count_failures)
            if head.features_from is not None:
                source = self.kind(head.features_from, count_failures)
                if source != "lora":  # a head naming a head (or itself)
                    raise AdapterFormatError(f"{key}: features_from {head.features_from} is a {source}, not a LoRA")
                self.host_weights(head.features_from)
        else:
            self.host_weights(key)

    def host_weights(self, key: AdapterKey) -> AdapterWeights:
        """Load (verify) a version into host memory, or return it from there; blocks."""
        return self.host_cache.get_or_load(key, lambda: self._load_from_store(key))

    def on_host(self, key: AdapterKey) -> bool:
        """Whether ``key``'s weights are in host memory, without touching their recency (for views)."""
        return key in self.host_cache

    def list_store(
        self, tenant: str | None = None, after: tuple[str, str] | None = None, limit: int | None = None
    ) -> list[AdapterSummary]:
        """The adapters in the store (of one tenant), with their versions and latest pointers: those
        after ``after`` (tenant, name) in tenant and name order, at most ``limit`` (None: all). Through
        the store gate, as the reads below: while the store does not answer, a listing (``/v1/models``,
        ``ListAdapters``) is refused at once instead of holding a thread for a timeout each time; a
        listing's own failure does not close the gate for the other reads (``trips=False``)."""
        with self.gate.call("list the adapters", trips=False):
            return self.store.list(tenant, after=after, limit=limit)

    def store_versions(self, ref: AdapterRef) -> tuple[int, ...]:
        """Published versions of ``tenant/name`` (empty when there are none); ``ref.version`` is ignored."""
        with self.gate.call(f"list {ref.tenant}/{ref.name}'s versions", trips=False):
            return self.store.versions(ref.tenant, ref.name)

    def store_latest(self, ref: AdapterRef) -> int:
        """The store's latest version of ``tenant/name``, which may be newer than the one served.

        :meth:`resolve` gives the served one; this is what a listing reports as "latest".
        """
        with self.gate.call(f"find {ref.tenant}/{ref.name}'s latest version"):
            return self.store.resolve(ref).version

    def manifest(self, key: AdapterKey) -> Manifest:
        """``key``'s manifest, read from the store once while kept (a broken one raises its error, each time)."""
        manifest = self._manifests.get(key)
        if manifest is None:
            with self.gate.call(f"read {key}'s manifest"):
                manifest = self.store.manifest(key)
            self._manifests.put(key, manifest)
        return manifest

    def refresh(self) -> RefreshResult:
        """Look for newly published versions now (the watcher also does this every poll interval)."""
        return self.versions.refresh()

    def close(self) -> None:
        self.versions.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _superseded(self, old: AdapterKey, new: AdapterKey) -> None:
        """A swap moved ``old``'s name to ``new``: the engine thread retires ``old`` before its next step."""
        with self._lock:
            self._retired.append((old, new))
        self._wake()

    # -- engine thread only (DeviceSlots has one owner, so no slot is written while a forward reads it)
    def retire_superseded(self) -> None:
        """Let go of versions that hot swaps replaced: a superseded version's device slot is freed now,
        or when its last request ends, and it leaves host memory. Only an explicit ``@version`` request
        can still reach it, and that loads it again. A pinned version stays on both tiers."""
        with self._lock:
            retired, self._retired = self._retired, []
        for old, new in retired:
            cause = f"superseded by {new}"
            if not self.slots.retire(old, cause):
                log.info("adapter %s stays in its device slot although %s: it is pinned", old, cause)
                continue
            self._prompts.pop(old)
            self._heads.pop(old)
            if self.host_cache.evict(old):
                log.info("adapter %s left host memory (%s)", old, cause)

    def drop_abandoned_loads(self, now: float) -> int:
        """Forget background loads that ended ABANDONED_LOAD_SECONDS ago and that no request polled since
        (their requests were cancelled or timed out). Their weights are in the host cache, bounded by its
        bytes, or evicted from it; a failed one's error is not replayed to a request much later. Without
        this each kept its adapter's host weights outside ``--host-cache-bytes`` for good. Returns how
        many it dropped; sweeps at most once a second."""
        if now < self._next_sweep:
            return 0
        self._next_sweep = now + 1.0
        dropped = 0
        for key, future in list(self._pending.items()):
            if not future.done():
                continue
            seen = self._done_seen.setdefault(key, now)
            if now - seen >= ABANDONED_LOAD_SECONDS:
                del self._pending[key]
                del self._done_seen[key]
                dropped += 1
                log.info("adapter %s: a background load no request polled for %.0fs was dropped", key, now - seen)
        return dropped

    def poll(self, key: AdapterKey, first: bool = True, step: int = 0) -> int | None:
        """Lease ``key``'s device slot if ready; else start or follow its load and return None.

        ``first``: the request's first poll. A request waiting for a free slot is polled every engine
        step; only its first lookup counts on the host tier (each step counted a hit: the host hit
        ratio read ~100% exactly while slots were contended). ``step``: the engine's step count; an
        adapter whose weights have waited ``SLOT_WAIT_STEPS`` for a slot, every slot leased, gets one
        reserved (``DeviceSlots.reserve_for``).
        Raises the adapter's error if its load failed (the next request for it tries again).
        """
        slot = self.slots.acquire(key)
        if slot is not None:
            self.observer.adapter_event("device", "hit")
            return slot
        if key in self.slots:  # resident, its slot reserved for another adapter: wait until that one is in
            return None
        weights = self._host_weights(key, count=first)
        if weights is None:
            return None
        if self._install(key, weights) is None:
            if not self.slots.can_ever_install():
                raise AdapterBusy(f"every device slot is pinned; cannot load {key}")
            since = self._blocked_since.setdefault(key, step)
            if step - since >= SLOT_WAIT_STEPS:
                self.slots.reserve_for(key)
            return None  # all slots leased: wait for a request to finish
        self._blocked_since.pop(key, None)
        self.observer.adapter_event("device", "miss")
        return self.slots.acquire(key)

    def prefetch(self, key: AdapterKey, weights: AdapterWeights) -> Tier:
        """Put ``key`` (whose ``weights`` the caller brought to the host) into a device slot, unleased.

        Engine thread only (admin runs it through ``Engine.run``). The load is counted like a
        request-driven one; a version already resident is left as it is. Raises ``AdapterBusy`` when
        every slot is leased or pinned: the version stays on the host tier.
        """
        if key in self.slots.snapshot():
            return Tier.DEVICE
        if self._install(key, weights) is None:
            raise AdapterBusy(f"every device slot is in use; {key} stays on the host tier")
        return Tier.DEVICE

    def slot_snapshot(self) -> dict[AdapterKey, SlotInfo]:
        """Resident versions with their slot, leases and pin. Engine thread only: slots change between steps."""
        return self.slots.snapshot()

    def resident(self, key: AdapterKey) -> bool:
        """Whether ``key`` sits in a device slot now (no lease taken). Engine thread only."""
        return key in self.slots

    def can_start(self, key: AdapterKey) -> bool:
        """Whether a request of ``key`` could take its slot now (resident, the slot not reserved for
        another adapter). Engine thread only."""
        return self.slots.can_acquire(key)

    def draining(self, step: int) -> tuple[int, AdapterKey, int] | None:
        """(the slot reserved for an adapter, that adapter, the engine steps its weights have waited
        for a slot), or None when no slot drains. Engine thread only."""
        reserved = self.slots.reserved_slot()
        if reserved is None:
            return None
        slot, key = reserved
        since = self._blocked_since.get(key)
        return None if since is None else (slot, key, step - since)

    @property
    def tracks_waits(self) -> bool:
        """Whether ``still_waiting`` has anything to forget (engine thread only)."""
        return bool(self._blocked_since) or self.slots.reservation() is not None

    def still_waiting(self, keys: set[AdapterKey]) -> None:
        """The adapters requests still wait a slot for (engine thread, each admission): the wait of any
        other is forgotten, and a slot reserved for an adapter nobody waits for any more (its requests
        cancelled or expired) goes back to its own."""
        for key in [k for k in self._blocked_since if k not in keys]:
            del self._blocked_since[key]
        reserved = self.slots.reservation()
        if reserved is not None and reserved not in keys:
            self.slots.drop_reservation()

    def release(self, slot: int) -> None:
        self.slots.release(slot)

    def pin(self, key: AdapterKey) -> bool:
        """Pin a resident version so it is never evicted; False when it is not resident. Engine thread only."""
        return self.slots.pin(key)

    def unpin(self, key: AdapterKey) -> bool:
        """Make a version evictable again; False when it is not resident. Engine thread only."""
        return self.slots.unpin(key)

    def unload(self, key: AdapterKey) -> bool:
        """Free ``key``'s slot now if idle (True), else when its last lease ends (False). Engine thread only."""
        return self.slots.unload(key)

    def _install(self, key: AdapterKey, weights: AdapterWeights) -> int | None:
        """Write host weights into a device slot, timed as a host → device load; None when no slot is free."""
        started = time.perf_counter()
        slot = self.slots.install(key, weights)
        if slot is not None:
            seconds = time.perf_counter() - started
            self.observer.adapter_loaded("host", seconds)
            log.info("adapter %s written to device slot %d in %.4fs", key, slot, seconds)
        return slot

    def _host_weights(self, key: AdapterKey, count: bool = True) -> AdapterWeights | None:
        """The host weights of ``key`` if ready, else None while a background load runs (started here).

        A load this manager started is followed to its end first, so each lookup is counted once on
        the host tier: a hit here, or the miss of the load.
        """
        future = self._pending.get(key)
        if future is not None:
            if not future.done():
                return None
            del self._pending[key]
            self._done_seen.pop(key, None)
            try:
                return future.result()
            except AdapterError as exc:
                log.warning("loading adapter %s failed: %s", key, exc)
                self.observer.adapter_load_failed()
                raise
            except Exception:  # not the adapter's own error: a bug, logged with its traceback by the caller
                self.observer.adapter_load_failed()
                raise
        cached = self.host_cache.get(key, count)
        if cached is not None:
            return cached
        future = self._executor.submit(self.host_weights, key)
        future.add_done_callback(lambda _f: self._wake())
        self._pending[key] = future
        return None

    def _load_from_store(self, key: AdapterKey) -> AdapterWeights:
        started = time.perf_counter()
        with self.gate.call(f"load {key}"):
            weights = self.store.load(key, self.spec, dtype=self.host_dtype, transpose=self.host_transpose)
        seconds = time.perf_counter() - started
        self.observer.adapter_loaded("store", seconds)
        log.info("adapter %s read from the store in %.4fs (%d bytes on the host)", key, seconds, weights.nbytes)
        return weights


def _head_bytes(head: ClassifierHead) -> int:
    return head.weight.nbytes + head.bias.nbytes + sum(len(label) for label in head.labels)
