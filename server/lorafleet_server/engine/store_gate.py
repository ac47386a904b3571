"""Fail fast while the adapter store does not answer (a circuit breaker on the request path).

An S3 store that stops answering (a stalled endpoint accepts connections, then sends nothing) holds
each call for its read timeout times its attempts, ~47 s. Every request for an adapter this server
does not hold reads the store on its way in, so each waited that long before its ``UNAVAILABLE``,
holding a thread meanwhile. Once a store call on the request path (or the watcher's poll) has failed
with ``StoreUnavailable``, the gate refuses such reads at once for ``retry_seconds``, with the error
that tripped it; then one call at a time probes the store, and the first that gets an answer (any
answer: "not found" is the store speaking) opens the way again. Adapters already at hand never pass
through it, so they keep serving.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lorafleet_adapters.errors import AdapterError, StoreUnavailable

STORE_RETRY_SECONDS = 5.0


class StoreGate:
    """Any thread."""

    def __init__(
        self,
        retry_seconds: float = STORE_RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_failed: Callable[[], None] = lambda: None,
        on_answered: Callable[[], None] = lambda: None,
        round_trips: Callable[[], int] | None = None,
    ) -> None:
        """``on_failed`` / ``on_answered``: told of each call that got no answer or one (the metrics).
        ``round_trips``: the store's count of requests the calling thread sent (an S3 store's; another
        thread's, the watcher's, are not the call's), so a call its caches answered
        is no verdict on the store (a probe answered from the disk cache reopened the gate mid-outage, and
        kept the "last answered" gauge fresh); None: every call reads the store itself (a directory)."""
        self._retry_seconds = retry_seconds
        self._round_trips = round_trips
        self._on_failed = on_failed
        self._on_answered = on_answered
        self._clock = clock
        self._lock = threading.Lock()
        self._closed_until: float | None = None  # None: the store answers; else refuse until then
        self._error = ""
        self._probing = False  # a call is finding out whether the store answers again

    @property
    def tripped(self) -> bool:
        with self._lock:
            return self._closed_until is not None

    @contextmanager
    def call(self, what: str, *, trips: bool = True) -> Iterator[None]:
        """Run a store call on the request path: refused at once (``StoreUnavailable``) while the gate
        is closed; its outcome opens or closes the gate. ``what`` says what the call was for.
        ``trips=False`` (listings): its failure closes the gate only when it was the probe; one that
        fails while the gate is open (a tenant's folder that does not list) is its own caller's error,
        not a verdict on the store for every other tenant's reads (the diff review)."""
        probe = self._enter(what)
        sent = self._round_trips() if self._round_trips is not None else None
        try:
            yield
        except StoreUnavailable as exc:
            if trips or probe:
                self.failed(str(exc), probe=probe)
            else:
                self._on_failed()  # counted as a call that got no answer
            raise
        except (AdapterError, OSError):  # the store answered (not found, a bad file...), or a cache did
            self._answered_if_asked(sent, probe)
            raise
        except BaseException:  # not the store's doing: a probe in flight ends without a verdict
            if probe:
                self._leave()
            raise
        self._answered_if_asked(sent, probe)

    def _answered_if_asked(self, sent: int | None, probe: bool) -> None:
        if sent is None or self._round_trips is None or self._round_trips() != sent:
            self.answered()
        elif probe:  # answered from a cache: no news of the store
            self._leave()

    def failed(self, error: str, *, probe: bool = False) -> None:
        """The store did not answer: refuse its calls for ``retry_seconds``. ``probe``: the call that was
        finding out (only its own outcome ends the probe: another call's, or the watcher's, left a second
        probe free to start while the first still waited)."""
        with self._lock:
            self._closed_until = self._clock() + self._retry_seconds
            self._error = error
            if probe:
                self._probing = False
        self._on_failed()

    def answered(self) -> None:
        """The store answered: let every call through again."""
        with self._lock:
            self._closed_until = None
            self._error = ""
            self._probing = False
        self._on_answered()

    def _enter(self, what: str) -> bool:
        with self._lock:
            if self._closed_until is None:
                return False
            left = self._closed_until - self._clock()
            if left <= 0 and not self._probing:
                self._probing = True  # this call finds out; the others are still refused meanwhile
                return True
            wait = f"tried again in {left:.1f}s" if left > 0 else "another call is trying it now"
            raise StoreUnavailable(f"cannot {what}: the adapter store did not answer ({self._error}); {wait}")

    def _leave(self) -> None:
        with self._lock:
            self._probing = False
