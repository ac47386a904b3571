"""One interface, two adapter store backends: a local directory (default) and an S3-compatible bucket.

``open_store`` picks the backend from the location: ``s3://BUCKET[/PREFIX]`` is a bucket (boto3,
see ``s3_store``), anything else a local directory (``store.AdapterStore``). Both publish through the
same staging and validation code, keep versions immutable, and verify checksums before serving.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lorafleet_adapters.errors import InvalidStoreLocation

if TYPE_CHECKING:  # this module imports neither torch nor a backend: settings are read without them
    import torch

    from lorafleet_adapters.manifest import Manifest
    from lorafleet_adapters.peft_format import AdapterWeights, BaseModelSpec, Transposer
    from lorafleet_adapters.prompt import PromptTemplate
    from lorafleet_adapters.ref import AdapterKey, AdapterRef
    from lorafleet_adapters.store import AdapterSummary

S3_SCHEME = "s3://"
DEFAULT_CACHE_BYTES = 2 << 30

# S3 bucket names (the rules every S3 API shares): 3-63 of [a-z0-9.-], alphanumeric at both ends.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# A prefix is "/"-separated segments of safe characters: no empty segment, no "." or "..".
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_PREFIX_CHARS = 512


@dataclass(frozen=True)
class PublishesSince:
    """What a store's log of its last publishes says (``Store.publishes_since``)."""

    newest: str  # the id of the log's newest entry ("" when it holds none)
    moved: frozenset[tuple[str, str]] | None  # (tenant, name)s moved after the entry asked about; None: not known
    # The change token of the log as read (S3: the marker's ETag, "" where there was none): a watcher
    # keeps it rather than the token it read just before, so a log read older than that token (a store
    # without read-after-write consistency) is read again at the next poll. None: the store keeps no log.
    token: str | None


class Store(Protocol):
    """What serving, the CLI and training need from an adapter store."""

    @property
    def location(self) -> str: ...

    def check(self, *, create: bool = True) -> None:
        """Reach the store now: a clear StoreUnavailable otherwise. ``create``: a local store's missing
        root is made (serving, publishing); a command that only reads passes False, so a mistyped path
        is an error instead of a new, empty store."""
        ...

    def change_token(self) -> str:
        """A value that changes whenever a publish moves any adapter's ``latest`` pointer ("" before the
        first): the version watcher reads every pointer only when it changed (and on a slower rescan)."""
        ...

    def versions(self, tenant: str, name: str) -> tuple[int, ...]: ...

    def resolve(self, ref: AdapterRef) -> AdapterKey: ...

    def latest_versions(self, tenant: str, names: Collection[str]) -> dict[str, int]:
        """What ``resolve`` gives each of ``names`` by latest, for those the store can read in bulk more
        cheaply than one by one; the others (all, on a store with no cheaper way) are left out."""
        ...

    def publishes_since(self, seen: str | None) -> PublishesSince:
        """The newest publish's id and the (tenant, name)s whose pointers publishes moved after the one
        with id ``seen``, for a store that keeps a short log of its last publishes. The names are None
        when that is not known: ``seen`` is None or no longer in the log, or the store keeps none. A
        publish is in the log once its pointer moved, so reading those names' pointers finds it."""
        ...

    def list(
        self, tenant: str | None = None, *, after: tuple[str, str] | None = None, limit: int | None = None
    ) -> builtins.list[AdapterSummary]:
        """The adapters with a published version (of ``tenant``), by tenant and name: those after
        ``after`` (tenant, name), at most ``limit`` of them (None: all), reading only those."""
        ...

    def manifest(self, key: AdapterKey) -> Manifest: ...

    def version_dir(self, key: AdapterKey) -> Path: ...

    def load(
        self,
        key: AdapterKey,
        spec: BaseModelSpec,
        *,
        dtype: torch.dtype = ...,
        transpose: Transposer | None = None,
    ) -> AdapterWeights:
        """Verified weights of a LoRA version, as ``dtype`` (the device slots' dtype, float32 when not
        given: see AdapterWeights), laid out by ``transpose`` (peft_format.transpose_scaled when None)."""
        ...

    def load_prompt(self, key: AdapterKey) -> PromptTemplate: ...

    def new_staging(self, tenant: str, name: str) -> Path: ...

    def publish_staged(
        self, staging: Path, tenant: str, name: str, manifest_for: Callable[[int], Manifest]
    ) -> AdapterKey: ...

    def import_peft(
        self,
        src: Path,
        tenant: str,
        name: str,
        spec: BaseModelSpec,
        *,
        method: str = "lora",
        extra: Mapping[str, Any] | None = None,
    ) -> AdapterKey: ...

    def publish_prompt(
        self,
        tenant: str,
        name: str,
        template: PromptTemplate,
        spec: BaseModelSpec,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> AdapterKey: ...


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or "a/b" (no leading or trailing "/")

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{S3_SCHEME}{self.bucket}"


def is_s3_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.lower().startswith(S3_SCHEME)


def parse_s3_url(url: str) -> S3Location:
    """``s3://BUCKET[/PREFIX]`` checked strictly; InvalidStoreLocation says what is wrong."""
    if not url.lower().startswith(S3_SCHEME):
        raise InvalidStoreLocation(
            f"adapter store {url!r}: unsupported URL; give a local directory or {S3_SCHEME}BUCKET/PREFIX"
        )
    if not url.startswith(S3_SCHEME):
        raise InvalidStoreLocation(f"adapter store URL {url!r}: write the scheme in lower case ({S3_SCHEME})")
    rest = url[len(S3_SCHEME) :]
    if any(c in rest for c in "?#\\") or not rest.isascii() or any(c.isspace() for c in rest):
        raise InvalidStoreLocation(
            f"adapter store URL {url!r}: expected s3://BUCKET/PREFIX without query, fragment, spaces or backslashes"
        )
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise InvalidStoreLocation(f"adapter store URL {url!r} names no bucket (expected s3://BUCKET/PREFIX)")
    if _BUCKET.fullmatch(bucket) is None or ".." in bucket:
        raise InvalidStoreLocation(
            f"adapter store URL {url!r}: {bucket!r} is not a valid bucket name "
            "(3-63 characters of a-z, 0-9, '.' and '-', starting and ending with a letter or digit)"
        )
    prefix = prefix.rstrip("/")
    if len(prefix) > MAX_PREFIX_CHARS:
        raise InvalidStoreLocation(f"adapter store URL {url!r}: the prefix is over {MAX_PREFIX_CHARS} characters")
    if prefix:
        for segment in prefix.split("/"):
            if _SEGMENT.fullmatch(segment) is None:
                raise InvalidStoreLocation(
                    f"adapter store URL {url!r}: prefix segment {segment!r} is not allowed "
                    "(non-empty, [A-Za-z0-9._-], not starting with '.' or '-')"
                )
    return S3Location(bucket, prefix)


@dataclass(frozen=True)
class StoreSettings:
    """Where the store is and how a replica caches it; built from ServerConfig (or the CLI)."""

    location: str  # a local directory, or s3://BUCKET/PREFIX
    # None: AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL (the AWS SDKs' own variables, read by the S3 store
    # as boto3 reads them), then AWS
    s3_endpoint_url: str | None = None
    cache_dir: Path | None = None  # S3 only: verified versions on local disk (None: a temporary dir)
    cache_bytes: int = DEFAULT_CACHE_BYTES

    def __post_init__(self) -> None:
        if is_s3_url(self.location) or "://" in self.location:
            parse_s3_url(self.location)  # refuse a bad URL (or another scheme) before anything runs
        elif not self.location:
            raise InvalidStoreLocation("the adapter store location is empty")
        if self.s3_endpoint_url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.s3_endpoint_url):
            raise InvalidStoreLocation(f"S3 endpoint URL {self.s3_endpoint_url!r}: expected http(s)://HOST[:PORT]")
        if self.cache_bytes <= 0:
            raise InvalidStoreLocation(f"adapter cache size must be > 0 bytes, got {self.cache_bytes}")

    @property
    def is_s3(self) -> bool:
        return is_s3_url(self.location)


def open_store(settings: StoreSettings, on_cache_event: Callable[[str], None] | None = None) -> Store:
    """The backend for ``settings.location``; nothing is contacted yet (see ``Store.check``).

    ``on_cache_event`` hears the S3 backend's disk cache: "hit", "miss", "load", "evict".
    """
    if settings.is_s3:
        from lorafleet_adapters.s3_store import S3AdapterStore

        return S3AdapterStore(
            parse_s3_url(settings.location),
            endpoint_url=settings.s3_endpoint_url,
            cache_dir=settings.cache_dir,
            cache_bytes=settings.cache_bytes,
            on_cache_event=on_cache_event,
        )
    from lorafleet_adapters.store import AdapterStore

    return AdapterStore(Path(settings.location))
