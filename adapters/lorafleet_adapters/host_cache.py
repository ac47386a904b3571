"""The host (CPU) tier: adapter weights kept in memory, LRU, bounded by bytes.

Thread-safe. Concurrent `get_or_load` calls for the same missing key run the loader once (single
flight): the others wait for it and receive the same object, or the same exception, which is not
cached. Events ("hit", "miss", "evict") are reported outside the lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from lorafleet_adapters.peft_format import AdapterWeights
from lorafleet_adapters.ref import AdapterKey


class _Flight:
    """One load in progress, shared by everybody waiting for the same key."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: AdapterWeights | None = None
        self.error: BaseException | None = None


class HostCache:
    def __init__(self, max_bytes: int, on_event: Callable[[str], None] | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._max_bytes = max_bytes
        self._on_event = on_event
        self._lock = threading.Lock()
        self._items: OrderedDict[AdapterKey, AdapterWeights] = OrderedDict()
        self._flights: dict[AdapterKey, _Flight] = {}
        self._nbytes = 0

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes

    def get(self, key: AdapterKey, count: bool = True) -> AdapterWeights | None:
        """The cached weights of `key` (marking them recently used, counted as a hit unless ``count`` is
        False: a lookup repeated for one request), or None.

        A miss is not counted here: the caller then loads through ``get_or_load``, which counts it.
        """
        with self._lock:
            weights = self._items.get(key)
            if weights is not None:
                self._items.move_to_end(key)
        if weights is not None and count:
            self._emit(["hit"])
        return weights

    def __contains__(self, key: object) -> bool:
        """Whether `key` is cached, without touching its recency (for status queries)."""
        with self._lock:
            return key in self._items

    def keys(self) -> list[AdapterKey]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def evict(self, key: AdapterKey) -> bool:
        with self._lock:
            weights = self._items.pop(key, None)
            if weights is not None:
                self._nbytes -= weights.nbytes
        if weights is None:
            return False
        self._emit(["evict"])
        return True

    def get_or_load(self, key: AdapterKey, loader: Callable[[], AdapterWeights]) -> AdapterWeights:
        with self._lock:
            weights = self._items.get(key)
            if weights is not None:
                self._items.move_to_end(key)
            flight = self._flights.get(key) if weights is None else None
            leader = weights is None and flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        if weights is not None:
            self._emit(["hit"])
            return weights
        assert flight is not None
        if not leader:
            self._emit(["hit"])  # served by a load already in flight: no second load
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None
            return flight.result
        return self._lead(key, flight, loader)

    def _lead(self, key: AdapterKey, flight: _Flight, loader: Callable[[], AdapterWeights]) -> AdapterWeights:
        try:
            self._emit(["miss"])
            weights = loader()
        except BaseException as exc:
            flight.error = exc
            with self._lock:
                del self._flights[key]
            flight.done.set()
            raise
        flight.result = weights
        with self._lock:
            del self._flights[key]
            events = ["load", *self._insert(key, weights)]
        flight.done.set()
        self._emit(events)
        return weights

    def _insert(self, key: AdapterKey, weights: AdapterWeights) -> list[str]:
        """Keep `weights` if they fit, evicting least recently used items; caller holds the lock."""
        events: list[str] = []
        if weights.nbytes > self._max_bytes:
            return events
        old = self._items.pop(key, None)
        if old is not None:
            self._nbytes -= old.nbytes
        while self._items and self._nbytes + weights.nbytes > self._max_bytes:
            _, victim = self._items.popitem(last=False)
            self._nbytes -= victim.nbytes
            events.append("evict")
        self._items[key] = weights
        self._nbytes += weights.nbytes
        return events

    def _emit(self, events: list[str]) -> None:
        if self._on_event is not None:
            for event in events:
                self._on_event(event)
