"""``S3Bucket`` (s3_bucket.py) against a real S3 server (SeaweedFS): what the S3 store relies on from it,
on its own. The store's protocols over it are in test_store_s3.py."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from seaweedlib import SeaweedFS

from lorafleet_adapters.backend import parse_s3_url
from lorafleet_adapters.errors import AdapterFormatError, StoreUnavailable
from lorafleet_adapters.s3_bucket import ObjectTooLarge, Put, S3Bucket

BUCKET = "lorafleet-bucket-test"


@pytest.fixture
def bucket(seaweed_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    for name, value in seaweed_server.env().items():
        monkeypatch.setenv(name, value)
    yield S3Bucket(parse_s3_url(f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}"))


def test_conditional_writes_answer_with_their_outcome(bucket: S3Bucket) -> None:
    key = bucket.key("acme", "bot", "latest")
    assert key.endswith("/acme/bot/latest") and key.startswith(bucket.prefix + "/")
    assert bucket.put(key, b"1\n", "create", if_none_match=True) is Put.DONE
    assert bucket.put(key, b"2\n", "create again", if_none_match=True) is Put.CONFLICT
    etag = bucket.head_etag(key)
    assert etag is not None
    assert bucket.put(key, b"3\n", "swap", if_match='"0123456789abcdef0123456789abcdef"') is Put.CONFLICT
    with pytest.raises(StoreUnavailable, match="no ETag to compare-and-swap on"):  # SeaweedFS: no condition
        bucket.put(key, b"0\n", "swap", if_match="")
    assert bucket.get_small(key, 32, "read") == b"1\n"
    assert bucket.put(key, b"3\n", "swap", if_match=etag) is Put.DONE
    assert bucket.get_bounded(key, 32, "read") == (b"3\n", bucket.head_etag(key))
    assert bucket.put(key, b"4\n", "overwrite") is Put.DONE  # unconditional
    bucket.delete(key, "remove")
    assert bucket.get(key, "read") is None and bucket.head_etag(key) is None
    assert bucket.get_small(key, 32, "read") is None


def test_reads_are_bounded(bucket: S3Bucket, tmp_path: Path) -> None:
    key = bucket.key("big")
    bucket.put(key, b"x" * 100, "write")
    assert bucket.get_bounded(key, 10, "read") == (b"x" * 11, bucket.head_etag(key))  # one past: larger
    with pytest.raises(AdapterFormatError, match="larger than 10 bytes"):
        bucket.get_small(key, 10, "read")
    with pytest.raises(ObjectTooLarge) as refused:
        bucket.download(key, tmp_path / "a", 99, "download")
    assert (refused.value.size, refused.value.declared) == (100, True)
    written, digest = bucket.download(key, tmp_path / "b", 100, "download") or (0, "")
    assert written == 100 and (tmp_path / "b").read_bytes() == b"x" * 100
    assert digest == hashlib.sha256(b"x" * 100).hexdigest()
    assert bucket.download(bucket.key("absent"), tmp_path / "c", 100, "download") is None


def test_listing_pages_and_folders(bucket: S3Bucket) -> None:
    bucket.list_page_keys = 2
    for name in ("a/1", "a/2", "b/1", "c"):
        bucket.put(bucket.key(name), b"", "write")
    base = bucket.key()
    assert [k[len(base) :] for k in bucket.list_keys(base)] == ["a/1", "a/2", "b/1", "c"]
    pages = list(bucket.list_pages(base, max_keys=3))
    assert [len(page) for page in pages[:-1] if page is not None] == [2, 1] and pages[-1] is None  # more
    folders = [entry[len(base) :] for page in bucket.folder_pages(base, None, start_after=None) for entry in page]
    assert sorted(folders) == ["a/", "b/", "c"]


def test_failures_name_the_store_and_the_cause(seaweed_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in seaweed_server.env().items():
        monkeypatch.setenv(name, value)
    missing = S3Bucket(parse_s3_url("s3://no-such-bucket-here/p"))
    with pytest.raises(StoreUnavailable, match="the bucket 'no-such-bucket-here' does not exist"):
        missing.check()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    denied = S3Bucket(parse_s3_url(f"s3://{BUCKET}/p"))
    with pytest.raises(StoreUnavailable, match=r"access denied .*check the S3 credentials"):
        denied.get(denied.key("x"), "read x")
    sent = denied.round_trips()
    assert sent >= 1  # every attempt counted, on this thread


def test_a_body_longer_than_its_declared_length_is_cut_at_the_limit(
    bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit holds for the bytes that arrive, not only for the Content-Length the store declared."""
    key = bucket.key("liar")
    bucket.put(key, b"x" * (3 << 20), "write")
    real_get = bucket.client.get_object

    def understated(**kwargs: object) -> dict[str, object]:
        response: dict[str, object] = real_get(**kwargs)
        response["ContentLength"] = 10
        return response

    monkeypatch.setattr(bucket.client, "get_object", understated)
    with pytest.raises(ObjectTooLarge) as refused:
        bucket.download(key, tmp_path / "d", 1 << 20, "download")
    assert not refused.value.declared and refused.value.size > 1 << 20
