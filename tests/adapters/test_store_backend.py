"""Choosing a store backend, its settings, and the disk cache of a remote store (no server needed)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lorafleet_adapters.backend import S3Location, StoreSettings, open_store, parse_s3_url
from lorafleet_adapters.disk_cache import VersionCache
from lorafleet_adapters.errors import InvalidStoreLocation, StoreUnavailable
from lorafleet_adapters.ref import AdapterKey
from lorafleet_adapters.s3_store import S3AdapterStore
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.config import parse_config


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://adapters", "adapters", ""),
        ("s3://adapters/", "adapters", ""),
        ("s3://adapters/prod", "adapters", "prod"),
        ("s3://my.bucket-1/a/b_c/d-e.f/", "my.bucket-1", "a/b_c/d-e.f"),
    ],
)
def test_s3_urls(url: str, bucket: str, prefix: str) -> None:
    assert parse_s3_url(url) == S3Location(bucket, prefix)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("s3://", "names no bucket"),
        ("s3:///prefix", "names no bucket"),
        ("S3://adapters", "lower case"),
        ("s3://Adapters", "not a valid bucket name"),
        ("s3://ab", "not a valid bucket name"),
        ("s3://-bucket", "not a valid bucket name"),
        ("s3://bucket_1", "not a valid bucket name"),
        ("s3://a..b", "not a valid bucket name"),
        ("s3://adapters/../etc", "segment '..'"),
        ("s3://adapters/a//b", "segment ''"),
        ("s3://adapters/.hidden", "segment '.hidden'"),
        ("s3://adapters/a b", "without query, fragment, spaces"),
        ("s3://adapters/x?versionId=1", "without query"),
        ("s3://adapters/x#y", "without query"),
        ("s3://adapters/é", "without query"),
        ("s3://adapters/" + "a" * 600, "over 512 characters"),
    ],
)
def test_bad_s3_urls_are_refused_with_the_reason(url: str, complaint: str) -> None:
    with pytest.raises(InvalidStoreLocation, match=complaint):
        parse_s3_url(url)
    with pytest.raises(InvalidStoreLocation, match=complaint):
        StoreSettings(url)


def test_settings_refuse_other_schemes_bad_endpoints_and_sizes(tmp_path: Path) -> None:
    for location in ("http://bucket/x", "gs://bucket/x", "file:///tmp/x"):
        with pytest.raises(InvalidStoreLocation, match="unsupported URL"):
            StoreSettings(location)
    with pytest.raises(InvalidStoreLocation, match="empty"):
        StoreSettings("")
    for endpoint in ("127.0.0.1:8333", "ftp://host", "http://", "http:// host"):
        with pytest.raises(InvalidStoreLocation, match="expected http"):
            StoreSettings("s3://adapters/x", s3_endpoint_url=endpoint)
    with pytest.raises(InvalidStoreLocation, match="> 0"):
        StoreSettings("s3://adapters/x", cache_bytes=0)


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    local = open_store(StoreSettings(str(tmp_path / "store")))
    assert isinstance(local, AdapterStore) and local.location == str(tmp_path / "store")
    remote = open_store(
        StoreSettings("s3://adapters/prod", s3_endpoint_url="http://127.0.0.1:9", cache_dir=tmp_path / "cache")
    )
    assert isinstance(remote, S3AdapterStore)
    assert remote.location == "s3://adapters/prod" and remote.endpoint_url == "http://127.0.0.1:9"
    assert remote.cache.root.parent == tmp_path / "cache"


def test_a_bad_endpoint_from_the_environment_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "localhost:8333")  # boto3's variable: no scheme
    with pytest.raises(StoreUnavailable, match="bad S3 endpoint 'localhost:8333'"):
        open_store(StoreSettings("s3://adapters/x", cache_dir=tmp_path))


def test_server_config_reads_the_store_settings(tmp_path: Path) -> None:
    config = parse_config(
        ["--adapter-store", "s3://adapters/prod", "--s3-endpoint-url", "http://127.0.0.1:8333"],
        environ={"LORAFLEET_ADAPTER_CACHE_BYTES": "1000"},
    )
    assert config.store_settings == StoreSettings(
        "s3://adapters/prod", "http://127.0.0.1:8333", Path("data/adapter-cache"), 1000
    )
    from_env = parse_config([], environ={"LORAFLEET_ADAPTER_STORE": "s3://fleet", "LORAFLEET_DATA_DIR": str(tmp_path)})
    assert from_env.store_settings.location == "s3://fleet"
    assert from_env.store_settings.cache_dir == tmp_path / "adapter-cache"
    assert parse_config([]).store_settings.location == "data/adapters"  # the default is unchanged
    with pytest.raises(ValueError, match="not a valid bucket name"):
        parse_config(["--adapter-store", "s3://No"])
    with pytest.raises(ValueError, match="expected http"):
        parse_config(["--adapter-store", "s3://fleet", "--s3-endpoint-url", "localhost:8333"])
    with pytest.raises(ValueError, match="adapter_cache_bytes must be > 0"):
        parse_config(["--adapter-cache-bytes", "0"])


# ---------------------------------------------------------------------------------------- disk cache


def _entry(cache: VersionCache, key: AdapterKey, nbytes: int) -> None:
    incoming = cache.incoming()
    (incoming / "adapter_model.safetensors").write_bytes(b"x" * nbytes)
    (incoming / "manifest.json").write_text("{}")
    cache.install(key, incoming)
    time.sleep(0.01)  # distinct mtimes


def test_disk_cache_evicts_least_recently_used_but_not_entries_in_use(tmp_path: Path) -> None:
    cache = VersionCache(tmp_path / "c", max_bytes=2500)
    a, b, c, d = (AdapterKey("acme", n, 1) for n in "abcd")
    _entry(cache, a, 1000)
    _entry(cache, b, 1000)
    assert cache.lookup(a) is not None  # a is now more recent than b
    time.sleep(0.01)
    _entry(cache, c, 1000)
    assert [e.key for e in cache.entries()] == [a, c]
    with cache.using(a):
        time.sleep(0.01)
        _entry(cache, d, 1000)  # c is the least recently used one not in use
        assert [e.key for e in cache.entries()] == [a, d]
    assert cache.lookup(b) is None and cache.lookup(c) is None
    assert cache.total_bytes() <= 2500 + 2 * len("{}")


def test_disk_cache_keeps_one_entry_larger_than_the_bound_and_clears_incoming(tmp_path: Path) -> None:
    cache = VersionCache(tmp_path / "c", max_bytes=100)
    big = AdapterKey("acme", "big", 1)
    _entry(cache, big, 1000)
    assert [e.key for e in cache.entries()] == [big]  # the newest entry always stays
    leftover = cache.incoming()
    (leftover / "half").write_bytes(b"partial download")
    reopened = VersionCache(tmp_path / "c", max_bytes=100)  # a restart after a crash mid-download
    assert os.listdir(reopened.root / ".incoming") == []
    assert [e.key for e in reopened.entries()] == [big]


def test_disk_cache_counts_in_memory_what_is_on_disk_and_leaves_no_empty_directories(tmp_path: Path) -> None:
    """Sizes and recency are kept in memory (an insert used to walk the whole cache); they must stay
    what a walk of the disk says, across installs, hits, drops, evictions and a restart."""
    cache = VersionCache(tmp_path / "c", max_bytes=5000)
    keys = [AdapterKey(f"t{i % 3}", f"n{i % 4}", 1 + i // 4) for i in range(14)]
    for i, key in enumerate(keys):
        _entry(cache, key, 700 + 37 * i)
        if i % 3 == 0:
            cache.lookup(keys[i // 2])  # a hit makes an older entry recent (a miss changes nothing)
        if i == 9:
            cache.drop(keys[8])
        on_disk = cache.entries()
        assert cache.total_bytes() == sum(e.nbytes for e in on_disk) <= 5000
    reopened = VersionCache(tmp_path / "c", max_bytes=5000)
    assert reopened.total_bytes() == cache.total_bytes()
    assert [e.key for e in reopened.entries()] == [e.key for e in cache.entries()]
    held = {(e.key.tenant, e.key.name) for e in cache.entries()}
    names = {(t.name, n.name) for t in (tmp_path / "c").iterdir() if not t.name.startswith(".") for n in t.iterdir()}
    assert names == held  # a name's directory went with its last version
    for entry in cache.entries():
        cache.drop(entry.key)
    assert sorted(os.listdir(tmp_path / "c")) == [".incoming"] and cache.total_bytes() == 0
