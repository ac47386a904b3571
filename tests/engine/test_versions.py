"""The version watcher's passes against a real local store: what a poll reads, and when.

A poll reads the store's change token and, when it is what the last pass read, only the pointers of
names it has not checked since; when it moved, those a store's log of its last publishes names (or
every one where the log cannot say); a full pass (RefreshAdapters, the rescan) reads every one.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import TypeVar

import pytest

from lorafleet_adapters.backend import PublishesSince
from lorafleet_adapters.errors import AdapterFormatError, StoreUnavailable
from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.engine.versions import VersionWatcher

SPEC = BaseModelSpec("sha256:" + "0" * 64, "tiny", "none", {"model.layers.0.self_attn.q_proj": (8, 8)}, 8)
RESCAN = 60.0
FORGET = 3600.0


class CountingStore(AdapterStore):
    """The local store, counting the pointer reads a watcher makes (resolves by name)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.pointer_reads: list[str] = []
        self.stale_once: dict[str, int] = {}  # a name's next resolve answers this older version

    def resolve(self, ref: AdapterRef) -> AdapterKey:
        if ref.version is None:
            self.pointer_reads.append(f"{ref.tenant}/{ref.name}")
            stale = self.stale_once.pop(f"{ref.tenant}/{ref.name}", None)
            if stale is not None:
                return AdapterKey(ref.tenant, ref.name, stale)
        return super().resolve(ref)


class Observer:
    def __init__(self) -> None:
        self.swaps = 0
        self.failures = 0

    def adapter_swapped(self) -> None:
        self.swaps += 1

    def adapter_swap_failed(self) -> None:
        self.failures += 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


S = TypeVar("S", bound=AdapterStore)


def checked(store: S) -> S:
    """``store`` after its check (which creates the directory)."""
    store.check()
    return store


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return checked(CountingStore(tmp_path / "store"))


def publish(store: AdapterStore, name: str, text: str = "Be brief.") -> AdapterKey:
    return store.publish_prompt("acme", name, PromptTemplate(text), SPEC)


def watcher(store: CountingStore, clock: Clock, refuse: set[AdapterKey] | None = None) -> VersionWatcher:
    def verify(key: AdapterKey) -> None:
        if key in (refuse or set()):
            raise AdapterFormatError(f"{key} is broken")
        store.load_prompt(key)

    return VersionWatcher(store, verify, Observer(), 5.0, rescan_seconds=RESCAN, forget_seconds=FORGET, clock=clock)


def ref(name: str) -> AdapterRef:
    return AdapterRef("acme", name, None)


def poll(w: VersionWatcher, store: CountingStore, clock: Clock, seconds: float = 5.0) -> tuple[list[str], list[str]]:
    """One poller pass ``seconds`` after the last: (pointers it read, "name from->to" swaps)."""
    clock.now += seconds
    store.pointer_reads.clear()
    result = w.refresh(full=False)
    return sorted(store.pointer_reads), [f"{s.adapter} {s.from_version}->{s.to_version}" for s in result.swaps]


def test_a_poll_reads_pointers_only_after_a_publish_or_at_the_rescan(store: CountingStore) -> None:
    clock = Clock()
    for name in ("a", "b", "c"):
        publish(store, name)
    w = watcher(store, clock)
    for name in ("a", "b", "c"):
        w.resolve(ref(name))
    assert poll(w, store, clock) == (["acme/a", "acme/b", "acme/c"], [])  # the first pass reads all
    assert poll(w, store, clock) == ([], [])  # nothing published: the marker alone
    assert poll(w, store, clock) == ([], [])

    publish(store, "b", "Be kind.")  # a publish rewrites the marker: the next poll reads every pointer
    assert poll(w, store, clock) == (["acme/a", "acme/b", "acme/c"], ["acme/b 1->2"])
    assert w.resolve(ref("b")).version == 2
    assert poll(w, store, clock) == ([], [])

    # A pointer moved by hand leaves the marker: found at the rescan, not before.
    publish(store, "c", "Be exact.")
    assert poll(w, store, clock) == (["acme/a", "acme/b", "acme/c"], ["acme/c 1->2"])
    (store.root / "acme" / "c" / "latest").write_text("1\n")  # an operator rolls back by hand
    assert poll(w, store, clock) == ([], [])
    assert poll(w, store, clock, RESCAN) == (["acme/a", "acme/b", "acme/c"], ["acme/c 2->1"])

    # RefreshAdapters (a full pass) reads them all now.
    (store.root / "acme" / "c" / "latest").write_text("2\n")
    store.pointer_reads.clear()
    assert [s.to_version for s in w.refresh().swaps] == [2]
    assert len(store.pointer_reads) == 3


def test_a_name_first_resolved_since_the_last_pass_is_read_at_the_next_poll(store: CountingStore) -> None:
    clock = Clock()
    publish(store, "a")
    publish(store, "b")
    publish(store, "b", "Be kind.")
    w = watcher(store, clock)
    w.resolve(ref("a"))
    assert poll(w, store, clock) == (["acme/a"], [])
    # b's first resolve read its pointer before version 2 moved it (the marker already says 2): the poll
    # must not trust the unchanged marker for it.
    store.stale_once["acme/b"] = 1
    assert w.resolve(ref("b")).version == 1
    assert poll(w, store, clock) == (["acme/b"], ["acme/b 1->2"])
    assert poll(w, store, clock) == ([], [])


def test_a_failed_read_is_retried_each_poll_and_logged_once(
    store: CountingStore, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    publish(store, "a")
    publish(store, "b")
    w = watcher(store, clock)
    w.resolve(ref("a"))
    w.resolve(ref("b"))
    assert poll(w, store, clock)[0] == ["acme/a", "acme/b"]
    (store.root / "acme" / "b" / "latest").write_text("junk\n")
    publish(store, "a", "Be kind.")
    caplog.set_level(logging.INFO, logger="lorafleet_server.engine.versions")
    assert poll(w, store, clock) == (["acme/a", "acme/b"], ["acme/a 1->2"])
    for _ in range(3):
        assert poll(w, store, clock) == (["acme/b"], [])  # b alone, until it reads again
    assert caplog.text.count("acme/b: cannot read its latest version") == 1
    (store.root / "acme" / "b" / "latest").write_text("1\n")
    assert poll(w, store, clock) == (["acme/b"], [])
    assert "acme/b: checked again after: cannot read its latest version" in caplog.text
    assert poll(w, store, clock) == ([], [])


def test_a_refused_version_is_not_retried(store: CountingStore) -> None:
    clock = Clock()
    publish(store, "a")
    publish(store, "b")
    broken = publish(store, "b", "Be kind.")
    store.stale_once["acme/b"] = 1
    w = watcher(store, clock, refuse={broken})
    w.resolve(ref("a"))
    w.resolve(ref("b"))
    result = w.refresh()
    assert [(f.adapter, f.version) for f in result.failures] == [("acme/b", 2)]
    assert poll(w, store, clock) == ([], [])  # refused once: not read (nor verified) again each poll
    assert poll(w, store, clock, RESCAN) == (["acme/a", "acme/b"], [])  # the rescan reads, refuses nothing new
    assert w.serving() == {"acme/a": 1, "acme/b": 1}


def test_an_idle_name_is_not_polled_and_comes_back_to_what_it_served(store: CountingStore) -> None:
    """Unwatched after FORGET seconds idle, not forgotten: its next request is served by the version it
    had, and the next poll checks the store for it, so a broken version published meanwhile is refused
    (the old one serves) and a good one swaps in, verified, as for a name watched all along."""
    clock = Clock()
    for name in ("a", "b", "c"):
        publish(store, name)
    broken = publish(store, "b", "Be kind.")
    store.stale_once["acme/b"] = 1
    w = watcher(store, clock, refuse={broken})
    for name in ("a", "b", "c"):
        w.resolve(ref(name))
    assert [f.version for f in w.refresh().failures] == [2]
    w.resolve(ref("c"))
    clock.now += FORGET / 2
    w.resolve(ref("c"))  # c stays in use
    assert poll(w, store, clock, FORGET / 2) == (["acme/c"], [])  # a rescan: of c alone
    assert w.serving() == {"acme/c": 1}

    publish(store, "a", "Be kind.")  # while a is idle: a good version 2, and b keeps its broken one
    assert poll(w, store, clock) == (["acme/c"], [])
    assert w.resolve(ref("a")).version == 1 and w.resolve(ref("b")).version == 1
    assert poll(w, store, clock) == (["acme/a", "acme/b"], ["acme/a 1->2"])  # b: still refused, not again
    assert w.serving() == {"acme/a": 2, "acme/b": 1, "acme/c": 1}


def test_names_in_use_are_not_forgotten(store: CountingStore) -> None:
    clock = Clock()
    publish(store, "a")
    w = watcher(store, clock)
    w.resolve(ref("a"))
    for _ in range(5):
        poll(w, store, clock, FORGET / 2)
        assert w.serving() == {"acme/a": 1}
        w.resolve(ref("a"))


class PublishingStore(CountingStore):
    """Publishes a new version of acme/b while a pass reads acme/a's pointer (after its token read)."""

    publish_during: str | None = None

    def resolve(self, ref: AdapterRef) -> AdapterKey:
        key = super().resolve(ref)
        if ref.version is None and f"{ref.tenant}/{ref.name}" == self.publish_during:
            self.publish_during = None
            publish(self, "b", "Published mid-pass.")
        return key


def test_a_publish_during_a_pass_is_found_by_the_next_poll(tmp_path: Path) -> None:
    store = PublishingStore(tmp_path / "store")
    store.check()
    clock = Clock()
    publish(store, "b")
    publish(store, "a")
    w = watcher(store, clock)
    w.resolve(ref("b"))  # watched first, so a pass reads b's pointer before a's (and the publish)
    w.resolve(ref("a"))
    w.refresh()
    store.publish_during = "acme/a"
    publish(store, "c")  # the marker changes: the next poll reads every pointer, b's before a's
    assert poll(w, store, clock) == (["acme/a", "acme/b"], [])
    assert poll(w, store, clock) == (["acme/a", "acme/b"], ["acme/b 1->2"])  # the token it read was older


class FlakyStore(CountingStore):
    broken: dict[str, Exception]

    def resolve(self, ref: AdapterRef) -> AdapterKey:
        problem = getattr(self, "broken", {}).get(f"{ref.tenant}/{ref.name}")
        if ref.version is None and problem is not None:
            self.pointer_reads.append(f"{ref.tenant}/{ref.name}")
            raise problem
        return super().resolve(ref)


def test_an_unexpected_error_fails_one_name_not_the_pass_and_each_problem_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = checked(FlakyStore(tmp_path / "store"))
    clock = Clock()
    publish(store, "a")
    publish(store, "b")
    gone_flaky: set[AdapterKey] = set()

    def verify(key: AdapterKey) -> None:
        if key in gone_flaky:
            raise StoreUnavailable("the disk cache is full")
        store.load_prompt(key)

    w = VersionWatcher(store, verify, Observer(), 5.0, rescan_seconds=RESCAN, forget_seconds=FORGET, clock=clock)
    w.resolve(ref("a"))
    w.resolve(ref("b"))
    w.refresh()
    caplog.set_level(logging.INFO, logger="lorafleet_server.engine.versions")
    store.broken = {"acme/a": RuntimeError("a bug")}
    gone_flaky.add(publish(store, "b", "Be kind."))
    assert poll(w, store, clock) == (["acme/a", "acme/b"], [])  # b is read although a raised first
    for _ in range(3):
        assert poll(w, store, clock) == (["acme/a", "acme/b"], [])  # both retried each poll
    assert caplog.text.count("acme/a: cannot read its latest version: a bug") == 1
    assert caplog.text.count("acme/b: cannot fetch version 2 now (1 serves)") == 1
    store.broken = {}
    gone_flaky.clear()
    assert poll(w, store, clock) == (["acme/a", "acme/b"], ["acme/b 1->2"])
    assert caplog.text.count("checked again after") == 2
    assert poll(w, store, clock) == ([], [])


class BulkStore(CountingStore):
    """A store that reads some names' latest versions in bulk (as the S3 store lists a tenant), each
    call recorded; ``unlisted`` names it leaves out, ``bulk_error`` makes it fail."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.bulk_calls: list[tuple[str, list[str]]] = []
        self.unlisted: set[str] = set()
        self.bulk_error: Exception | None = None

    def latest_versions(self, tenant: str, names: Collection[str]) -> dict[str, int]:
        self.bulk_calls.append((tenant, sorted(names)))
        if self.bulk_error is not None:
            raise self.bulk_error
        return {n: AdapterStore.resolve(self, AdapterRef(tenant, n)).version for n in names if n not in self.unlisted}


@pytest.fixture
def bulk_store(tmp_path: Path) -> BulkStore:
    return checked(BulkStore(tmp_path / "store"))


def test_a_pass_takes_what_the_store_reads_in_bulk_and_reads_only_the_rest(
    bulk_store: BulkStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = bulk_store
    clock = Clock()
    for name in ("a", "b", "c"):
        publish(store, name)
    store.publish_prompt("beta", "d", PromptTemplate("Be brief."), SPEC)
    w = watcher(store, clock)
    for name in ("a", "b", "c"):
        w.resolve(ref(name))
    w.resolve(AdapterRef("beta", "d", None))
    store.unlisted = {"c"}
    assert poll(w, store, clock) == (["acme/c"], [])  # one bulk read per tenant, c on its own
    assert store.bulk_calls == [("acme", ["a", "b", "c"]), ("beta", ["d"])]

    publish(store, "b", "Be kind.")
    publish(store, "c", "Be kind.")
    store.bulk_calls.clear()
    assert poll(w, store, clock) == (["acme/c"], ["acme/b 1->2", "acme/c 1->2"])  # b's from the bulk read
    assert w.resolve(ref("b")).version == 2 and len(store.bulk_calls) == 2

    # A bulk read that fails: every name read on its own, nothing refused, logged once.
    store.bulk_error = StoreUnavailable("listing denied")
    publish(store, "a", "Be kind.")
    with caplog.at_level(logging.WARNING):
        assert poll(w, store, clock) == (["acme/a", "acme/b", "acme/c", "beta/d"], ["acme/a 1->2"])
        publish(store, "b", "Be exact.")
        assert poll(w, store, clock) == (["acme/a", "acme/b", "acme/c", "beta/d"], ["acme/b 2->3"])
        store.bulk_error = StoreUnavailable("listing denied")  # a tenant-specific text, and one tenant recovering
        store.latest_versions = lambda tenant, names: (  # type: ignore[method-assign]
            {} if tenant == "beta" else (_ for _ in ()).throw(StoreUnavailable(f"cannot list {tenant}/"))
        )
        for _ in range(3):
            poll(w, store, clock, RESCAN)
    warned = [r.getMessage() for r in caplog.records if "cannot read latest versions in bulk" in r.getMessage()]
    assert len(warned) == 3 and "cannot list acme/" in warned[2]  # once per tenant and message


class LoggingStore(CountingStore):
    """A store that logs its last ``keep`` publishes as the S3 store's marker does (``publishes_since``),
    each call recorded; ``log_error`` makes reading the log fail, ``stale_log_reads`` answers the next
    reads with the log and change token as they were before the last publish (a store without
    read-after-write consistency)."""

    def __init__(self, root: Path, keep: int = 4) -> None:
        super().__init__(root)
        self.keep = keep
        self.log: list[tuple[str, str, str]] = []  # (tenant, name, id), oldest first
        self.log_token = ""  # the change token that goes with ``log``
        self.previous: tuple[list[tuple[str, str, str]], str] = ([], "")  # both before the last publish
        self.log_reads: list[str | None] = []
        self.log_error: Exception | None = None
        self.stale_log_reads = 0

    def publish(self, name: str, text: str = "Be brief.") -> AdapterKey:
        """Publish acme/name, and log it as the S3 store's marker would."""
        key = publish(self, name, text)
        self.previous = (self.log, self.log_token)
        self.log = [*self.log, (key.tenant, key.name, f"p{len(self.log_reads)}-{key}")][-self.keep :]
        self.log_token = self.change_token()
        return key

    def publishes_since(self, seen: str | None) -> PublishesSince:
        self.log_reads.append(seen)
        if self.log_error is not None:
            raise self.log_error
        log, token = (self.log, self.log_token) if self.stale_log_reads <= 0 else self.previous
        self.stale_log_reads -= 1
        ids = [entry[2] for entry in log]
        newest = ids[-1] if ids else ""
        if seen is None or seen not in ids:
            return PublishesSince(newest, None, token)
        return PublishesSince(newest, frozenset((t, n) for t, n, _ in log[ids.index(seen) + 1 :]), token)


def test_after_a_publish_a_poll_reads_only_the_pointers_the_stores_publish_log_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = checked(LoggingStore(tmp_path / "store"))
    clock = Clock()
    for name in ("a", "b", "c", "d"):
        store.publish(name)
    w = watcher(store, clock)
    for name in ("a", "b", "c"):
        w.resolve(ref(name))  # d is published but not watched here
    assert poll(w, store, clock) == (["acme/a", "acme/b", "acme/c"], [])  # no log read before: every one
    store.publish("b", "Be kind.")
    store.publish("d", "Be kind.")
    assert poll(w, store, clock) == (["acme/b"], ["acme/b 1->2"])  # d moved too, unwatched: not read
    assert poll(w, store, clock) == ([], [])  # the token did not move: the log is not read either
    assert len(store.log_reads) == 2

    # A name first resolved since is read as well; one published in the same pass too.
    store.publish("e")
    w.resolve(ref("e"))
    store.publish("c", "Be kind.")
    assert poll(w, store, clock) == (["acme/c", "acme/e"], ["acme/c 1->2"])

    # More publishes than the log keeps since the last pass: it cannot say, every pointer is read.
    for text in ("1", "2", "3", "4"):
        store.publish("d", text)
    store.publish("a", "Be kind.")
    assert poll(w, store, clock) == (["acme/a", "acme/b", "acme/c", "acme/e"], ["acme/a 1->2"])
    store.publish("a", "Be exact.")
    assert poll(w, store, clock) == (["acme/a"], ["acme/a 2->3"])  # and it takes up the log again

    # A log that cannot be read: every pointer, logged once, then the log afresh.
    store.log_error = StoreUnavailable("marker unreadable")
    with caplog.at_level(logging.WARNING):
        store.publish("b", "Be exact.")
        assert poll(w, store, clock) == (["acme/a", "acme/b", "acme/c", "acme/e"], ["acme/b 2->3"])
        store.publish("c", "Be exact.")
        assert poll(w, store, clock) == (["acme/a", "acme/b", "acme/c", "acme/e"], ["acme/c 2->3"])
    assert caplog.text.count("cannot read the adapter store's publish log") == 1
    store.log_error = None
    store.publish("e", "Be kind.")
    assert poll(w, store, clock) == (["acme/a", "acme/b", "acme/c", "acme/e"], ["acme/e 1->2"])  # no entry held
    store.publish("e", "Be exact.")
    assert poll(w, store, clock) == (["acme/e"], ["acme/e 2->3"])

    # The rescan still reads every pointer (one moved by hand is in no log).
    assert poll(w, store, clock, RESCAN)[0] == ["acme/a", "acme/b", "acme/c", "acme/e"]


def test_a_log_read_older_than_the_change_token_is_read_again_at_the_next_poll(tmp_path: Path) -> None:
    store = checked(LoggingStore(tmp_path / "store"))
    clock = Clock()
    for name in ("a", "b"):
        store.publish(name)
    w = watcher(store, clock)
    for name in ("a", "b"):
        w.resolve(ref(name))
    poll(w, store, clock)
    store.publish("a", "Be kind.")
    assert poll(w, store, clock) == (["acme/a"], ["acme/a 1->2"])
    store.publish("b", "Be kind.")
    store.stale_log_reads = 1  # the token read first has b's publish, the log read after it not yet
    assert poll(w, store, clock) == ([], [])
    # The pass kept the stale log's token, not the newer one it read first: the log is read again.
    assert poll(w, store, clock) == (["acme/b"], ["acme/b 1->2"])
    assert poll(w, store, clock) == ([], []) and len(store.log_reads) == 4


def test_a_pass_that_raises_midway_leaves_the_publishes_it_did_not_reach_for_the_next_poll(tmp_path: Path) -> None:
    store = checked(LoggingStore(tmp_path / "store", keep=8))
    for name in ("a", "b"):
        store.publish(name)
    failures = [RuntimeError("a callback failed")]  # the first swap's

    def superseded(_old: AdapterKey, _new: AdapterKey) -> None:
        if failures:
            raise failures.pop()

    clock = Clock()
    w = VersionWatcher(
        store, store.load_prompt, Observer(), 5.0, superseded, rescan_seconds=RESCAN, forget_seconds=FORGET, clock=clock
    )
    for name in ("a", "b"):
        w.resolve(ref(name))
    poll(w, store, clock)
    store.publish("a", "Be kind.")
    store.publish("b", "Be kind.")
    with pytest.raises(RuntimeError, match="a callback failed"):
        poll(w, store, clock)  # a swapped, then the pass stopped before b
    assert poll(w, store, clock) == (["acme/a", "acme/b"], ["acme/b 1->2"])
    assert w.serving() == {"acme/a": 2, "acme/b": 2}


def test_two_resolves_of_an_idle_name_both_get_what_it_served(store: CountingStore) -> None:
    """The first took the remembered entry out of the idle set outside the lock; a second resolve in
    between found the name in neither map, read the store's latest (a version a swap had refused) and
    tracked that: both were served the refused version, for good (latest == served)."""
    import threading
    import time as time_module

    clock = Clock()
    publish(store, "b")
    broken = publish(store, "b", "Be kind.")
    store.stale_once["acme/b"] = 1
    w = watcher(store, clock, refuse={broken})
    w.resolve(ref("b"))
    assert [f.version for f in w.refresh().failures] == [2]
    clock.now += FORGET
    w.refresh()  # b idle: set aside, with what it served and refused
    forgotten = w._forgotten
    real_pop = forgotten.pop

    def slow_pop(name: tuple[str, str]) -> object:  # widens the window between the two maps
        value = real_pop(name)
        if value is not None:  # the resolve that takes it up lingers between the two maps
            time_module.sleep(0.2)
        return value

    forgotten.pop = slow_pop  # type: ignore[method-assign]
    got: list[int] = []
    threads = [threading.Thread(target=lambda: got.append(w.resolve(ref("b")).version)) for _ in range(2)]
    for thread in threads:
        thread.start()
        time_module.sleep(0.05)
    for thread in threads:
        thread.join(10)
    assert got == [1, 1] and w.serving() == {"acme/b": 1}
