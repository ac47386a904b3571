"""A small thread-safe least-recently-used map, bounded by entries and optionally by bytes.

For what is read once per version and kept to save a re-read (manifests, prompt templates, heads):
versions are immutable, so dropping an entry only costs reading it again, and a server that sees
thousands of versions over weeks must not keep every one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruMap(Generic[K, V]):
    """Keeps at most ``max_entries`` values and, with ``size``, at most ``max_bytes`` of them.

    A value larger than ``max_bytes`` by itself is not kept. ``get`` makes an entry the most recent.
    """

    def __init__(self, max_entries: int, max_bytes: int | None = None, size: Callable[[V], int] | None = None) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if (max_bytes is None) != (size is None):
            raise ValueError("max_bytes and size go together")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is held, without making it recent."""
        with self._lock:
            return key in self._entries

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def peek(self, key: K) -> V | None:
        """The value held for ``key`` (None: none), without making it recent."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: K, value: V) -> None:
        nbytes = self._size(value) if self._size is not None else 0
        with self._lock:
            self._drop(key)
            if self._max_bytes is not None and nbytes > self._max_bytes:
                return
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            while len(self._entries) > self._max_entries or (
                self._max_bytes is not None and self._bytes > self._max_bytes
            ):
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def pop(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            self._drop(key)
            return None if entry is None else entry[0]

    def _drop(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]
