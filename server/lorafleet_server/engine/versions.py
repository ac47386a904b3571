"""Which version "tenant/name" means on this server, and hot swap to newly published versions.

A reference without ``@version`` resolves to the version this server serves for that adapter. The
first use takes the store's latest; afterwards a watcher polls the store (and ``refresh()`` runs a
pass now) and moves an adapter to a newly published version only once that version has been
verified and loaded into host memory (checksums, base fingerprint, shapes). A version that fails is
refused and reported, and the previous one keeps serving. Requests already admitted are pinned to
their version and never see a swap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from lorafleet_adapters.backend import Store
from lorafleet_adapters.errors import AdapterError, StoreUnavailable
from lorafleet_adapters.ref import AdapterKey, AdapterRef

log = logging.getLogger(__name__)


class SwapObserver(Protocol):
    def adapter_swapped(self) -> None: ...
    def adapter_swap_failed(self) -> None: ...


@dataclass(frozen=True)
class Swap:
    adapter: str  # "tenant/name"
    from_version: int
    to_version: int


@dataclass(frozen=True)
class SwapFailure:
    adapter: str
    version: int
    error: str


@dataclass(frozen=True)
class RefreshResult:
    swaps: tuple[Swap, ...] = ()
    failures: tuple[SwapFailure, ...] = ()


@dataclass
class _Tracked:
    version: int
    refused: set[int] = field(default_factory=set)


class VersionWatcher:
    def __init__(
        self,
        store: Store,
        verify: Callable[[AdapterKey], object],
        observer: SwapObserver,
        poll_seconds: float,
        superseded: Callable[[AdapterKey, AdapterKey], None] = lambda _old, _new: None,
    ) -> None:
        """``verify`` checks a version before it serves; ``superseded(old, new)`` is told after each swap,
        so the tiers can let go of the version nothing resolves to by name any more."""
        self._store = store
        self._verify = verify
        self._superseded = superseded
        self._observer = observer
        self._poll_seconds = poll_seconds
        self._tracked: dict[tuple[str, str], _Tracked] = {}
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()  # one pass at a time (poller and admin calls)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def resolve(self, ref: AdapterRef) -> AdapterKey:
        if ref.version is not None:
            return self._store.resolve(ref)
        name = (ref.tenant, ref.name)
        with self._lock:
            tracked = self._tracked.get(name)
        if tracked is not None:
            return AdapterKey(ref.tenant, ref.name, tracked.version)
        key = self._store.resolve(ref)  # first use: the latest published version
        with self._lock:
            tracked = self._tracked.setdefault(name, _Tracked(version=key.version))
            return AdapterKey(ref.tenant, ref.name, tracked.version)

    def serving(self) -> dict[str, int]:
        with self._lock:
            return {f"{t}/{n}": tr.version for (t, n), tr in self._tracked.items()}

    def refresh(self) -> RefreshResult:
        """One pass: move each tracked adapter to its store's latest version if that one verifies."""
        swaps: list[Swap] = []
        failures: list[SwapFailure] = []
        with self._refresh_lock:
            with self._lock:
                names = list(self._tracked)
            for tenant, name in names:
                ref = AdapterRef(tenant, name, None)
                try:
                    latest = self._store.resolve(ref).version
                except AdapterError as exc:
                    log.warning("adapter %s: cannot read its latest version: %s", ref, exc)
                    continue
                with self._lock:
                    tracked = self._tracked[(tenant, name)]
                    if latest == tracked.version or latest in tracked.refused:
                        continue
                    current = tracked.version
                key = AdapterKey(tenant, name, latest)
                try:
                    self._verify(key)
                except StoreUnavailable as exc:  # the store, not the version: try again next pass
                    log.warning("adapter %s: cannot fetch version %d now (%d serves): %s", ref, latest, current, exc)
                    continue
                except AdapterError as exc:
                    with self._lock:
                        tracked.refused.add(latest)
                    self._observer.adapter_swap_failed()
                    log.error("adapter %s: version %d refused, %d keeps serving: %s", ref, latest, current, exc)
                    failures.append(SwapFailure(str(ref), latest, str(exc)))
                    continue
                with self._lock:
                    tracked.version = latest
                self._observer.adapter_swapped()
                log.info("adapter %s: swapped version %d -> %d (new publish verified)", ref, current, latest)
                swaps.append(Swap(str(ref), current, latest))
                self._superseded(AdapterKey(tenant, name, current), key)
        return RefreshResult(tuple(swaps), tuple(failures))

    def start(self) -> None:
        if self._poll_seconds <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="adapter-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            try:
                self.refresh()
            except Exception:  # keep watching: the next pass may succeed
                log.exception("adapter watch pass failed")
