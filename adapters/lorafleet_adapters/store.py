"""The versioned local adapter store.

Layout::

    <root>/<tenant>/<name>/versions/<version>/   adapter_config.json, adapter_model.safetensors,
                                                 [README.md], manifest.json  (immutable)
    <root>/<tenant>/<name>/latest                the latest version number, replaced atomically
    <root>/.staging/                             publishes in progress (ignored by readers); what a
                                                 crashed publish left is removed after a day

Paths are built only from validated tenant/name/version parts, and every path is additionally
resolved and checked to lie inside the root before it is opened, so symlinks cannot lead out.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import importlib.metadata
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from lorafleet_adapters.backend import PublishesSince
from lorafleet_adapters.errors import (
    AdapterFormatError,
    AdapterNotFound,
    InvalidAdapterRef,
    StoreUnavailable,
)
from lorafleet_adapters.fsio import atomic_write_text, copy_synced, fsync_dir
from lorafleet_adapters.manifest import METHODS, PROMPT_METHOD, Manifest, check_loadable_lora, sha256_file, utc_now_iso
from lorafleet_adapters.peft_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterWeights,
    BaseModelSpec,
    LoadPlans,
    Transposer,
    find_weights_file,
    load_adapter_weights,
    max_weights_bytes,
)
from lorafleet_adapters.prompt import PROMPT_FILE, PromptTemplate
from lorafleet_adapters.ref import MAX_VERSION, AdapterKey, AdapterRef, check_ident, parse_version
from lorafleet_adapters.strict_json import unique_keys
from lorafleet_adapters.verified_read import PendingCheck, VerifiedFiles

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
LOCK_FILE = ".lock"
VERSIONS_DIR = "versions"
STAGING_DIR = ".staging"
# Rewritten (with content no earlier write had) after every publish that moves a `latest` pointer, so a
# server polling many adapters reads this one file and reads their pointers only when it changed.
PUBLISHED_MARKER = ".published"
MAX_MARKER_BYTES = 1024
README_FILE = "README.md"
RETRAIN_RECORD_FILE = "lorafleet-retrain.json"  # a LoRA version's training record, for `lorafleet retrain`
STALE_STAGING_SECONDS = 24 * 3600  # no live publish stays untouched this long
MAX_MANIFEST_BYTES = 1 << 20
MAX_README_BYTES = 1 << 20
MAX_SMALL_FILE_BYTES = 64 << 20  # any listed file besides the weights (config, README, records): far below
_EXTRA_FIELDS = frozenset({"training_data_fingerprint", "eval_metrics", "pii_scan"})
_TAKEN = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)


@dataclass(frozen=True)
class AdapterSummary:
    tenant: str
    name: str
    versions: tuple[int, ...]
    latest: int | None


class AdapterStore:
    """The local directory backend (the default). `lorafleet_adapters.backend.Store` is its interface."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._verified = VerifiedFiles()  # files hashed once by this process (verified_read.py)
        self._plans = LoadPlans()  # checked safetensors headers, by their bytes (peft_format.py)

    @property
    def location(self) -> str:
        """Where the store is, for messages: its root directory."""
        return str(self.root)

    def check(self, *, create: bool = True) -> None:
        """Create the root if needed (unless ``create`` is False); StoreUnavailable when it cannot be used
        or, with ``create`` False, does not exist."""
        if create:
            with _store_io("prepare the store"):
                self.root.mkdir(parents=True, exist_ok=True)
        elif not os.path.lexists(self.root):
            raise StoreUnavailable(
                f"there is no adapter store at {self.root}: nothing was published there yet, or the path is wrong"
            )
        self._real_root()

    # ----------------------------------------------------------------------------------- reading

    def version_dir(self, key: AdapterKey) -> Path:
        """The directory of `key` (which need not exist), checked to lie inside the root."""
        return self._inside(self._adapter_dir(key.tenant, key.name) / VERSIONS_DIR / str(key.version))

    def change_token(self) -> str:
        """The publish marker's text ("" before any publish wrote one). It changes whenever a publish
        moves a ``latest`` pointer; a pointer moved by hand does not change it."""
        try:
            return self._read_small(self.root / PUBLISHED_MARKER, MAX_MARKER_BYTES).decode("utf-8", "replace")
        except AdapterNotFound:
            return ""

    def versions(self, tenant: str, name: str) -> tuple[int, ...]:
        """Published versions of tenant/name, ascending; empty when there are none."""
        versions_dir = self._adapter_dir(check_ident(tenant, "tenant"), check_ident(name, "adapter name"))
        versions_dir = versions_dir / VERSIONS_DIR
        found = []
        for entry in self._listdir(versions_dir):
            number = _version_number(entry)
            if number is not None and self._is_version_dir(versions_dir / entry):
                found.append(number)
        return tuple(sorted(found))

    def resolve(self, ref: AdapterRef) -> AdapterKey:
        """The concrete version `ref` names: its own version, or the latest published one."""
        if ref.version is not None:
            key = AdapterKey(ref.tenant, ref.name, ref.version)
            if not self._is_version_dir(self.version_dir(key)):
                known = self.versions(ref.tenant, ref.name)
                if not known:
                    raise AdapterNotFound(f"adapter {ref.tenant}/{ref.name} not found")
                raise AdapterNotFound(
                    f"adapter {ref.tenant}/{ref.name} has no version {ref.version} (has {list(known)})"
                )
            return key
        latest = self._latest(ref.tenant, ref.name)
        if latest is None:
            raise AdapterNotFound(f"adapter {ref.tenant}/{ref.name} not found")
        key = AdapterKey(ref.tenant, ref.name, latest)
        if not self._is_version_dir(self.version_dir(key)):
            raise AdapterNotFound(
                f"adapter {ref.tenant}/{ref.name}: the '{LATEST_FILE}' pointer names version {latest}, "
                "which does not exist"
            )
        return key

    def latest_versions(self, tenant: str, names: Collection[str]) -> dict[str, int]:
        """Nothing: a pointer here is a small file, cheaper to read on its own (``resolve``) than a
        directory walk is."""
        check_ident(tenant, "tenant")
        return {}

    def publishes_since(self, seen: str | None) -> PublishesSince:
        """Not known here: the marker holds the last publish only, and a watcher reads every pointer (a
        small file each) when it changed."""
        return PublishesSince("", None, None)

    def list(
        self, tenant: str | None = None, *, after: tuple[str, str] | None = None, limit: int | None = None
    ) -> list[AdapterSummary]:
        """The adapters with at least one published version, sorted by tenant and name: those after
        ``after`` (tenant, name), at most ``limit`` of them (None: all). Only those are read."""
        root = self._real_root()
        tenants = [check_ident(tenant, "tenant")] if tenant is not None else self._idents(root)
        summaries: list[AdapterSummary] = []
        for tenant_name in tenants:
            if after is not None and tenant_name < after[0]:
                continue
            for adapter_name in self._idents(root / tenant_name):
                if after is not None and (tenant_name, adapter_name) <= after:
                    continue
                if limit is not None and len(summaries) >= limit:
                    return summaries
                versions = self.versions(tenant_name, adapter_name)
                if not versions:
                    continue
                try:
                    latest = self._latest(tenant_name, adapter_name)
                except AdapterNotFound:
                    latest = None
                summaries.append(
                    AdapterSummary(tenant_name, adapter_name, versions, latest if latest in versions else None)
                )
        return summaries

    def manifest(self, key: AdapterKey) -> Manifest:
        vdir = self.version_dir(key)
        if not self._is_version_dir(vdir):
            raise AdapterNotFound(f"adapter {key} not found")
        manifest = Manifest.from_json(self._read_small(vdir / MANIFEST_FILE, MAX_MANIFEST_BYTES))
        if (manifest.tenant, manifest.name, manifest.version) != (key.tenant, key.name, key.version):
            raise AdapterFormatError(
                f"{key}: {MANIFEST_FILE} describes {manifest.tenant}/{manifest.name}@{manifest.version}"
            )
        return manifest

    def load(
        self,
        key: AdapterKey,
        spec: BaseModelSpec,
        *,
        dtype: torch.dtype = torch.float32,
        transpose: Transposer | None = None,
    ) -> AdapterWeights:
        """Verify the version's files and base, then load its weights as ``dtype`` (see AdapterWeights).

        The weights file is read once, and the tensors come from those same bytes; they are hashed on
        another thread while the tensors are made, and returned only once the digest matches (or, read
        again later by this process, checked by the file's fstat identity: verified_read.py).
        """
        manifest = self.manifest(key)
        check_loadable_lora(key, manifest, spec)
        vdir = self.version_dir(key)
        self._verify_files(key, vdir, manifest, skip=WEIGHTS_FILE)

        def tensors(data: memoryview) -> AdapterWeights:
            return load_adapter_weights(vdir, spec, key, dtype=dtype, data=data, plans=self._plans, transpose=transpose)

        return self._read_verified(key, vdir, WEIGHTS_FILE, manifest, max_weights_bytes(spec)).use(tensors)

    def load_prompt(self, key: AdapterKey) -> PromptTemplate:
        """Verify a prompt version's files and read its template."""
        manifest = self.manifest(key)
        if manifest.kind != "prompt":
            raise AdapterFormatError(f"{key}: manifest kind is {manifest.kind!r}, not 'prompt'")
        vdir = self.version_dir(key)
        self._verify_files(key, vdir, manifest)
        return PromptTemplate.read(vdir)

    # ---------------------------------------------------------------------------------- publishing

    def publish_prompt(
        self,
        tenant: str,
        name: str,
        template: PromptTemplate,
        spec: BaseModelSpec,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> AdapterKey:
        """Publish a prompt-only version (system prompt + few-shot turns) as the next version."""
        return publish_prompt_via(self, tenant, name, template, spec, extra)

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
        """Validate the PEFT adapter in `src` and publish it as the next version of tenant/name."""
        return import_peft_via(self, src, tenant, name, spec, method, extra)

    def publish_staged(
        self, staging: Path, tenant: str, name: str, manifest_for: Callable[[int], Manifest]
    ) -> AdapterKey:
        """Publish the files in `staging` (from `new_staging`) as the next version and move `latest`.

        `manifest_for(version)` builds the manifest once the number is known. On success `staging`
        is gone (renamed into the version); on failure the caller removes it.
        """
        key = self._publish_staged(staging, tenant, name, manifest_for)
        self._advance_latest(key)
        return key

    def new_staging(self, tenant: str, name: str) -> Path:
        """A fresh directory under .staging for one publish; sweeps what crashed publishes left."""
        with _store_io("prepare the store"):
            self.root.mkdir(parents=True, exist_ok=True)
            staging_root = self._inside(self.root / STAGING_DIR)
            staging_root.mkdir(exist_ok=True)
            self.sweep_staging()
            return Path(tempfile.mkdtemp(prefix=f"{tenant}.{name}.", dir=staging_root))

    def sweep_staging(self, max_age_seconds: float = STALE_STAGING_SECONDS) -> builtins.list[str]:
        """Remove .staging entries untouched for ``max_age_seconds`` (crashed publishes); their names.

        A publish in progress, in this process or another, touches its entry far more recently, and
        nothing under .staging is ever visible to readers, so removing old entries loses nothing.
        """
        staging_root = self._inside(self.root / STAGING_DIR)
        cutoff = time.time() - max_age_seconds
        removed: builtins.list[str] = []
        try:
            entries = list(os.scandir(staging_root))
        except FileNotFoundError:
            return removed
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:  # a stray file or a symlink: unlink the entry itself, never its target
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue  # another sweeper got there first
            except OSError as exc:  # best effort: a leftover we cannot remove must not stop a publish
                log.warning("could not remove the stale staging entry %s: %s", entry.path, exc)
                continue
            removed.append(entry.name)
        if removed:
            log.info("removed %d staging entries left by crashed publishes: %s", len(removed), removed)
        return removed

    def _publish_staged(
        self, staging: Path, tenant: str, name: str, manifest_for: Callable[[int], Manifest]
    ) -> AdapterKey:
        """Write the manifest into `staging` and rename it into the next free version number."""
        with _store_io("publish"):
            versions_dir = self._make_dirs(tenant, name)
            while True:
                version = self._next_version(versions_dir)
                atomic_write_text(staging / MANIFEST_FILE, manifest_for(version).to_json())
                try:
                    os.rename(staging, versions_dir / str(version))
                except OSError as exc:
                    if exc.errno in _TAKEN:
                        continue  # another publisher took this number; try the next one
                    raise
                fsync_dir(versions_dir)
                return AdapterKey(tenant, name, version)

    def _make_dirs(self, tenant: str, name: str) -> Path:
        """Create (durably) and return the versions directory of tenant/name, inside the root."""
        path = self.root
        for part in (tenant, name, VERSIONS_DIR):
            parent, path = path, path / part
            if not path.exists():
                path.mkdir(exist_ok=True)
                fsync_dir(self._inside(parent))
            self._inside(path)
        return self._inside(path)

    def _next_version(self, versions_dir: Path) -> int:
        numbers = [n for n in (_version_number(e) for e in self._listdir(versions_dir)) if n is not None]
        version = max(numbers, default=0) + 1
        if version > MAX_VERSION:
            raise AdapterFormatError(f"{versions_dir}: no version number left after {MAX_VERSION}")
        return version

    def _advance_latest(self, key: AdapterKey) -> None:
        """Point `latest` at `key` unless a concurrent publisher already moved it further.

        A damaged pointer (torn by another writer, junk, a link out of the store) is replaced: it names
        no version, and `key` is at least as high as every version that existed when it was numbered.
        Before, reading it raised here, after the version was already in place: every later publish
        of the adapter failed the same way and the adapter stayed unresolvable by name.
        """
        adapter_dir = self._inside(self._adapter_dir(key.tenant, key.name))
        with _store_io("update the latest pointer"), _locked(adapter_dir / LOCK_FILE):
            try:
                current = self._read_pointer(adapter_dir)
            except (AdapterNotFound, AdapterFormatError) as exc:
                log.warning(
                    "adapter %s/%s: replacing a damaged '%s' pointer: %s", key.tenant, key.name, LATEST_FILE, exc
                )
                current = None
            moved = current is None or key.version > current
            if moved:
                atomic_write_text(adapter_dir / LATEST_FILE, f"{key.version}\n")
        if moved:
            try:
                atomic_write_text(self._inside(self.root) / PUBLISHED_MARKER, marker_text(key))
            except (OSError, AdapterNotFound) as exc:
                log.warning(
                    "%s is published but the store's '%s' marker was not rewritten (%s): running servers "
                    "find it at their next full rescan, not their next poll",
                    key,
                    PUBLISHED_MARKER,
                    exc,
                )

    # ------------------------------------------------------------------------------------- helpers

    def _adapter_dir(self, tenant: str, name: str) -> Path:
        return self.root / tenant / name

    def _real_root(self) -> Path:
        try:
            real = Path(os.path.realpath(self.root))
            mode = os.stat(real).st_mode
        except OSError as exc:
            raise StoreUnavailable(f"adapter store root {self.root} is unavailable: {exc.strerror or exc}") from None
        if not stat.S_ISDIR(mode):
            raise StoreUnavailable(f"adapter store root {self.root} is not a directory")
        return real

    def _inside(self, path: Path) -> Path:
        """`path` resolved, if it stays inside the root; AdapterNotFound otherwise."""
        root = self._real_root()
        real = Path(os.path.realpath(path))
        if real != root and root not in real.parents:
            raise AdapterNotFound(f"{path} resolves outside the adapter store root {self.root}; refused")
        return real

    def _listdir(self, path: Path) -> builtins.list[str]:
        try:
            return os.listdir(self._inside(path))
        except AdapterNotFound:
            return []
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StoreUnavailable(f"cannot list {path}: {exc.strerror or exc}") from None

    def _idents(self, path: Path) -> builtins.list[str]:
        names = []
        for entry in self._listdir(path):
            try:
                check_ident(entry, "directory")
            except InvalidAdapterRef:
                continue
            names.append(entry)
        return sorted(names)

    def _is_version_dir(self, path: Path) -> bool:
        try:
            real = self._inside(path)
            manifest = self._inside(real / MANIFEST_FILE)
        except AdapterNotFound:
            return False
        return real.is_dir() and manifest.is_file()

    def _read_small(self, path: Path, limit: int) -> bytes:
        real = self._inside(path)
        try:
            # O_NONBLOCK: a FIFO at `latest`, the publish marker or a manifest must not block the open
            # (every resolve, poll and publish of that adapter hung on it); it is refused below.
            with open(os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    raise AdapterFormatError(f"{path.name} is not a regular file")
                data = handle.read(limit + 1)
        except FileNotFoundError:
            raise AdapterNotFound(f"{path} does not exist") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {path}: {exc.strerror or exc}") from None
        if len(data) > limit:
            raise AdapterFormatError(f"{path.name} is larger than {limit} bytes")
        return data

    def _read_pointer(self, adapter_dir: Path) -> int | None:
        """The version in `latest`, or None when the pointer does not exist."""
        pointer = adapter_dir / LATEST_FILE
        if not os.path.lexists(pointer):
            return None
        text = self._read_small(pointer, 32).decode("ascii", "replace").strip()
        try:
            return parse_version(text)
        except InvalidAdapterRef:
            raise AdapterNotFound(f"{adapter_dir.name}: the '{LATEST_FILE}' pointer is corrupt ({text!r})") from None

    def _latest(self, tenant: str, name: str) -> int | None:
        """Latest version by pointer; without a pointer (a publish interrupted early), the highest one."""
        self._real_root()
        pointer = self._read_pointer(self._adapter_dir(tenant, name))
        if pointer is not None:
            return pointer
        versions = self.versions(tenant, name)
        return versions[-1] if versions else None

    def _verify_files(self, key: AdapterKey, vdir: Path, manifest: Manifest, skip: str | None = None) -> None:
        """Check every file the manifest lists against its sha256 (``skip``: one the caller reads itself)."""
        for required in required_files(manifest.kind):
            if required not in manifest.files:
                raise AdapterFormatError(f"{key}: {MANIFEST_FILE} does not list {required}")
        for file_name in manifest.files:
            if file_name != skip:
                self._read_verified(key, vdir, file_name, manifest, MAX_SMALL_FILE_BYTES).finish()

    def _read_verified(
        self,
        key: AdapterKey,
        vdir: Path,
        file_name: str,
        manifest: Manifest,
        max_bytes: int,
    ) -> PendingCheck:
        """A listed file's bytes, read, their check against the manifest's sha256 pending (hashed once per
        process: verified_read.py); ``use`` them or ``finish`` it before this thread reads another file.
        Only the read's errors are mapped here, not those of what the caller makes of the bytes."""
        return start_listed(self._verified, key, self._inside(vdir / file_name), manifest, max_bytes)


def _version_number(entry: str) -> int | None:
    try:
        return parse_version(entry)
    except InvalidAdapterRef:
        return None


class StagedPublisher(Protocol):
    """The two publishing primitives each backend implements; `import_peft_via` and `publish_prompt_via`
    build the checked, staged publish of both backends on them."""

    def new_staging(self, tenant: str, name: str) -> Path: ...

    def publish_staged(
        self, staging: Path, tenant: str, name: str, manifest_for: Callable[[int], Manifest]
    ) -> AdapterKey: ...


def import_peft_via(
    store: StagedPublisher,
    src: Path,
    tenant: str,
    name: str,
    spec: BaseModelSpec,
    method: str,
    extra: Mapping[str, Any] | None,
) -> AdapterKey:
    """Check a PEFT adapter, stage it (`stage_peft`) and publish it through `store`."""
    check_ident(tenant, "tenant")
    check_ident(name, "adapter name")
    fields = check_extra(extra)
    src = check_peft_source(src, spec, method)
    return _publish_via(
        store, tenant, name, lambda staging: stage_peft(src, staging, tenant, name, spec, method, fields)
    )


def publish_prompt_via(
    store: StagedPublisher,
    tenant: str,
    name: str,
    template: PromptTemplate,
    spec: BaseModelSpec,
    extra: Mapping[str, Any] | None,
) -> AdapterKey:
    """Stage a prompt-only version (`stage_prompt`) and publish it through `store`."""
    check_ident(tenant, "tenant")
    check_ident(name, "adapter name")
    fields = check_extra(extra)
    return _publish_via(
        store, tenant, name, lambda staging: stage_prompt(staging, tenant, name, template, spec, fields)
    )


def _publish_via(
    store: StagedPublisher, tenant: str, name: str, stage: Callable[[Path], Callable[[int], Manifest]]
) -> AdapterKey:
    staging = store.new_staging(tenant, name)
    try:
        return store.publish_staged(staging, tenant, name, stage(staging))
    finally:
        # Local: a successful publish renamed `staging` into the version, so this removes nothing;
        # S3: the uploaded copy is in the bucket. Either way no staging outlives the call.
        shutil.rmtree(staging, ignore_errors=True)


def check_extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The optional manifest fields a publisher may set; anything else is refused."""
    extra = dict(extra or {})
    unknown = sorted(set(extra) - _EXTRA_FIELDS)
    if unknown:
        raise AdapterFormatError(f"unknown manifest extra fields {unknown}; allowed: {sorted(_EXTRA_FIELDS)}")
    return extra


def check_peft_source(src: Path, spec: BaseModelSpec, method: str) -> Path:
    """Cheap checks of a PEFT directory to import, before anything is staged."""
    if method not in METHODS:
        raise AdapterFormatError(f"method {method!r} is not one of {METHODS}")
    src = Path(src)
    _check_source_size(find_weights_file(src), spec)
    return src


def stage_peft(
    src: Path,
    staging: Path,
    tenant: str,
    name: str,
    spec: BaseModelSpec,
    method: str,
    extra: Mapping[str, Any],
) -> Callable[[int], Manifest]:
    """Copy a PEFT adapter's files into `staging`, validate them against `spec` and hash them.

    Returns the function that builds the version's manifest once its number is known. Both
    backends publish what this staged: nothing reaches a store before it passed these checks.
    """
    copied = _copy_sources(src, staging)
    weights = load_adapter_weights(staging, spec)
    with _store_io("hash the staged files"):
        files = {file_name: sha256_file(staging / file_name) for file_name in copied}
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in weights.modules}))
    return lambda version: build_manifest(
        tenant=tenant,
        name=name,
        version=version,
        kind="lora",
        method=method,
        spec=spec,
        rank=weights.rank,
        lora_alpha=weights.config.lora_alpha,
        use_rslora=weights.config.use_rslora,
        targets=targets,
        files=files,
        extra=extra,
    )


def stage_prompt(
    staging: Path, tenant: str, name: str, template: PromptTemplate, spec: BaseModelSpec, extra: Mapping[str, Any]
) -> Callable[[int], Manifest]:
    """Write a prompt template into `staging`; returns the manifest builder (see `stage_peft`)."""
    with _store_io("stage the prompt"):
        atomic_write_text(staging / PROMPT_FILE, template.to_json())
        files = {PROMPT_FILE: sha256_file(staging / PROMPT_FILE)}
    return lambda version: build_manifest(
        tenant=tenant,
        name=name,
        version=version,
        kind="prompt",
        method=PROMPT_METHOD,
        spec=spec,
        rank=0,
        lora_alpha=0.0,
        use_rslora=False,
        targets=(),
        files=files,
        extra=extra,
    )


def build_manifest(
    *,
    tenant: str,
    name: str,
    version: int,
    kind: str,
    method: str,
    spec: BaseModelSpec,
    rank: int,
    lora_alpha: float,
    use_rslora: bool,
    targets: tuple[str, ...],
    files: Mapping[str, str],
    extra: Mapping[str, Any],
) -> Manifest:
    return Manifest(
        schema_version=1,
        tenant=tenant,
        name=name,
        version=version,
        kind=kind,
        method=method,
        base_fingerprint=spec.fingerprint,
        base_model=spec.model_id,
        base_quantization=spec.quantization,
        rank=rank,
        base_prompt_format=spec.prompt_format or None,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        target_modules=targets,
        files=files,
        created_at=utc_now_iso(),
        producer=_producer(),
        training_data_fingerprint=extra.get("training_data_fingerprint"),
        eval_metrics=extra.get("eval_metrics") or {},
        pii_scan=extra.get("pii_scan"),
    )


def required_files(kind: str) -> tuple[str, ...]:
    """The files a manifest of `kind` must list."""
    if kind == "prompt":
        return (PROMPT_FILE,)
    if kind == "lora":
        return (CONFIG_FILE, WEIGHTS_FILE)
    return ()


def _check_source_size(weights_path: Path, spec: BaseModelSpec) -> None:
    size = weights_path.stat().st_size
    limit = max_weights_bytes(spec)
    if size > limit:
        raise AdapterFormatError(f"{weights_path.name} is {size} bytes, over the {spec.max_adapter_bytes}-byte cap")


def _copy_sources(src: Path, staging: Path) -> list[str]:
    """Copy the files a version keeps; returns their names."""
    copied = []
    for file_name in (CONFIG_FILE, WEIGHTS_FILE, README_FILE, RETRAIN_RECORD_FILE):
        source = src / file_name
        if not source.is_file():
            continue
        if file_name == README_FILE and source.stat().st_size > MAX_README_BYTES:
            raise AdapterFormatError(f"{source} is larger than {MAX_README_BYTES} bytes")
        if file_name == RETRAIN_RECORD_FILE:
            _check_record(source)
        try:
            copy_synced(source, staging / file_name)
        except OSError as exc:
            if exc.filename is not None and Path(exc.filename) == source:
                raise AdapterFormatError(f"cannot read {source}: {exc.strerror or exc}") from None
            raise StoreUnavailable(f"adapter store: cannot stage {file_name}: {exc.strerror or exc}") from exc
        copied.append(file_name)
    if CONFIG_FILE not in copied:
        raise AdapterFormatError(f"{CONFIG_FILE} is missing from {src}")
    return copied


def _check_record(source: Path) -> None:
    """A training record kept with a LoRA version: a JSON object of at most MAX_MANIFEST_BYTES."""
    if source.stat().st_size > MAX_MANIFEST_BYTES:
        raise AdapterFormatError(f"{source} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        record = json.loads(source.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as exc:
        raise AdapterFormatError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise AdapterFormatError(f"{source} must hold a JSON object")


def start_listed(
    verified: VerifiedFiles, key: AdapterKey, path: Path, manifest: Manifest, max_bytes: int
) -> PendingCheck:
    """``verified.start`` on a file ``manifest`` lists, its read errors as the store's: a missing file is
    AdapterFormatError, another OSError StoreUnavailable (both backends read their versions this way)."""
    try:
        return verified.start(path, manifest.files[path.name], str(key), max_bytes=max_bytes)
    except (FileNotFoundError, IsADirectoryError):
        raise AdapterFormatError(f"{key}: {path.name} listed in {MANIFEST_FILE} is missing") from None
    except OSError as exc:
        raise StoreUnavailable(f"adapter store: cannot read {path.name} of {key}: {exc.strerror or exc}") from exc


def marker_text(key: AdapterKey) -> str:
    """A publish marker's content: what moved, when, by whom, and a nonce, so no two writes are equal."""
    return f"{key} {utc_now_iso()} {socket.gethostname()}:{os.getpid()} {secrets.token_hex(8)}\n"


def _producer() -> str:
    try:
        return f"lorafleet {importlib.metadata.version('lorafleet')}"
    except importlib.metadata.PackageNotFoundError:
        return "lorafleet (not installed)"


@contextmanager
def _store_io(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise StoreUnavailable(f"adapter store: cannot {what}: {exc.strerror or exc}") from exc


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
