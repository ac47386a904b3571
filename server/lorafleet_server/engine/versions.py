"""Which version "tenant/name" means on this server, and hot swap to newly published versions.

A reference without ``@version`` resolves to the version this server serves for that adapter. The
first use takes the store's latest, unless this server cannot serve it (built for another base, a
fleet mid-upgrade; a prompt that leaves no room in the context), then the newest earlier one it can;
afterwards a watcher polls the store (and ``refresh()`` runs a pass now) and moves an adapter to a
newly published version only once that version has been verified and loaded into host memory
(checksums, base fingerprint, shapes). A version that fails is refused and reported, and the previous
one keeps serving. Requests already admitted are pinned to their version and never see a swap.

A poll costs one read when nothing was published: the store's change token (a marker every publish
rewrites). When it changed, a store that logs its last publishes in the marker (S3,
``Store.publishes_since``) names the adapters whose pointers moved since the last pass, and only
those of them this server watches are read. Where that is not known (the log no longer reaches back
to the last pass, or the store keeps none), and on a full rescan every ``rescan_seconds`` (pointers
moved by hand, by a publisher that died between the pointer and the marker, or by one whose line did
not make it into the store's log), the ``latest``
pointers of all watched adapters are read: a tenant's in one listing where the store can (S3,
``Store.latest_versions``), else one GET each.
A name no request resolved for ``forget_seconds`` is no longer watched; what the watcher knew of it
is set aside (bounded), and its next request takes that up again: the version it served, checked
against the store at the next poll like any other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from lorafleet_adapters.backend import Store
from lorafleet_adapters.errors import AdapterError, StoreUnavailable
from lorafleet_adapters.lru import LruMap
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_server.engine.store_gate import StoreGate

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


FULL_RESCAN_SECONDS = 60.0
FORGET_SECONDS = 3600.0
FIRST_USE_FALLBACK = 16  # versions before a refused latest that a name's first use may take instead
# A name none of whose versions this server can serve is refused from memory this long before the store
# is read again (each request read its pointer and listed its versions: a GET and a LIST on S3).
UNSERVABLE_SECONDS = 5.0
FORGOTTEN_KEPT = 65536  # idle names whose served version is remembered (~300 bytes each)


@dataclass
class _Tracked:
    version: int
    used: float  # time.monotonic() of the last resolve by name
    refused: set[int] = field(default_factory=set)
    # Its pointer was read after a change token this watcher holds: a poll that finds the token unchanged
    # can skip it. False for a name first resolved since (its first read may predate a publish) and for
    # one whose last read or fetch failed.
    checked: bool = False
    error: str = ""  # why its last check failed, logged when it changes (not every poll)


class VersionWatcher:
    def __init__(
        self,
        store: Store,
        verify: Callable[[AdapterKey], object],
        observer: SwapObserver,
        poll_seconds: float,
        superseded: Callable[[AdapterKey, AdapterKey], None] = lambda _old, _new: None,
        *,
        rescan_seconds: float = FULL_RESCAN_SECONDS,
        forget_seconds: float = FORGET_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        gate: StoreGate | None = None,
        servable: Callable[[AdapterKey], object] | None = None,
    ) -> None:
        """``verify`` checks a version before it serves; ``superseded(old, new)`` is told after each swap,
        so the tiers can let go of the version nothing resolves to by name any more. ``gate``: what a
        request's store reads pass through (``StoreGate``); each pass's change-token read trips or opens it.
        ``servable`` refuses (``AdapterError``), cheaply, a version this server cannot serve; a name's
        first use takes the newest version it does not refuse."""
        self._store = store
        self._verify = verify
        self._superseded = superseded
        self._observer = observer
        self._poll_seconds = poll_seconds
        self._rescan_seconds = rescan_seconds
        self._forget_seconds = forget_seconds
        self._clock = clock
        self._tracked: dict[tuple[str, str], _Tracked] = {}
        self._forgotten: LruMap[tuple[str, str], _Tracked] = LruMap(FORGOTTEN_KEPT)  # idle names, set aside
        self._token: str | None = None  # the change token the last pass read first (None: none yet)
        self._token_error = ""  # the last error reading it, logged when it changes (not every poll)
        self._publish_seen: str | None = None  # the newest publish in the store's log at the last read of it
        self._log_error = ""  # the last error reading that log, likewise
        self._bulk_errors: dict[str, str] = {}  # tenant -> the last error of its bulk read, likewise
        self._next_rescan = 0.0
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()  # one pass at a time (poller and admin calls)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gate = gate or StoreGate()
        self._servable = servable
        # A name's first resolve in flight: concurrent first uses wait for it instead of each reading the
        # store (twenty requests for one name read its pointer forty times while the store was stalled).
        self._first_reads: dict[tuple[str, str], Future[tuple[AdapterKey, frozenset[int]]]] = {}
        # names with no version this server can serve: (when to read the store again, the refusal)
        self._unservable: LruMap[tuple[str, str], tuple[float, AdapterError]] = LruMap(FORGOTTEN_KEPT)

    def peek(self, ref: AdapterRef) -> AdapterKey | None:
        """The version ``ref`` resolves to when that is known without the store, else None; no side effect."""
        if ref.version is not None:
            return AdapterKey(ref.tenant, ref.name, ref.version)
        name = (ref.tenant, ref.name)
        with self._lock:
            tracked = self._tracked.get(name) or self._forgotten.get(name)  # set aside: taken up without the store
            return None if tracked is None else AdapterKey(ref.tenant, ref.name, tracked.version)

    def resolve(self, ref: AdapterRef) -> AdapterKey:
        if ref.version is not None:
            with self._gate.call(f"find {ref}"):
                return self._store.resolve(ref)
        name = (ref.tenant, ref.name)
        now = self._clock()
        with self._lock:  # one hold for both maps: a resolve racing this one sees the name in one of them
            tracked = self._tracked.get(name)
            if tracked is None:
                remembered = self._forgotten.pop(name)
                if remembered is not None:  # watched before, idle since: the version it served (checked next poll)
                    tracked = self._tracked[name] = remembered
            if tracked is not None:
                tracked.used = now
                return AdapterKey(ref.tenant, ref.name, tracked.version)
        key, refused = self._first_read(ref)  # first use: the newest version this server can serve
        with self._lock:
            # Remembered meanwhile (forgotten by a pass while the store was read): what it served and
            # refused wins over the store's latest, which may be a version a swap refused.
            tracked = self._tracked.get(name) or self._forgotten.pop(name)
            if tracked is None:
                tracked = _Tracked(version=key.version, used=now, refused=set(refused))
            self._tracked[name] = tracked
            tracked.used = now
            return AdapterKey(ref.tenant, ref.name, tracked.version)

    def _first_read(self, ref: AdapterRef) -> tuple[AdapterKey, frozenset[int]]:
        """The newest version of ``ref`` this server can serve and the newer ones it cannot
        (``_newest_servable``); one read per name at a time, its answer (or error) shared by every
        resolve that asked meanwhile."""
        name = (ref.tenant, ref.name)
        refused = self._unservable.get(name)
        if refused is not None and self._clock() < refused[0]:
            raise type(refused[1])(*refused[1].args)  # a copy: the kept one's traceback would grow per raise
        with self._lock:
            pending = self._first_reads.get(name)
            mine = pending is None
            if pending is None:
                pending = self._first_reads[name] = Future()
        if not mine:
            return pending.result()
        try:
            with self._gate.call(f"find {ref}"):
                latest = self._store.resolve(ref)
            try:
                found = self._newest_servable(ref, latest)  # its reads pass the gate themselves
            except StoreUnavailable:
                raise
            except AdapterError as exc:
                self._unservable.put(name, (self._clock() + UNSERVABLE_SECONDS, exc))
                raise
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        else:
            pending.set_result(found)
            return found
        finally:
            with self._lock:
                del self._first_reads[name]

    def _newest_servable(self, ref: AdapterRef, latest: AdapterKey) -> tuple[AdapterKey, frozenset[int]]:
        """``latest``, unless ``servable`` refuses it: then the newest earlier version it takes (of the
        ``FIRST_USE_FALLBACK`` before it), with the versions refused on the way; the refusal of
        ``latest`` itself when it takes none. A replica that first served a name after a version other
        replicas had refused (one built for another base, mid-upgrade) served that version's error
        while they served the one before."""
        if self._servable is None:
            return latest, frozenset()
        try:
            self._servable(latest)
            return latest, frozenset()
        except StoreUnavailable:
            raise
        except AdapterError as exc:
            refusal = exc
        refused = {latest.version}
        with self._gate.call(f"list {ref}'s versions"):
            earlier = [v for v in self._store.versions(ref.tenant, ref.name) if v < latest.version]
        for version in reversed(earlier[-FIRST_USE_FALLBACK:]):
            key = AdapterKey(ref.tenant, ref.name, version)
            try:
                self._servable(key)
            except StoreUnavailable:
                raise
            except AdapterError:
                refused.add(version)
                continue
            self._observer.adapter_swap_failed()
            log.error(
                "adapter %s: version %d refused, %d serves (the newest this server can serve): %s",
                ref,
                latest.version,
                version,
                refusal,
            )
            return key, frozenset(refused)
        raise refusal

    def serving(self) -> dict[str, int]:
        with self._lock:
            return {f"{t}/{n}": tr.version for (t, n), tr in self._tracked.items()}

    def refresh(self, full: bool = True) -> RefreshResult:
        """One pass: move each watched adapter to its store's latest version if that one verifies.

        ``full`` (an admin's ``RefreshAdapters``) reads every watched pointer. The poller's passes are
        not full: when the store's change token is what the last pass read, they read only the pointers
        of names first resolved or failed since, until the next rescan is due; when it moved, also those
        the store's publish log names, or every one where the log does not say.
        """
        swaps: list[Swap] = []
        failures: list[SwapFailure] = []
        with self._refresh_lock:
            now = self._clock()
            self._forget_idle(now)
            try:
                token: str | None = self._store.change_token()
            except AdapterError as exc:
                if isinstance(exc, StoreUnavailable):
                    self._gate.failed(str(exc))  # requests for adapters not at hand are refused at once
                if str(exc) != self._token_error:
                    log.warning("cannot read the adapter store's change token, reading every pointer: %s", exc)
                self._token_error = str(exc)
                token = None
            else:
                self._token_error = ""
                self._gate.answered()
            changed = token is not None and token != self._token
            # the names publishes moved since the last read of the store's log, its newest entry then,
            # and the change token that log goes with (None: keep the one read above)
            seen, moved, log_token = self._publishes() if changed else (self._publish_seen, None, None)
            everything = full or token is None or now >= self._next_rescan or (changed and moved is None)
            with self._lock:
                names = [
                    name
                    for name, tracked in self._tracked.items()
                    if everything or not tracked.checked or (moved is not None and name in moved)
                ]
            by_tenant: dict[str, list[str]] = {}
            for tenant, name in names:
                by_tenant.setdefault(tenant, []).append(name)
            for tenant, tenant_names in by_tenant.items():
                latest = self._latest_versions(tenant, tenant_names)
                for name in tenant_names:
                    self._check(tenant, name, swaps, failures, latest.get(name))
            # with the log's entry (a pass that raises before here is read again); the log's own token
            # where it has one: a log read older than the token read first is read again next poll
            self._token = token if log_token is None else log_token
            self._publish_seen = seen
            if everything:
                self._next_rescan = now + self._rescan_seconds
        return RefreshResult(tuple(swaps), tuple(failures))

    def _publishes(self) -> tuple[str | None, frozenset[tuple[str, str]] | None, str | None]:
        """(the newest entry of the store's publish log, the (tenant, name)s publishes moved since the
        last pass's: None where not known, so the pass reads every pointer; the log's change token)."""
        try:
            since = self._store.publishes_since(self._publish_seen)
        except Exception as exc:  # the pass reads every pointer, and the next read starts afresh
            if str(exc) != self._log_error:
                log.warning("cannot read the adapter store's publish log, reading every pointer: %s", exc)
            self._log_error = str(exc)
            return None, None, None
        self._log_error = ""
        return since.newest, since.moved, since.token

    def _latest_versions(self, tenant: str, names: list[str]) -> dict[str, int]:
        """What the store reads in bulk of these names' latest versions (an S3 store: one listing of the
        tenant where that costs fewer requests than a pointer read each); the rest are read one by one."""
        try:
            latest = self._store.latest_versions(tenant, names)
        except Exception as exc:  # each name's own read then says what is wrong, name by name
            if str(exc) != self._bulk_errors.get(tenant):
                log.warning(
                    "tenant %s: cannot read latest versions in bulk, reading pointers one by one: %s", tenant, exc
                )
            self._bulk_errors[tenant] = str(exc)
            return {}
        self._bulk_errors.pop(tenant, None)
        return latest

    def _check(
        self, tenant: str, name: str, swaps: list[Swap], failures: list[SwapFailure], listed: int | None = None
    ) -> None:
        """``listed``: its latest version as a bulk read of the store gave it (None: read its pointer)."""
        ref = AdapterRef(tenant, name, None)
        with self._lock:
            tracked = self._tracked.get((tenant, name))
            if tracked is None:  # forgotten meanwhile
                return
            tracked.checked = False  # until this check completes: a failed one is retried next poll
        try:
            latest = self._store.resolve(ref).version if listed is None else listed
        except Exception as exc:  # AdapterError, or anything else: this name only, retried next poll
            self._failed(tracked, ref, f"cannot read its latest version: {exc}", exc)
            return
        with self._lock:
            done = latest == tracked.version or latest in tracked.refused
            if done:
                tracked.checked = True
            current = tracked.version
        if done:
            self._recovered(tracked, ref)
            return
        key = AdapterKey(tenant, name, latest)
        try:
            self._verify(key)
        except StoreUnavailable as exc:  # the store, not the version: try again next pass
            self._failed(tracked, ref, f"cannot fetch version {latest} now ({current} serves): {exc}", exc)
            return
        except AdapterError as exc:
            with self._lock:
                tracked.refused.add(latest)
                tracked.checked = True
            self._recovered(tracked, ref)
            self._observer.adapter_swap_failed()
            log.error("adapter %s: version %d refused, %d keeps serving: %s", ref, latest, current, exc)
            failures.append(SwapFailure(str(ref), latest, str(exc)))
            return
        except Exception as exc:  # not the version's fault as far as we know: try again next pass
            self._failed(tracked, ref, f"cannot check version {latest} now ({current} serves): {exc!r}", exc)
            return
        with self._lock:
            tracked.version = latest
            tracked.checked = True
        self._recovered(tracked, ref)
        self._observer.adapter_swapped()
        log.info("adapter %s: swapped version %d -> %d (new publish verified)", ref, current, latest)
        swaps.append(Swap(str(ref), current, latest))
        self._superseded(AdapterKey(tenant, name, current), key)

    @staticmethod
    def _failed(tracked: _Tracked, ref: AdapterRef, message: str, exc: Exception) -> None:
        """Log a check that failed when its message changes, not at every poll that retries it."""
        if message != tracked.error:
            unexpected = not isinstance(exc, AdapterError)
            log.warning("adapter %s: %s", ref, message, exc_info=exc if unexpected else None)
        tracked.error = message

    @staticmethod
    def _recovered(tracked: _Tracked, ref: AdapterRef) -> None:
        if tracked.error:
            log.info("adapter %s: checked again after: %s", ref, tracked.error)
            tracked.error = ""

    def _forget_idle(self, now: float) -> None:
        """Stop watching names no request resolved for ``forget_seconds``. What the watcher knew of each
        (the version it serves, versions refused) is kept aside, bounded: a later request takes it up
        again and the next poll checks the store, as for a name watched all along."""
        with self._lock:
            idle = [name for name, tracked in self._tracked.items() if now - tracked.used >= self._forget_seconds]
            for name in idle:
                tracked = self._tracked.pop(name)
                tracked.checked = False
                self._forgotten.put(name, tracked)
        if idle:
            log.info("no longer watching %d adapter name(s) unused for %.0fs", len(idle), self._forget_seconds)

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
                self.refresh(full=False)
            except Exception:  # keep watching: the next pass may succeed
                log.exception("adapter watch pass failed")
