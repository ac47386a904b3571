"""Store → host cache → device slots, as the engine sees it.

Host loads (disk read, checksum, header check, tensor conversion) run on a small thread pool so the
engine keeps stepping; installing into a device slot happens on the engine thread between steps.
Concurrent requests for the same cold adapter share one load (single flight).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from lorafleet_adapters.device_slots import DeviceSlots
from lorafleet_adapters.errors import AdapterError
from lorafleet_adapters.host_cache import HostCache
from lorafleet_adapters.manifest import Manifest
from lorafleet_adapters.peft_format import AdapterWeights, BaseModelSpec
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.engine.versions import VersionWatcher
from lorafleet_server.errors import AdapterBusy

log = logging.getLogger(__name__)


class AdapterObserver(Protocol):
    def adapter_event(self, tier: str, event: str) -> None: ...
    def adapter_loaded(self, source: str, seconds: float) -> None: ...
    def adapter_load_failed(self) -> None: ...
    def adapter_swapped(self) -> None: ...
    def adapter_swap_failed(self) -> None: ...


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


class AdapterManager:
    def __init__(
        self,
        store: AdapterStore,
        spec: BaseModelSpec,
        host_cache: HostCache,
        slots: DeviceSlots,
        *,
        load_workers: int = 2,
        observer: AdapterObserver | None = None,
        poll_seconds: float = 0.0,
    ) -> None:
        self.store = store
        self.spec = spec
        self.host_cache = host_cache
        self.slots = slots
        self._executor = ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix="adapter-load")
        self._pending: dict[AdapterKey, Future[AdapterWeights]] = {}
        self._lock = threading.Lock()  # guards the two small caches below (any thread)
        self._manifests: dict[AdapterKey, Manifest] = {}
        self._prompts: dict[AdapterKey, PromptTemplate] = {}
        self.observer: AdapterObserver = observer or _NullAdapterObserver()
        self.versions = VersionWatcher(store, self.verify, self.observer, poll_seconds)
        self._wake: Callable[[], None] = lambda: None

    def set_wake(self, wake: Callable[[], None]) -> None:
        """Called when a background load finishes, so the engine polls again."""
        self._wake = wake

    # -- any thread ---------------------------------------------------------------------------
    def resolve(self, ref: AdapterRef) -> AdapterKey:
        """Pin a reference to one concrete version: the one this server serves for it (versions.py)."""
        return self.versions.resolve(ref)

    def kind(self, key: AdapterKey) -> str:
        """ "lora" or "prompt" (manifests are immutable, so they are read once)."""
        with self._lock:
            manifest = self._manifests.get(key)
        if manifest is None:
            try:
                manifest = self.store.manifest(key)
            except AdapterError:
                self.observer.adapter_load_failed()
                raise
            with self._lock:
                self._manifests[key] = manifest
        return manifest.kind

    def prompt(self, key: AdapterKey) -> PromptTemplate:
        """A prompt adapter's template, verified against its manifest on first use."""
        with self._lock:
            template = self._prompts.get(key)
        if template is None:
            try:
                template = self.store.load_prompt(key)
            except AdapterError:
                self.observer.adapter_load_failed()
                raise
            with self._lock:
                self._prompts[key] = template
        return template

    def verify(self, key: AdapterKey) -> None:
        """Check a version end to end (files, base, shapes) and keep it in host memory."""
        if self.kind(key) == "prompt":
            self.prompt(key)
        else:
            self.host_weights(key)

    def host_weights(self, key: AdapterKey) -> AdapterWeights:
        """Load (verify) a version into host memory, or return it from there; blocks."""
        return self.host_cache.get_or_load(key, lambda: self._load_from_store(key))

    def close(self) -> None:
        self.versions.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- engine thread only -------------------------------------------------------------------
    def poll(self, key: AdapterKey) -> int | None:
        """Lease ``key``'s device slot if ready; else start or follow its load and return None.

        Raises the adapter's error if its load failed (the next request for it tries again).
        """
        slot = self.slots.acquire(key)
        if slot is not None:
            self.observer.adapter_event("device", "hit")
            return slot
        weights = self._host_weights(key)
        if weights is None:
            return None
        started = time.perf_counter()
        if self.slots.install(key, weights) is None:
            if not self.slots.can_ever_install():
                raise AdapterBusy(f"every device slot is pinned; cannot load {key}")
            return None  # all slots leased: wait for a request to finish
        self.observer.adapter_event("device", "miss")
        self.observer.adapter_loaded("host", time.perf_counter() - started)
        return self.slots.acquire(key)

    def release(self, slot: int) -> None:
        self.slots.release(slot)

    def pin(self, key: AdapterKey) -> bool:
        return self.slots.pin(key)

    def unpin(self, key: AdapterKey) -> bool:
        return self.slots.unpin(key)

    def unload(self, key: AdapterKey) -> bool:
        return self.slots.unload(key)

    def _host_weights(self, key: AdapterKey) -> AdapterWeights | None:
        cached = self.host_cache.get(key)
        if cached is not None:
            return cached
        future = self._pending.get(key)
        if future is None:
            future = self._executor.submit(self.host_weights, key)
            future.add_done_callback(lambda _f: self._wake())
            self._pending[key] = future
            return None
        if not future.done():
            return None
        del self._pending[key]
        try:
            return future.result()
        except AdapterError as exc:
            log.warning("loading adapter %s failed: %s", key, exc)
            self.observer.adapter_load_failed()
            raise

    def _load_from_store(self, key: AdapterKey) -> AdapterWeights:
        started = time.perf_counter()
        weights = self.store.load(key, self.spec)
        seconds = time.perf_counter() - started
        self.observer.adapter_loaded("store", seconds)
        log.info("adapter %s read from the store in %.3fs (%d bytes)", key, seconds, weights.nbytes)
        return weights
