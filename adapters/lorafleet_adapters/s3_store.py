"""The S3-compatible adapter store (boto3): versions shared by every replica of a fleet.

Layout under ``s3://BUCKET/PREFIX``::

    PREFIX/<tenant>/<name>/claims/<version>                    who took the number (created once)
    PREFIX/<tenant>/<name>/versions/<version>/<file>           adapter files (immutable)
    PREFIX/<tenant>/<name>/versions/<version>/manifest.json    written last: the version exists
    PREFIX/<tenant>/<name>/latest                              the latest version number

Publishing (every step a single-object S3 request, so no step can be seen half done):

1. Stage and validate the files locally (the same code as the local backend), hash them.
2. Claim the next number: create ``claims/<N>`` with ``If-None-Match: *``. Of racing publishers
   exactly one gets each N (the others see 412 and try N+1), so nobody ever writes into
   another's version.
3. Upload the files, then ``manifest.json`` (again ``If-None-Match: *``). Readers trust only
   versions whose manifest exists and whose files match its sha256s, so a publisher that dies
   mid-upload leaves invisible leftovers and a burnt number, never a visible half version.
4. Move ``latest`` forward by compare-and-swap: create it with ``If-None-Match: *``, or replace it
   with ``If-Match: <the ETag read>``; on 412 re-read and retry. It never moves backwards.
5. Append the publish to ``PREFIX/.published``, the log of the last publishes (the same
   compare-and-swap): its ETag is the watchers' change token, its lines what moved.

Replicas download a version once, verify every checksum, and keep it in a bounded LRU cache on
local disk (``disk_cache.VersionCache``); loads re-verify the cached files. The requests themselves,
their timeouts, retries and errors (``StoreUnavailable`` naming the endpoint, bucket and cause) are
``s3_bucket.S3Bucket``'s.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafleet_adapters.backend import PublishesSince, S3Location
from lorafleet_adapters.disk_cache import VersionCache
from lorafleet_adapters.errors import (
    AdapterError,
    AdapterFormatError,
    AdapterNotFound,
    InvalidAdapterRef,
    StoreUnavailable,
)
from lorafleet_adapters.lru import LruMap
from lorafleet_adapters.manifest import MAX_MANIFEST_BYTES, Manifest, check_loadable_lora, sha256_file, utc_now_iso
from lorafleet_adapters.peft_format import (
    WEIGHTS_FILE,
    AdapterWeights,
    BaseModelSpec,
    LoadPlans,
    Transposer,
    load_adapter_weights,
    max_weights_bytes,
)
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_adapters.ref import MAX_VERSION, AdapterKey, AdapterRef, check_ident, is_ident, parse_version
from lorafleet_adapters.s3_bucket import (
    CONNECT_TIMEOUT_SECONDS,
    MAX_ATTEMPTS,
    READ_TIMEOUT_SECONDS,
    ObjectTooLarge,
    Put,
    S3Bucket,
)
from lorafleet_adapters.store import (
    MANIFEST_FILE,
    MAX_SMALL_FILE_BYTES,
    PUBLISHED_MARKER,
    AdapterSummary,
    import_peft_via,
    marker_text,
    publish_prompt_via,
    required_files,
    start_listed,
)
from lorafleet_adapters.verified_read import VerifiedFiles

log = logging.getLogger(__name__)

LATEST_KEY = "latest"
VERSIONS_KEY = "versions"
CLAIMS_KEY = "claims"
MAX_FILE_BYTES = 4 << 30
MAX_CAS_TRIES = 64
MAX_CLAIM_TRIES = 1000
KNOWN_VERSIONS_KEPT = 16384  # versions seen to exist, so resolving one again needs no HEAD
MANIFESTS_KEPT = 4096
# A listing request costs about two pointer reads (GETs) plus one per 14 keys it returns: SeaweedFS on
# the same machine, 14.5 ms for 100 keys, 38.5 for 300, 118 for 1,000, against 1.7 ms a GET. A bulk
# read of n pointers lists at most (n - 2) * 14 keys, so it never costs more than reading them.
KEYS_LISTED_PER_POINTER_READ = 14
# The publish marker is also a log of the last publishes (one marker_text line each, oldest first), so a
# watcher whose change token moved reads the pointers those publishes moved, not every one it watches.
PUBLISH_LOG_ENTRIES = 64
MAX_PUBLISH_LOG_BYTES = 64 << 10  # a line is under 400 bytes


def _manifest_of(key: AdapterKey, data: bytes) -> Manifest:
    """``data`` parsed as ``key``'s manifest (AdapterFormatError if it is not one, or another key's)."""
    manifest = Manifest.from_json(data)
    if (manifest.tenant, manifest.name, manifest.version) != (key.tenant, key.name, key.version):
        raise AdapterFormatError(
            f"{key}: {MANIFEST_FILE} describes {manifest.tenant}/{manifest.name}@{manifest.version}"
        )
    return manifest


class S3AdapterStore:
    def __init__(
        self,
        location: S3Location,
        *,
        endpoint_url: str | None = None,
        cache_dir: Path | None = None,
        cache_bytes: int = 2 << 30,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        read_timeout: float = READ_TIMEOUT_SECONDS,
        max_attempts: int = MAX_ATTEMPTS,
        on_cache_event: Callable[[str], None] | None = None,
    ) -> None:
        self.bucket = S3Bucket(
            location,
            endpoint_url=endpoint_url,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
        )
        # tenant -> the largest key budget its listing ran past: not listed again within that budget
        self._over_budget: LruMap[str, int] = LruMap(KNOWN_VERSIONS_KEPT)
        if cache_dir is None:  # a one-off command: a temporary cache, removed with this object
            cache_dir = Path(tempfile.mkdtemp(prefix="lorafleet-s3-"))
            weakref.finalize(self, shutil.rmtree, cache_dir, True)
        # One directory per (endpoint, bucket, prefix) and per replica: entries are never shared.
        self._on_cache_event = on_cache_event or (lambda _event: None)
        self.cache = VersionCache(
            Path(cache_dir) / _namespace(self.bucket.endpoint_url, location), cache_bytes, on_evict=self._on_cache_event
        )
        # Versions whose manifest exists, and manifests read: immutable, so kept (the most recent ones).
        self._known: LruMap[AdapterKey, bool] = LruMap(KNOWN_VERSIONS_KEPT)
        self._manifests: LruMap[AdapterKey, Manifest] = LruMap(MANIFESTS_KEPT)
        self._plans = LoadPlans()  # checked safetensors headers, by their bytes (peft_format.py)
        self._verified = VerifiedFiles()  # cached files hashed once by this process (verified_read.py)
        self._lock = threading.Lock()
        self._key_locks: dict[AdapterKey, _KeyLock] = {}  # only while some thread holds or waits for one

    # ------------------------------------------------------------------------------------- basics

    @property
    def location(self) -> str:
        return self.bucket.location

    @property
    def endpoint_url(self) -> str:
        return self.bucket.endpoint_url

    def __repr__(self) -> str:
        return f"S3AdapterStore({self.location!r}, endpoint={self.endpoint_url!r})"

    def check(self, *, create: bool = True) -> None:
        """Reach the bucket now (HeadBucket, then one listing): a clear StoreUnavailable otherwise. A
        bucket is never created (``create`` is for a local store's directory)."""
        self.bucket.check()

    # ------------------------------------------------------------------------------------ reading

    def change_token(self) -> str:
        """The publish marker's ETag ("" before any publish wrote one): one HEAD. It changes whenever a
        publish moves a ``latest`` pointer and appends its line (each write has new content); a pointer
        moved by hand, or by a publish that could not append (logged), does not."""
        return self.bucket.head_etag(self._key(PUBLISHED_MARKER)) or ""

    def versions(self, tenant: str, name: str) -> tuple[int, ...]:
        """Published versions (those with a manifest), ascending."""
        check_ident(tenant, "tenant")
        check_ident(name, "adapter name")
        base = self._key(tenant, name, VERSIONS_KEY) + "/"
        found: set[int] = set()
        for key in self.bucket.list_keys(base):
            version = _published_version(key[len(base) :])
            if version is not None:
                found.add(version)
        for version in found:
            self._known.put(AdapterKey(tenant, name, version), True)
        return tuple(sorted(found))

    def round_trips(self) -> int:
        """Requests the calling thread has sent to the endpoint so far (every attempt): a call that sent
        none was answered by this store's caches, and says nothing of whether the endpoint answers (the
        serving side's gate). Per thread: counting every thread's, a call its caches answered took the
        version watcher's attempts, sent meanwhile, for an answer, and reopened the gate mid-outage."""
        return self.bucket.round_trips()

    def resolve(self, ref: AdapterRef) -> AdapterKey:
        if ref.version is not None:
            key = AdapterKey(ref.tenant, ref.name, ref.version)
            if not self._exists(key):
                known = self.versions(ref.tenant, ref.name)
                if not known:
                    raise AdapterNotFound(f"adapter {ref.tenant}/{ref.name} not found")
                raise AdapterNotFound(
                    f"adapter {ref.tenant}/{ref.name} has no version {ref.version} (has {list(known)})"
                )
            return key
        latest, _etag = self._read_latest(ref.tenant, ref.name)
        if latest is None:
            versions = self.versions(ref.tenant, ref.name)
            if not versions:
                raise AdapterNotFound(f"adapter {ref.tenant}/{ref.name} not found")
            latest = versions[-1]
        key = AdapterKey(ref.tenant, ref.name, latest)
        if not self._exists(key):
            raise AdapterNotFound(
                f"adapter {ref.tenant}/{ref.name}: the '{LATEST_KEY}' pointer names version {latest}, "
                "which does not exist"
            )
        return key

    def list(
        self, tenant: str | None = None, *, after: tuple[str, str] | None = None, limit: int | None = None
    ) -> builtins.list[AdapterSummary]:
        """The adapters with a published version, by tenant and name: those after ``after`` (tenant,
        name), at most ``limit`` of them (None: all). All of a tenant come from one listing of its keys
        (paged by 1,000), not two requests per adapter; a page of ``limit`` lists the tenant's names
        after ``after`` until the first ``limit`` are known, then only the keys of those names, so
        paging through a large store costs each page its own adapters, not the whole store again. A
        ``latest`` pointer as publishes write it is read from the listing (its ETag is the MD5 of
        ``"<version>\\n"``); any other is fetched."""
        tenants = [check_ident(tenant, "tenant")] if tenant is not None else self._idents(self._key())
        summaries: builtins.list[AdapterSummary] = []
        for tenant_name in tenants:
            if after is not None and tenant_name < after[0]:
                continue
            skip = after[1] if after is not None and tenant_name == after[0] else None
            if limit is None:
                listing = self._tenant_listing(tenant_name)
                assert listing is not None  # no key limit
                summaries += self._summaries(tenant_name, listing, skip)
                continue
            cursor = skip
            while len(summaries) < limit:
                # names without a published version are left out: the next ones fill their places
                wanted = limit - len(summaries)
                taken = self._idents(self._key(tenant_name), after=cursor, first=wanted)
                if not taken:
                    break
                listing = self._tenant_listing(tenant_name, names=(cursor, taken))
                assert listing is not None
                summaries += self._summaries(tenant_name, listing, None)
                if len(taken) < wanted:
                    break  # the tenant has no more names
                cursor = taken[-1]
            if len(summaries) >= limit:
                break
        return summaries

    def _summaries(
        self, tenant: str, listing: tuple[dict[str, tuple[int, ...]], dict[str, str]], after: str | None
    ) -> builtins.list[AdapterSummary]:
        """A tenant listing's adapters (names after ``after``) by name, each with its latest version."""
        versions, pointers = listing
        summaries = []
        for adapter_name in sorted(versions):
            if after is not None and adapter_name <= after:
                continue
            found = versions[adapter_name]
            latest = self._latest_from_etag(pointers.get(adapter_name), found)
            if latest is None and adapter_name in pointers:  # written some other way: read it
                try:
                    latest, _ = self._read_latest(tenant, adapter_name)
                except AdapterNotFound:
                    latest = None
            if latest is None:
                latest = found[-1]
            summaries.append(AdapterSummary(tenant, adapter_name, found, latest if latest in found else None))
        return summaries

    def publishes_since(self, seen: str | None) -> PublishesSince:
        """One GET of the publish marker, the log of the last PUBLISH_LOG_ENTRIES publishes: the names
        published after the entry with id ``seen`` (None where it is not in the log: too old, or the log
        was rewritten by a release before the log, or is larger than MAX_PUBLISH_LOG_BYTES), and the
        ETag of the body read (the change token that log goes with)."""
        lines, etag = self._publish_log()
        entries = [entry for _, entry in lines]
        newest = entries[-1][2] if entries else ""
        ids = [entry[2] for entry in entries]
        if seen is None or seen not in ids:
            return PublishesSince(newest, None, etag or "")
        moved = frozenset((tenant, name) for tenant, name, _ in entries[ids.index(seen) + 1 :])
        return PublishesSince(newest, moved, etag or "")

    def latest_versions(self, tenant: str, names: Collection[str]) -> dict[str, int]:
        """The version ``resolve`` gives each of ``names`` (adapters of ``tenant``) by latest, read from one
        listing of the tenant's keys where that costs less than a pointer read per name: it stops past
        ``KEYS_LISTED_PER_POINTER_READ`` keys per name (less two names' worth), and then leaves every name
        out. A name is also left out when the listing cannot tell (no published version, a pointer
        written other than as publishes write it). A tenant that ran past a budget is not listed again
        within that budget (versions are kept, so its keys do not shrink). Resolve the names left out."""
        check_ident(tenant, "tenant")
        wanted = set(names)
        budget = (len(wanted) - 2) * KEYS_LISTED_PER_POINTER_READ
        if budget <= 0 or budget <= (self._over_budget.get(tenant) or 0):
            return {}  # a tenant's keys only grow (versions are kept): past this budget before, past it now
        listing = self._tenant_listing(tenant, max_keys=budget)
        if listing is None:
            self._over_budget.put(tenant, budget)
            return {}
        versions, pointers = listing
        latest: dict[str, int] = {}
        for name in wanted & versions.keys():
            found = versions[name]
            version = self._latest_from_etag(pointers[name], found) if name in pointers else found[-1]
            if version is not None:
                latest[name] = version
        return latest

    def _tenant_listing(
        self, tenant: str, max_keys: int | None = None, names: tuple[str | None, Sequence[str]] | None = None
    ) -> tuple[dict[str, tuple[int, ...]], dict[str, str]] | None:
        """From one listing of a tenant's keys: each valid adapter name's published versions (ascending;
        names without one left out) and the ETag of each name's ``latest`` pointer. None when the tenant
        has more than ``max_keys`` keys (no more are asked for). With ``names`` (the name before them or
        None, and names consecutive in name order), only the range of keys that holds theirs is listed,
        and only they are in the answer."""
        base = self._key(tenant) + "/"
        versions: dict[str, set[int]] = {}
        pointers: dict[str, str] = {}  # name -> the latest pointer's ETag
        start_after = wanted = last_key = None
        if names is not None:
            cursor, taken = names
            if not taken:
                return {}, {}
            # S3 lists keys in byte order, where "a-b/..." comes before "a/..." ("-" sorts before "/"),
            # and starts after any key; SeaweedFS lists a folder's entries in name order ("a" before
            # "a-b") and starts after the entry StartAfter names. Starting after the name before these
            # suits both, and a key of another valid name that is past all of theirs in bytes ends the
            # listing in both: in byte order every key of theirs came before it, in name order every
            # name of theirs did (they are the names that follow the one before them).
            wanted, last_key = frozenset(taken), max(f"{n}/" for n in taken)
            start_after = None if cursor is None else base + cursor
        for page in self.bucket.list_pages(base, max_keys, start_after=start_after):
            if page is None:
                return None
            for object_key, etag in page:
                relative = object_key[len(base) :]
                name, _, rest = relative.partition("/")
                if wanted is not None and name not in wanted:
                    assert last_key is not None
                    if relative > last_key and not relative.startswith(last_key) and is_ident(name):
                        break  # past every one of them: no more pages are asked for
                    continue
                if rest == LATEST_KEY:
                    pointers[name] = etag
                    continue
                sub, _, rest = rest.partition("/")
                version = _published_version(rest) if sub == VERSIONS_KEY else None
                if version is not None:
                    versions.setdefault(name, set()).add(version)
            else:
                continue
            break
        published: dict[str, tuple[int, ...]] = {}
        for name, found in versions.items():
            try:
                check_ident(name, "adapter name")
            except InvalidAdapterRef:
                continue
            published[name] = tuple(sorted(found))
            for version in found:
                self._known.put(AdapterKey(tenant, name, version), True)
        return published, pointers

    @staticmethod
    def _latest_from_etag(etag: str | None, versions: tuple[int, ...]) -> int | None:
        """The version a pointer with ``etag`` names, when it is one of ``versions`` written as publishes
        write pointers (a single-part PUT's ETag is the MD5 of its body); None when that cannot tell."""
        if etag is None:
            return None
        digest = etag.strip('"').lower()
        for version in reversed(versions):  # the newest is the likeliest
            if hashlib.md5(_pointer_body(version), usedforsecurity=False).hexdigest() == digest:
                return version
        return None

    def manifest(self, key: AdapterKey) -> Manifest:
        cached = self._manifests.get(key)
        if cached is not None:
            return cached
        manifest = self._cached_manifest(key)
        if manifest is None:
            fetched = self.bucket.get_small(
                self._version_key(key, MANIFEST_FILE), MAX_MANIFEST_BYTES, f"read {key}'s manifest"
            )
            if fetched is None:
                raise AdapterNotFound(f"adapter {key} not found")
            manifest = _manifest_of(key, fetched)
        self._manifests.put(key, manifest)
        self._known.put(key, True)
        return manifest

    def _cached_manifest(self, key: AdapterKey) -> Manifest | None:
        """The disk cache's copy of ``key``'s manifest; None when it has none, or an unusable one (then
        the entry is dropped and the store's copy is read: a crash can leave a renamed entry whose
        manifest never reached the disk, which was refused for good)."""
        local = self.cache.lookup(key)
        if local is None:
            return None
        try:
            return _manifest_of(key, (local / MANIFEST_FILE).read_bytes())
        except FileNotFoundError:  # evicted meanwhile, or never written
            return None
        except (OSError, AdapterFormatError) as exc:
            log.warning("adapter %s: the disk cache's manifest is unusable (%s); reading the store's", key, exc)
            self.cache.drop(key)
            return None

    def version_dir(self, key: AdapterKey) -> Path:
        """A local directory holding ``key``'s files, downloaded once and verified against its manifest.

        Read it soon: once this returns, a later download may evict it (least recently used first).
        ``load`` and ``load_prompt`` hold the entry while they read.
        """
        with self._local(key) as (path, _):
            return path

    def load(
        self,
        key: AdapterKey,
        spec: BaseModelSpec,
        *,
        dtype: torch.dtype = torch.float32,
        transpose: Transposer | None = None,
    ) -> AdapterWeights:
        manifest = self.manifest(key)
        check_loadable_lora(key, manifest, spec)  # before downloading megabytes for nothing
        expected = manifest.files.get(WEIGHTS_FILE)
        if expected is None:
            raise AdapterFormatError(f"{key}: {MANIFEST_FILE} does not list {WEIGHTS_FILE}")
        # Like the local backend: the weights file read once, its tensors made from the bytes hashed
        # (once per process; later loads check the file's fstat identity), returned when they match.
        for attempt in range(2):
            with self._local(key, skip=WEIGHTS_FILE) as (path, downloaded):
                if downloaded:  # its every byte hashed on the way in, just now: not hashed twice
                    return load_adapter_weights(path, spec, key, dtype=dtype, plans=self._plans, transpose=transpose)
                weights = path / WEIGHTS_FILE

                def tensors(data: memoryview, path: Path = path) -> AdapterWeights:
                    return load_adapter_weights(
                        path, spec, key, dtype=dtype, data=data, plans=self._plans, transpose=transpose
                    )

                try:
                    return start_listed(self._verified, key, weights, manifest, max_weights_bytes(spec)).use(tensors)
                except AdapterFormatError as exc:
                    if attempt or _intact(weights, expected):  # the version itself is bad, not this copy
                        raise
                    log.warning("adapter %s: the cached copy is damaged (%s); downloading it again", key, exc)
                    self._verified.forget(weights)
                    self.cache.drop(key)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def load_prompt(self, key: AdapterKey) -> PromptTemplate:
        manifest = self.manifest(key)
        if manifest.kind != "prompt":
            raise AdapterFormatError(f"{key}: manifest kind is {manifest.kind!r}, not 'prompt'")
        with self._local(key) as (path, _):
            return PromptTemplate.read(path)

    # --------------------------------------------------------------------------------- publishing

    def import_peft(
        self,
        src: Path,
        tenant: str,
        name: str,
        spec: BaseModelSpec,
        *,
        method: str = "lora",
        extra: Mapping[str, Any] | None = None,
    ) -> AdapterKey:
        return import_peft_via(self, src, tenant, name, spec, method, extra)

    def publish_prompt(
        self,
        tenant: str,
        name: str,
        template: PromptTemplate,
        spec: BaseModelSpec,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> AdapterKey:
        return publish_prompt_via(self, tenant, name, template, spec, extra)

    def new_staging(self, tenant: str, name: str) -> Path:
        """A local directory to stage one publish in (validated here, then uploaded)."""
        check_ident(tenant, "tenant")
        check_ident(name, "adapter name")
        try:
            return Path(tempfile.mkdtemp(prefix=f"lorafleet-publish-{tenant}.{name}."))
        except OSError as exc:
            raise StoreUnavailable(f"cannot create a staging directory: {exc.strerror or exc}") from None

    def publish_staged(
        self, staging: Path, tenant: str, name: str, manifest_for: Callable[[int], Manifest]
    ) -> AdapterKey:
        """Claim the next version, upload the staged files and then the manifest, move ``latest``.

        ``staging`` is removed on success; on failure nothing is visible (no manifest) and the
        caller removes ``staging``.
        """
        version = self._claim(tenant, name)
        key = AdapterKey(tenant, name, version)
        manifest = manifest_for(version)
        if (manifest.tenant, manifest.name, manifest.version) != (tenant, name, version):
            raise AdapterFormatError(
                f"the staged manifest describes {manifest.tenant}/{manifest.name}@{manifest.version}"
            )
        for required in required_files(manifest.kind):
            if required not in manifest.files:
                raise AdapterFormatError(f"{key}: the staged manifest does not list {required}")
        uploaded: builtins.list[str] = []
        manifest_sent = False
        try:
            for file_name, digest in sorted(manifest.files.items()):
                path = staging / file_name
                if not path.is_file() or sha256_file(path) != digest:
                    raise AdapterFormatError(f"{key}: staged {file_name} is missing or does not match its sha256")
                with open(path, "rb") as body:
                    self.bucket.put(
                        self._version_key(key, file_name),
                        body,
                        f"upload {file_name} of {key}",
                        content_length=path.stat().st_size,
                    )
                uploaded.append(file_name)
            # Last: from this write on the version exists. Never replaces an object.
            manifest_sent = True
            self._put_manifest(key, manifest.to_json().encode())
        except BaseException:
            if manifest_sent:
                # The store may still complete a write its client gave up on (a timeout, a 5xx): with
                # the files removed, a version would appear without them. Files without a manifest are
                # invisible to readers; the version number stays claimed either way.
                log.warning("the publish of %s failed writing its manifest; its files stay in the store", key)
            else:
                self._cleanup_failed(key, uploaded)
            raise
        shutil.rmtree(staging, ignore_errors=True)
        self._known.put(key, True)
        try:
            self.advance_latest(key)
        except StoreUnavailable as exc:
            raise StoreUnavailable(
                f"{key} is published (complete and verifiable) but its latest pointer did not move: {exc}; "
                "the next publish of the adapter moves it"
            ) from None
        return key

    def advance_latest(self, key: AdapterKey) -> bool:
        """Move ``latest`` to ``key`` unless it already names ``key`` or a later version (CAS on the ETag).

        True if this call wrote the pointer. A damaged pointer (junk) is replaced, like the local
        backend does: ``key`` is at least as high as every version that existed when it was claimed.
        """
        for attempt in range(MAX_CAS_TRIES):
            try:
                current, etag = self._read_latest(key.tenant, key.name)
            except AdapterNotFound as exc:  # junk in the pointer: replace it (by its ETag)
                log.warning(
                    "adapter %s/%s: replacing a damaged '%s' pointer: %s", key.tenant, key.name, LATEST_KEY, exc
                )
                current, etag = None, self.bucket.head_etag(self._key(key.tenant, key.name, LATEST_KEY))
            if current is not None and current >= key.version:
                if attempt and current == key.version:  # an earlier try landed but its answer was lost
                    self._mark_published(key)
                    return True
                return False
            body = _pointer_body(key.version)
            pointer = self._key(key.tenant, key.name, LATEST_KEY)
            what = f"move {key.tenant}/{key.name}'s latest pointer"
            if self.bucket.put(pointer, body, what, if_none_match=etag is None, if_match=etag) is not Put.DONE:
                time.sleep(random.uniform(0, 0.01 * (attempt + 1)))
                continue
            self._mark_published(key)
            return True
        raise StoreUnavailable(
            f"adapter store {self.location}: could not move {key.tenant}/{key.name}'s latest pointer to "
            f"{key.version} after {MAX_CAS_TRIES} conflicting writes"
        )

    # ------------------------------------------------------------------------------------ helpers

    def _mark_published(self, key: AdapterKey) -> None:
        """Append ``key``'s publish to the publish marker after its pointer moved, by compare-and-swap on
        the marker's ETag, keeping the last PUBLISH_LOG_ENTRIES. Every write is conditional: one that
        landed but whose answer was lost (a 412 on boto3's retry) is found in the log and not written
        again, and a replayed write can never put back an older log over another publisher's line.
        Where the swap keeps losing, or the store fails, the publish stays out of the log (logged):
        running servers find it at their next full rescan. A failure only delays discovery."""
        marker = self._key(PUBLISHED_MARKER)
        line = marker_text(key)
        why = f"{MAX_CAS_TRIES} conflicting writes"
        try:
            for attempt in range(MAX_CAS_TRIES):
                logged, etag = self._publish_log()
                lines = [text for text, _ in logged]
                if line in lines:  # a write whose answer was lost (then retried: 412) landed
                    return
                keep = lines[max(0, len(lines) - (PUBLISH_LOG_ENTRIES - 1)) :]
                body = "".join(keep) + line
                while len(body.encode()) > MAX_PUBLISH_LOG_BYTES and "\n" in body[:-1]:  # long names: fewer
                    body = body.partition("\n")[2]
                written = self.bucket.put(
                    marker, body.encode(), "append to the publish log", if_none_match=etag is None, if_match=etag
                )
                if written is Put.DONE:
                    return
                time.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        except AdapterError as exc:  # a write may have landed before its answer failed
            why = f"{exc}; the line may have landed all the same"
        log.warning(
            "%s is published but not in the store's '%s' log (%s): running servers find it at their next "
            "full rescan, not their next poll",
            key,
            PUBLISHED_MARKER,
            why,
        )

    def _publish_log(self) -> tuple[builtins.list[tuple[str, tuple[str, str, str]]], str | None]:
        """The publish marker's lines that are log entries (each ending in a newline, with its
        ``_publish_entry``) and its ETag; no lines and no ETag without a marker, no lines where it is
        larger than MAX_PUBLISH_LOG_BYTES."""
        got = self.bucket.get_bounded(self._key(PUBLISHED_MARKER), MAX_PUBLISH_LOG_BYTES, "read the publish marker")
        if got is None:
            return [], None
        data, etag = got
        if not etag:  # no compare-and-swap without one
            raise StoreUnavailable(f"adapter store {self.location}: the publish marker came without an ETag")
        if len(data) > MAX_PUBLISH_LOG_BYTES:
            return [], etag
        parsed = ((line, _publish_entry(line)) for line in data.decode("utf-8", "replace").splitlines())
        return [(line + "\n", entry) for line, entry in parsed if entry is not None], etag

    def _key(self, *parts: str) -> str:
        """The object key of ``parts`` under the prefix ("" for the prefix itself, "/"-terminated)."""
        return self.bucket.key(*parts)

    def _version_key(self, key: AdapterKey, file_name: str) -> str:
        return self._key(key.tenant, key.name, VERSIONS_KEY, str(key.version), file_name)

    def _claim(self, tenant: str, name: str) -> int:
        """Take the next free version number with a create-only write of ``claims/<N>``."""
        taken = [
            n for sub in (CLAIMS_KEY, VERSIONS_KEY) for n in self._numbers_under(self._key(tenant, name, sub) + "/")
        ]
        version = max(taken, default=0) + 1
        body = json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "claimed_at": utc_now_iso()}, sort_keys=True
        ).encode()
        for _ in range(MAX_CLAIM_TRIES):
            if version > MAX_VERSION:
                raise AdapterFormatError(f"{tenant}/{name}: no version number left after {MAX_VERSION}")
            claim = self._key(tenant, name, CLAIMS_KEY, str(version))
            written = self.bucket.put(claim, body, f"claim version {version} of {tenant}/{name}", if_none_match=True)
            if written is Put.DONE:
                return version
            if written is Put.CONFLICT:
                version += 1  # another publisher has this number
            else:
                time.sleep(random.uniform(0, 0.05))
        raise StoreUnavailable(
            f"adapter store {self.location}: no free version of {tenant}/{name} after {MAX_CLAIM_TRIES} tries"
        )

    def _put_manifest(self, key: AdapterKey, body: bytes) -> None:
        """Write ``key``'s manifest unless one exists. A manifest already there with these very bytes is
        this publish's own: the client retried a write whose answer was lost (then 412), and the
        version is complete; that was reported as a failed publish, and ``latest`` never moved."""
        object_key = self._version_key(key, MANIFEST_FILE)
        try:
            self._put_if_absent(object_key, body, f"publish {key}")
        except StoreUnavailable:
            try:
                landed = self.bucket.get_small(object_key, MAX_MANIFEST_BYTES, f"read {key}'s manifest") == body
            except (StoreUnavailable, AdapterFormatError):
                landed = False
            if not landed:
                raise  # the write's own failure
            log.info("adapter %s: the manifest's write had landed before its failure was reported", key)

    def _put_if_absent(self, object_key: str, body: bytes, what: str) -> None:
        written = self.bucket.put(object_key, body, what, if_none_match=True)
        if written is not Put.DONE:
            raise StoreUnavailable(
                f"adapter store {self.location}: cannot {what}: {object_key} already exists "
                "(another writer broke the claim protocol)"
                if written is Put.CONFLICT
                else f"adapter store {self.location}: cannot {what}: a concurrent write to {object_key}; retry"
            )

    def _cleanup_failed(self, key: AdapterKey, uploaded: builtins.list[str]) -> None:
        """Best effort after a failed publish: remove its files, unless its manifest made it (then the
        version is complete and stays). Invisible either way: readers need the manifest."""
        try:
            if self.bucket.head_etag(self._version_key(key, MANIFEST_FILE)) is not None:
                return
            for file_name in uploaded:
                self.bucket.delete(self._version_key(key, file_name), f"remove {file_name} of {key}")
        except StoreUnavailable as exc:
            log.warning("could not remove the files of the failed publish of %s: %s", key, exc)

    def _exists(self, key: AdapterKey) -> bool:
        if self._known.get(key):
            return True
        if self.bucket.head_etag(self._version_key(key, MANIFEST_FILE)) is None:
            return False
        self._known.put(key, True)
        return True

    def _read_latest(self, tenant: str, name: str) -> tuple[int | None, str | None]:
        """(version, ETag) of the ``latest`` pointer; (None, None) without one; AdapterNotFound if junk."""
        pointer = self._key(check_ident(tenant, "tenant"), check_ident(name, "adapter name"), LATEST_KEY)
        got = self.bucket.get_bounded(pointer, 32, f"read {tenant}/{name}'s latest pointer")
        if got is None:
            return None, None
        raw, etag = got
        text = raw.decode("ascii", "replace").strip()
        try:
            if len(raw) > 32:
                raise InvalidAdapterRef("too long")
            return parse_version(text), etag
        except InvalidAdapterRef:
            raise AdapterNotFound(f"{tenant}/{name}: the '{LATEST_KEY}' pointer is corrupt ({text[:32]!r})") from None

    def _idents(self, prefix: str, after: str | None = None, first: int | None = None) -> builtins.list[str]:
        """The valid tenant or adapter names directly under ``prefix`` (a listing by "/"), sorted; with
        ``after``, only those after it; with ``first``, only the first ``first`` of those, listed only as
        far as it takes to know them."""
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        names: set[str] = set()
        listed = ""  # every entry up to this key has been listed
        probed: set[str] = set()  # stems asked about on their own
        for page in self.bucket.folder_pages(prefix, first, start_after=None if after is None else prefix + after):
            for entry in page:
                listed = max(listed, entry)
                name, slash, _ = entry[len(prefix) :].partition("/")
                if slash and is_ident(name) and (after is None or name > after):
                    names.add(name)
            while first is not None:
                chosen = sorted(names)[:first]
                if len(chosen) < first:
                    break  # more to list
                unknown = {stem for name in chosen for stem in _unlisted_stems(prefix, name, listed, after)} - probed
                if not unknown:
                    return chosen
                # "bot/" lists after every "bot-.../": ask for each such stem's folder on its own (one
                # request) instead of listing on past every name that shares it
                for stem in unknown:
                    probed.add(stem)
                    if any(self.bucket.folder_pages(f"{prefix}{stem}/", 1, start_after=None)):
                        names.add(stem)
        return sorted(names)[:first]

    def _numbers_under(self, prefix: str) -> Iterator[int]:
        for key in self.bucket.list_keys(prefix):
            number = _version_number(key[len(prefix) :].partition("/")[0])
            if number is not None:
                yield number

    @contextmanager
    def _local(self, key: AdapterKey, skip: str | None = None) -> Iterator[tuple[Path, bool]]:
        """(the verified local copy of ``key``, whether it was downloaded now), kept from eviction while
        inside (``skip``: on a cache hit, a file the caller checks as it reads it)."""
        with self._key_lock(key):
            manifest = self.manifest(key)
            with self.cache.using(key):
                path = self.cache.lookup(key)
                if path is not None:
                    try:
                        self._verify_cached(key, path, manifest, skip)
                    except AdapterFormatError as exc:
                        log.warning("adapter %s: the cached copy is damaged (%s); downloading it again", key, exc)
                        self.cache.drop(key)
                        path = None
                self._on_cache_event("hit" if path is not None else "miss")
                downloaded = path is None
                if path is None:
                    path = self._download(key, manifest)
                    self._on_cache_event("load")
                yield path, downloaded

    def _verify_cached(self, key: AdapterKey, path: Path, manifest: Manifest, skip: str | None) -> None:
        """Every cached file but ``skip`` against the manifest (hashed once per process, then by identity)."""
        for file_name in manifest.files:
            file_path = path / file_name
            if file_name == skip:
                continue
            if file_path.is_symlink():
                raise AdapterFormatError(f"{key}: {file_name} is missing from the cache")
            start_listed(self._verified, key, file_path, manifest, MAX_FILE_BYTES).finish()  # sized at download

    @contextmanager
    def _key_lock(self, key: AdapterKey) -> Iterator[None]:
        """One download of ``key`` at a time; the lock lives only while a thread holds or awaits it."""
        with self._lock:
            entry = self._key_locks.get(key)
            if entry is None:
                entry = self._key_locks[key] = _KeyLock()
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._lock:
                entry.users -= 1
                if entry.users == 0:
                    del self._key_locks[key]

    def _download(self, key: AdapterKey, manifest: Manifest) -> Path:
        for required in required_files(manifest.kind):
            if required not in manifest.files:
                raise AdapterFormatError(f"{key}: {MANIFEST_FILE} does not list {required}")
        incoming = self.cache.incoming()
        started = time.perf_counter()
        nbytes = 0
        try:
            for file_name, expected in manifest.files.items():
                # The whole version must fit the disk cache: past its bound it was still installed (the
                # newest entry is kept), past an emptyDir's size limit the pod is evicted.
                room = self.cache.max_bytes - nbytes
                nbytes += self._fetch(key, file_name, expected, incoming / file_name, room)
            with self.bucket.reading(f"write {key}'s manifest into the cache"):  # a full disk: StoreUnavailable
                (incoming / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
        except BaseException:
            self.cache.discard(incoming)
            raise
        path = self.cache.install(key, incoming)
        log.info(
            "adapter %s downloaded from %s in %.3fs (%d bytes)",
            key,
            self.location,
            time.perf_counter() - started,
            nbytes,
        )
        return path

    def _fetch(self, key: AdapterKey, file_name: str, expected: str, dest: Path, room: int) -> int:
        """Download one listed file into ``dest``, checked against its sha256; at most ``room`` bytes
        (what is left of the disk cache for this version) and the file's own bound: the weights
        ``MAX_FILE_BYTES``, any other file (config, prompt, head, records) ``MAX_SMALL_FILE_BYTES``.

        A download whose bytes do not match is fetched once more before the version is called bad: a
        transfer damaged on the way (a store or proxy without S3's checksums) made the version watcher
        refuse a good version for good, while an explicit request for it downloaded it fine."""
        written, actual = self._fetch_once(key, file_name, dest, room)
        if actual != expected:
            log.warning("adapter %s: %s arrived damaged (sha256 %s); downloading it again", key, file_name, actual)
            dest.unlink(missing_ok=True)
            written, actual = self._fetch_once(key, file_name, dest, room)
        if actual != expected:
            raise AdapterFormatError(
                f"{key}: checksum mismatch for {file_name}: manifest has sha256 {expected}, the store has {actual}"
            )
        return written

    def _fetch_once(self, key: AdapterKey, file_name: str, dest: Path, room: int) -> tuple[int, str]:
        """One download of ``file_name`` into ``dest``: (its bytes, their sha256)."""
        bound = MAX_FILE_BYTES if file_name == WEIGHTS_FILE else MAX_SMALL_FILE_BYTES
        limit, why = (bound, "") if bound <= room else (room, " (the rest of --adapter-cache-bytes)")
        try:
            got = self.bucket.download(self._version_key(key, file_name), dest, limit, f"download {file_name} of {key}")
        except ObjectTooLarge as exc:
            if exc.declared:
                raise AdapterFormatError(f"{key}: {file_name} is {exc.size} bytes, over {limit}{why}") from None
            raise AdapterFormatError(f"{key}: {file_name} is over {limit} bytes{why}") from None
        if got is None:
            raise AdapterFormatError(f"{key}: {file_name} listed in {MANIFEST_FILE} is missing")
        return got


@dataclass
class _KeyLock:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


def _publish_entry(line: str) -> tuple[str, str, str] | None:
    """(tenant, name, id) of a publish log line (``marker_text``'s: "tenant/name@version time host:pid
    nonce", the nonce its id), or None for anything else."""
    parts = line.split()
    if len(parts) < 2:
        return None
    try:
        ref = AdapterRef.parse(parts[0])
    except InvalidAdapterRef:
        return None
    return (ref.tenant, ref.name, parts[-1]) if ref.version is not None else None


def _pointer_body(version: int) -> bytes:
    """What a ``latest`` pointer holds as publishes write it."""
    return f"{version}\n".encode()


def _unlisted_stems(prefix: str, name: str, listed: str, after: str | None) -> list[str]:
    """The names that may come before ``name`` and are not listed yet by a listing under ``prefix`` that
    has reached the key ``listed`` (starting after ``after``). S3 lists in byte order, where "a-b/"
    comes before "a/" ("-" sorts before "/"): a name that ``name`` starts with, up to one of its dashes
    ("a" of "a-b"), comes before it by name but lists after it. Every other name before ``name`` lists
    before it, in S3 and in SeaweedFS (which lists a folder in name order). Those stems are the ones
    whose folders sort after ``listed``; one at or before ``after`` is not wanted anyway (counting
    those, every page of a tenant of "bot-00001" ... "bot-99999" listed all its names after the cursor,
    waiting for "bot/": an outside review)."""
    stems = (name[:i] for i, char in enumerate(name) if char == "-")
    return [stem for stem in stems if f"{prefix}{stem}/" > listed and (after is None or stem > after)]


def _published_version(relative: str) -> int | None:
    """n for a key ``<n>/manifest.json`` under an adapter's versions/ (a published version), else None."""
    number, _, rest = relative.partition("/")
    return _version_number(number) if rest == MANIFEST_FILE else None


def _version_number(text: str) -> int | None:
    try:
        return parse_version(text)
    except InvalidAdapterRef:
        return None


def _intact(path: Path, expected: str) -> bool:
    """Whether ``path`` is a regular file with sha256 ``expected`` (hashed now, whatever was known)."""
    return path.is_file() and not path.is_symlink() and sha256_file(path) == expected


def _namespace(endpoint: str, location: S3Location) -> str:
    """One cache subdirectory per (endpoint, bucket, prefix): two stores never share entries."""
    digest = hashlib.sha256(f"{endpoint}|{location.bucket}|{location.prefix}".encode()).hexdigest()[:16]
    return f"{location.bucket}-{digest}"
