"""One S3 bucket under a prefix, through boto3: what the S3 adapter store (s3_store.py) asks of S3.

Every request runs with connect and read timeouts and boto3's bounded retries, and every failure to
reach or use the bucket becomes ``StoreUnavailable`` naming the store, the endpoint and the cause (a
missing bucket, denied or absent credentials, an unreachable endpoint). A missing object is an answer
(None), and a conditional write that loses its condition is a ``Put`` result, not an error: the store's
claim and compare-and-swap loops decide what either means. Requests sent are counted per thread
(``round_trips``).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from botocore.exceptions import BotoCoreError, ClientError

from lorafleet_adapters.backend import S3Location
from lorafleet_adapters.errors import AdapterFormatError, AdapterNotFound, StoreUnavailable

CONNECT_TIMEOUT_SECONDS = 3.0
READ_TIMEOUT_SECONDS = 15.0
MAX_ATTEMPTS = 3  # boto3's "standard" retry mode: the first try and two retries, with backoff
LIST_PAGE_KEYS = 1000  # S3's most per ListObjectsV2 request
# A download's whole time is bounded too (the read timeout bounds each read: a store sending a byte
# every few seconds was never cut off, holding the version's lock, a loader thread, or the watcher):
# DOWNLOAD_BASE_SECONDS plus its size at DOWNLOAD_MIN_BYTES_PER_SECOND.
DOWNLOAD_BASE_SECONDS = 30.0
DOWNLOAD_MIN_BYTES_PER_SECOND = 1 << 20
_CHUNK = 1 << 20
BOTO_ERRORS = (BotoCoreError, ClientError)
_DENIED = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "403"}
)
_MISSING_KEY = frozenset({"NoSuchKey", "404", "NotFound"})
_CONFLICT = frozenset({"PreconditionFailed", "412"})
_RETRY_CONFLICT = frozenset({"ConditionalRequestConflict", "409", "OperationAborted"})


class Put(enum.Enum):
    """How a write ended: done; its condition failed (412: the object exists, or its ETag moved); or the
    store refused it for a concurrent conditional write to the same key (409: try again)."""

    DONE = "done"
    CONFLICT = "conflict"
    BUSY = "busy"


class ObjectTooLarge(Exception):
    """A download would pass its limit (``size``: what the store declared, or what had arrived)."""

    def __init__(self, size: int, declared: bool) -> None:
        super().__init__(size)
        self.size = size
        self.declared = declared


class S3Bucket:
    def __init__(
        self,
        location: S3Location,
        *,
        endpoint_url: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        read_timeout: float = READ_TIMEOUT_SECONDS,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.name = location.bucket
        self.prefix = location.prefix
        self.location = str(location)
        self.list_page_keys = LIST_PAGE_KEYS  # keys a listing request asks for (tests set fewer)
        # The AWS SDKs' own variables, not lorafleet's settings (which come from ServerConfig or the CLI):
        # read here as boto3 reads them, to pick path-style addressing for a custom endpoint.
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # A custom endpoint (SeaweedFS, MinIO, Ceph...) is one host: path-style addressing.
            s3={"addressing_style": "path" if endpoint else "auto"},
            max_pool_connections=16,
        )
        # botocore says at INFO on every start where it found credentials: noise next to our logs.
        logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
        session = boto3.session.Session()
        region = session.region_name or "us-east-1"
        try:
            self.client: Any = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
        except ValueError as exc:  # a malformed endpoint URL
            raise StoreUnavailable(f"adapter store {self.location}: bad S3 endpoint {endpoint!r}: {exc}") from None
        self.endpoint_url: str = self.client.meta.endpoint_url
        self._sent = threading.local()  # requests each thread sent to the endpoint, for round_trips()
        self.client.meta.events.register("before-send.s3", self._count_sent)

    def round_trips(self) -> int:
        """Requests the calling thread has sent to the endpoint so far (every attempt)."""
        return getattr(self._sent, "count", 0)

    def _count_sent(self, **_event: Any) -> None:  # botocore's before-send hook: None lets the request go
        self._sent.count = getattr(self._sent, "count", 0) + 1  # on the thread that sends (no transfer pool)

    def key(self, *parts: str) -> str:
        """The object key of ``parts`` under the prefix ("" for the prefix itself, "/"-terminated)."""
        if not parts:
            return f"{self.prefix}/" if self.prefix else ""
        return "/".join((self.prefix, *parts)) if self.prefix else "/".join(parts)

    def check(self) -> None:
        """Reach the bucket now (HeadBucket, then one listing): a clear StoreUnavailable otherwise."""
        self.call("reach the bucket", self.client.head_bucket, Bucket=self.name)
        self.call("list the bucket", self.client.list_objects_v2, Bucket=self.name, Prefix=self.key(), MaxKeys=1)

    # ------------------------------------------------------------------------------------ reading

    def get(self, object_key: str, what: str) -> Any:
        """GetObject's response, or None when the object does not exist."""
        try:
            return self.client.get_object(Bucket=self.name, Key=object_key)
        except BOTO_ERRORS as exc:
            if _code(exc) in _MISSING_KEY:
                return None
            raise self.translate(exc, what) from None

    def get_small(self, object_key: str, limit: int, what: str) -> bytes | None:
        """The object's bytes (AdapterFormatError past ``limit``), or None when it does not exist."""
        got = self.get_bounded(object_key, limit, what)
        if got is None:
            return None
        data, _etag = got
        if len(data) > limit:
            raise AdapterFormatError(f"{object_key} is larger than {limit} bytes")
        return data

    def get_bounded(self, object_key: str, limit: int, what: str) -> tuple[bytes, str] | None:
        """At most ``limit + 1`` of the object's bytes (more than ``limit``: it is larger) and its ETag
        ("" when the store sent none), or None when it does not exist."""
        response = self.get(object_key, what)
        if response is None:
            return None
        with self.reading(what):
            data: bytes = response["Body"].read(limit + 1)
            response["Body"].close()
        return data, str(response.get("ETag") or "")

    def head_etag(self, object_key: str) -> str | None:
        """The object's ETag ("" when the store sent none), or None when it does not exist."""
        try:
            return str(self.client.head_object(Bucket=self.name, Key=object_key).get("ETag") or "")
        except BOTO_ERRORS as exc:
            if _code(exc) in _MISSING_KEY:
                return None
            raise self.translate(exc, f"look up {object_key}") from None

    def download(self, object_key: str, dest: Path, limit: int, what: str) -> tuple[int, str] | None:
        """The object written into the new file ``dest``: (its bytes, their sha256), or None when it does
        not exist. ObjectTooLarge past ``limit`` bytes; StoreUnavailable when it arrives slower than
        DOWNLOAD_MIN_BYTES_PER_SECOND (after DOWNLOAD_BASE_SECONDS)."""
        response = self.get(object_key, what)
        if response is None:
            return None
        size = int(response.get("ContentLength", 0))
        if size > limit:
            response["Body"].close()
            raise ObjectTooLarge(size, declared=True)
        digest = hashlib.sha256()
        written = 0
        allowed = DOWNLOAD_BASE_SECONDS + size / DOWNLOAD_MIN_BYTES_PER_SECOND
        # The bound is kept by a timer that closes the body: a read blocks until its whole chunk has
        # arrived (1 MiB), each byte well within the read timeout, so a check between chunks never ran.
        cut = threading.Event()

        def too_slow() -> None:
            cut.set()
            with contextlib.suppress(Exception):
                response["Body"].close()

        timer = threading.Timer(allowed, too_slow)
        timer.daemon = True
        timer.start()
        try:
            with self.reading(what), open(dest, "xb") as out:
                for chunk in response["Body"].iter_chunks(_CHUNK):
                    written += len(chunk)
                    if written > limit:
                        response["Body"].close()
                        raise ObjectTooLarge(written, declared=False)
                    if cut.is_set():
                        break
                    digest.update(chunk)
                    out.write(chunk)
        except Exception:
            if not cut.is_set():
                raise
        finally:
            timer.cancel()
        if cut.is_set():
            raise StoreUnavailable(
                f"adapter store {self.location}: cannot {what}: {written} of {size} bytes in "
                f"{allowed:.0f} s (slower than {DOWNLOAD_MIN_BYTES_PER_SECOND >> 10} KiB/s)"
            )
        return written, digest.hexdigest()

    # ------------------------------------------------------------------------------------ writing

    def put(
        self,
        object_key: str,
        body: bytes | IO[bytes],
        what: str,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        content_length: int | None = None,
    ) -> Put:
        """PutObject, created only if absent (``if_none_match``) or replacing only the ETag ``if_match``:
        a failed condition is ``Put.CONFLICT``, a concurrent conditional write ``Put.BUSY``; any other
        failure raises StoreUnavailable (a write may have landed before its answer was lost). An empty
        ``if_match`` (a store that sent no ETag) is refused: SeaweedFS takes ``If-Match: ""`` as no
        condition at all, which would let a pointer move backwards under racing writers."""
        if if_match is not None and not if_match:
            raise StoreUnavailable(
                f"adapter store {self.location}: cannot {what}: the store sent no ETag to compare-and-swap on"
            )
        extra: dict[str, Any] = {}
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        if if_match is not None:
            extra["IfMatch"] = if_match
        if content_length is not None:
            extra["ContentLength"] = content_length
        try:
            self.client.put_object(Bucket=self.name, Key=object_key, Body=body, **extra)
        except BOTO_ERRORS as exc:
            code = _code(exc)
            if extra.keys() & {"IfNoneMatch", "IfMatch"}:
                if code in _CONFLICT:
                    return Put.CONFLICT
                if code in _RETRY_CONFLICT:
                    return Put.BUSY
            raise self.translate(exc, what) from None
        return Put.DONE

    def delete(self, object_key: str, what: str) -> None:
        self.call(what, self.client.delete_object, Bucket=self.name, Key=object_key)

    # ------------------------------------------------------------------------------------ listing

    def list_keys(self, prefix: str) -> Iterator[str]:
        for object_key, _etag in self.list_etags(prefix):
            yield object_key

    def list_etags(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(key, ETag) of every object under ``prefix``."""
        for page in self.list_pages(prefix):
            assert page is not None  # no limit
            yield from page

    def list_pages(
        self, prefix: str, max_keys: int | None = None, *, start_after: str | None = None
    ) -> Iterator[list[tuple[str, str]] | None]:
        """(key, ETag) of every object under ``prefix`` (after the key ``start_after``), a page (one
        request) at a time; with ``max_keys``, no more keys than that are asked for, and a last ``None``
        says there were more."""
        token: str | None = None
        left = max_keys
        while True:
            keys = self.list_page_keys if left is None else min(self.list_page_keys, left)
            kwargs: dict[str, Any] = {"Bucket": self.name, "Prefix": prefix, "MaxKeys": keys}
            if token:
                kwargs["ContinuationToken"] = token
            elif start_after is not None:
                kwargs["StartAfter"] = start_after
            page = self.call(f"list {prefix or '/'}", self.client.list_objects_v2, **kwargs)
            items = [(str(item["Key"]), str(item.get("ETag", ""))) for item in page.get("Contents", ())]
            yield items
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            if left is not None:
                left -= len(items)
                if left <= 0:
                    yield None
                    return

    def folder_pages(self, prefix: str, first: int | None, *, start_after: str | None) -> Iterator[list[str]]:
        """The entries directly under ``prefix`` (``<prefix><name>/`` for a folder, a key for an object),
        a page (one request) at a time, after the key ``start_after``: pages of ``first`` entries at
        first (a page of a listing wants that many names), doubling to ``list_page_keys``."""
        token: str | None = None
        keys = self.list_page_keys if first is None else max(1, min(self.list_page_keys, first))
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.name, "Prefix": prefix, "Delimiter": "/", "MaxKeys": keys}
            if token:
                kwargs["ContinuationToken"] = token
            elif start_after is not None:
                # every name after ``after`` has its "<name>/" after the key "<after>" (none before is lost)
                kwargs["StartAfter"] = start_after
            page = self.call(f"list {prefix or '/'}", self.client.list_objects_v2, **kwargs)
            yield [str(common["Prefix"]) for common in page.get("CommonPrefixes", ())] + [
                str(item["Key"]) for item in page.get("Contents", ())
            ]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            keys = min(self.list_page_keys, keys * 2)

    # ------------------------------------------------------------------------------------ failures

    @contextmanager
    def reading(self, what: str) -> Iterator[None]:
        """A response body read: a connection lost or timed out mid-read is the store's failure."""
        try:
            yield
        except (AdapterFormatError, AdapterNotFound, StoreUnavailable):
            raise
        except OSError as exc:
            raise StoreUnavailable(f"adapter cache: cannot {what}: {exc.strerror or exc}") from None
        except BOTO_ERRORS as exc:
            raise self.translate(exc, what) from None

    def call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except BOTO_ERRORS as exc:
            raise self.translate(exc, what) from None

    def translate(self, exc: BaseException, what: str) -> StoreUnavailable:
        """A botocore failure as StoreUnavailable naming the store, the endpoint and the cause."""
        where = f"adapter store {self.location} (endpoint {self.endpoint_url})"
        code = _code(exc)
        if code == "NoSuchBucket" or (code in _MISSING_KEY and what == "reach the bucket"):
            return StoreUnavailable(f"{where}: cannot {what}: the bucket {self.name!r} does not exist")
        if code in _DENIED:
            return StoreUnavailable(
                f"{where}: cannot {what}: access denied ({code}); check the S3 credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and their rights on the bucket"
            )
        name = type(exc).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return StoreUnavailable(
                f"{where}: cannot {what}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
            )
        if code:
            message = getattr(exc, "response", {}).get("Error", {}).get("Message", "")
            return StoreUnavailable(f"{where}: cannot {what}: {code} {message}".rstrip())
        return StoreUnavailable(f"{where}: cannot {what}: the endpoint is unreachable or failed ({name}: {exc})")


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    code = response.get("Error", {}).get("Code")
    if code:
        return str(code)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(status) if status else ""
