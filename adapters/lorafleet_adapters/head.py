"""Classifier heads: a version that is a small linear classifier on pooled features of the frozen base.

Feature extraction, the cheapest flavour of transfer: the base (optionally with one LoRA version of the
same tenant, ``features_from``) stays frozen; its final hidden states, mean-pooled over the prompt tokens
exactly as ``Embed`` pools them, feed a head ``softmax(x @ weight.T + bias)`` trained by
``lorafleet train --method classifier``. A head version holds::

    head.safetensors   weight [labels, hidden] and bias [labels], float32 (feature scaling folded in)
    head.json          format, labels, hidden size, pooling, features_from ("tenant/name@version" or null)
    lorafleet-training.json   (optional) the training record, so ``lorafleet retrain`` can train it again
    manifest.json      kind "head", method "logreg", sha256 of every file above

Publishing goes through the store's atomic publish (staged, renamed into the next version, ``latest``
moved by rename); loading verifies every checksum and the base fingerprint before reading a tensor.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorafleet_adapters.backend import Store
from lorafleet_adapters.errors import AdapterFormatError, AdapterIncompatible
from lorafleet_adapters.fsio import atomic_write_text, copy_synced
from lorafleet_adapters.manifest import HEAD_METHOD, Manifest, check_prompt_format, sha256_file, utc_now_iso
from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.ref import AdapterKey, AdapterRef, check_ident
from lorafleet_adapters.safetensors_header import read_header
from lorafleet_adapters.store import MAX_SMALL_FILE_BYTES
from lorafleet_adapters.strict_json import unique_keys

HEAD_FILE = "head.json"
HEAD_WEIGHTS_FILE = "head.safetensors"
HEAD_RECORD_FILE = "lorafleet-training.json"  # the training record (same name as in a `train` output)
HEAD_FORMAT = "lorafleet-head/1"
POOLING = "mean"  # mean of the final (normed) hidden states over the prompt tokens, as Embed returns
MAX_LABELS = 1024
MAX_LABEL_CHARS = 128
MAX_HEAD_JSON_BYTES = 256 * 1024
MAX_HEAD_BYTES = 64 << 20
MAX_RECORD_BYTES = 4 << 20
REQUIRED_FILES = (HEAD_FILE, HEAD_WEIGHTS_FILE)


@dataclass(frozen=True)
class ClassifierHead:
    """A linear head over pooled features: ``probs = softmax(features @ weight.T + bias)``."""

    labels: tuple[str, ...]
    weight: torch.Tensor  # [labels, hidden] float32
    bias: torch.Tensor  # [labels] float32
    features_from: AdapterKey | None = None  # the LoRA version whose features it reads (None: the base)

    def __post_init__(self) -> None:
        labels = self.labels
        if not 2 <= len(labels) <= MAX_LABELS:
            raise AdapterFormatError(f"a classifier head has 2 to {MAX_LABELS} labels, got {len(labels)}")
        for label in labels:
            if not isinstance(label, str) or not label or len(label) > MAX_LABEL_CHARS:
                raise AdapterFormatError(f"head label {label!r} must be a non-empty string of <= {MAX_LABEL_CHARS}")
        if len(set(labels)) != len(labels):
            raise AdapterFormatError("head labels must be distinct")
        if self.weight.dim() != 2 or self.weight.shape[0] != len(labels):
            raise AdapterFormatError(
                f"head weight has shape {tuple(self.weight.shape)}; expected [{len(labels)}, hidden]"
            )
        if tuple(self.bias.shape) != (len(labels),):
            raise AdapterFormatError(f"head bias has shape {tuple(self.bias.shape)}; expected [{len(labels)}]")
        for name, tensor in (("weight", self.weight), ("bias", self.bias)):
            if tensor.dtype != torch.float32:
                raise AdapterFormatError(f"head {name} must be float32, got {tensor.dtype}")
            if not bool(torch.isfinite(tensor).all()):
                raise AdapterFormatError(f"head {name} holds non-finite values")
        object.__setattr__(self, "labels", tuple(labels))

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` [rows, hidden] (any float dtype/device) -> probabilities [rows, labels] float32."""
        x = features.to(device=self.weight.device, dtype=torch.float32)  # [rows, hidden]
        return torch.softmax(x @ self.weight.T + self.bias, dim=-1)  # [rows, labels]

    def describe(self) -> dict[str, Any]:
        return {
            "format": HEAD_FORMAT,
            "labels": list(self.labels),
            "hidden_size": self.hidden_size,
            "pooling": POOLING,
            "features_from": None if self.features_from is None else str(self.features_from),
        }

    def save(self, directory: Path) -> list[str]:
        """Write head.json and head.safetensors into ``directory``; returns the file names."""
        directory = Path(directory)
        save_file(
            {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()},
            str(directory / HEAD_WEIGHTS_FILE),
            metadata={"format": HEAD_FORMAT},
        )
        atomic_write_text(directory / HEAD_FILE, json.dumps(self.describe(), indent=2, ensure_ascii=False) + "\n")
        return [HEAD_FILE, HEAD_WEIGHTS_FILE]

    @classmethod
    def read(cls, directory: Path) -> ClassifierHead:
        """Read and validate a head from ``directory`` (headers and sizes checked before tensors load)."""
        directory = Path(directory)
        meta = _read_head_json(directory / HEAD_FILE)
        weights_path = directory / HEAD_WEIGHTS_FILE
        if not weights_path.is_file():
            raise AdapterFormatError(f"{directory} has no {HEAD_WEIGHTS_FILE}")
        if weights_path.stat().st_size > MAX_HEAD_BYTES:
            raise AdapterFormatError(f"{weights_path} is larger than {MAX_HEAD_BYTES} bytes")
        header = read_header(weights_path)
        names = set(header)
        if names != {"weight", "bias"}:
            raise AdapterFormatError(f"{HEAD_WEIGHTS_FILE} must hold exactly 'weight' and 'bias', has {sorted(names)}")
        expected = {"weight": (len(meta["labels"]), meta["hidden_size"]), "bias": (len(meta["labels"]),)}
        for name, info in header.items():
            if info.dtype != "F32" or tuple(info.shape) != expected[name]:
                raise AdapterFormatError(
                    f"{HEAD_WEIGHTS_FILE}: {name} is {info.dtype} {list(info.shape)}; "
                    f"expected F32 {list(expected[name])}"
                )
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise AdapterFormatError(f"cannot read {weights_path}: {exc}") from None
        features_from = None
        if meta["features_from"] is not None:
            features_from = _parse_key(meta["features_from"])
        return cls(tuple(meta["labels"]), tensors["weight"], tensors["bias"], features_from)


def _parse_key(text: Any) -> AdapterKey:
    try:
        ref = AdapterRef.parse(str(text))
    except AdapterFormatError:
        raise
    except Exception as exc:  # InvalidAdapterRef: a corrupt head.json is a format problem here
        raise AdapterFormatError(f"{HEAD_FILE}: features_from {text!r} is not tenant/name@version: {exc}") from None
    if ref.version is None:
        raise AdapterFormatError(f"{HEAD_FILE}: features_from {text!r} must name a version (tenant/name@version)")
    return AdapterKey(ref.tenant, ref.name, ref.version)


def _read_head_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterFormatError(f"{path.parent} has no {HEAD_FILE}")
    if path.stat().st_size > MAX_HEAD_JSON_BYTES:
        raise AdapterFormatError(f"{path} is larger than {MAX_HEAD_JSON_BYTES} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as exc:
        raise AdapterFormatError(f"{path} is not valid JSON: {exc}") from None
    keys = {"format", "labels", "hidden_size", "pooling", "features_from"}
    if not isinstance(data, dict) or set(data) != keys:
        raise AdapterFormatError(f"{path} must be an object with exactly {sorted(keys)}")
    if data["format"] != HEAD_FORMAT:
        raise AdapterFormatError(f"{path}: format {data['format']!r}; expected {HEAD_FORMAT!r}")
    if data["pooling"] != POOLING:
        raise AdapterFormatError(f"{path}: pooling {data['pooling']!r}; only {POOLING!r} is supported")
    labels, hidden = data["labels"], data["hidden_size"]
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise AdapterFormatError(f"{path}: labels must be a list of strings")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or not 1 <= hidden <= 1 << 16:
        raise AdapterFormatError(f"{path}: hidden_size must be a positive integer")
    if data["features_from"] is not None and not isinstance(data["features_from"], str):
        raise AdapterFormatError(f"{path}: features_from must be a string or null")
    return data


# ----------------------------------------------------------------------------------------- store


def head_manifest(
    *,
    tenant: str,
    name: str,
    version: int,
    spec: BaseModelSpec,
    files: Mapping[str, str],
    producer: str,
    extra: Mapping[str, Any],
) -> Manifest:
    return Manifest(
        schema_version=1,
        tenant=tenant,
        name=name,
        version=version,
        kind="head",
        method=HEAD_METHOD,
        base_fingerprint=spec.fingerprint,
        base_model=spec.model_id,
        base_quantization=spec.quantization,
        rank=0,
        base_prompt_format=spec.prompt_format or None,
        lora_alpha=0.0,
        use_rslora=False,
        target_modules=(),
        files=files,
        created_at=utc_now_iso(),
        producer=producer,
        training_data_fingerprint=extra.get("training_data_fingerprint"),
        eval_metrics=extra.get("eval_metrics") or {},
        pii_scan=extra.get("pii_scan"),
    )


def publish_head(
    store: Store,
    tenant: str,
    name: str,
    head: ClassifierHead,
    spec: BaseModelSpec,
    *,
    record_path: Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> AdapterKey:
    """Publish ``head`` as the next version of tenant/name through the store's atomic publish (either
    backend: staged, checked, then renamed or uploaded manifest-last; ``latest`` moves after).

    ``record_path``: the training record to keep beside it (what ``lorafleet retrain`` reads).
    """
    check_ident(tenant, "tenant")
    check_ident(name, "adapter name")
    if head.features_from is not None and head.features_from.tenant != tenant:
        raise AdapterFormatError(
            f"a head of tenant {tenant!r} cannot read features of {head.features_from} (another tenant)"
        )
    if head.features_from is not None and (source := store.manifest(head.features_from).kind) != "lora":
        raise AdapterFormatError(f"features_from {head.features_from} is a {source}, not a LoRA adapter")
    check_head_fits(f"for {tenant}/{name}", head, spec)
    extra = dict(extra or {})
    staging = store.new_staging(tenant, name)
    try:
        names = head.save(staging)
        if record_path is not None:
            if Path(record_path).stat().st_size > MAX_RECORD_BYTES:
                raise AdapterFormatError(f"{record_path} is larger than {MAX_RECORD_BYTES} bytes")
            copy_synced(Path(record_path), staging / HEAD_RECORD_FILE)
            names.append(HEAD_RECORD_FILE)
        ClassifierHead.read(staging)  # what the server will read: fail here, not at load
        files = {file_name: sha256_file(staging / file_name) for file_name in names}
        producer = _producer()
        return store.publish_staged(
            staging,
            tenant,
            name,
            lambda version: head_manifest(
                tenant=tenant, name=name, version=version, spec=spec, files=files, producer=producer, extra=extra
            ),
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a publish; what a failure left


def verified_head_dir(store: Store, key: AdapterKey, spec: BaseModelSpec | None = None) -> tuple[Manifest, Path]:
    """The manifest and directory of head version ``key`` after checking its kind, base and checksums."""
    manifest: Manifest = store.manifest(key)
    if manifest.kind != "head":
        raise AdapterFormatError(f"{key}: manifest kind is {manifest.kind!r}, not 'head'")
    if spec is not None and manifest.base_fingerprint != spec.fingerprint:
        raise AdapterIncompatible(
            f"{key} was built for base {manifest.base_fingerprint} ({manifest.base_model}); this server's base "
            f"is {spec.fingerprint} ({spec.model_id}): retrain it with `lorafleet retrain --stale`"
        )
    if spec is not None:
        check_prompt_format(key, manifest, spec.prompt_format)
    vdir = Path(store.version_dir(key))
    for required in REQUIRED_FILES:
        if required not in manifest.files:
            raise AdapterFormatError(f"{key}: manifest.json does not list {required}")
    for file_name, expected in manifest.files.items():
        path = vdir / file_name
        if not path.is_file() or path.is_symlink():
            raise AdapterFormatError(f"{key}: {file_name} listed in manifest.json is missing")
        size = path.stat().st_size
        if size > MAX_SMALL_FILE_BYTES:  # before hashing it: S3 refuses it at download by the same bound
            raise AdapterFormatError(f"{key}: {file_name} is {size} bytes, over {MAX_SMALL_FILE_BYTES}")
        actual = sha256_file(path)
        if actual != expected:
            raise AdapterFormatError(
                f"{key}: checksum mismatch for {file_name}: manifest has sha256 {expected}, file has {actual}"
            )
    return manifest, vdir


def check_head_fits(what: object, head: ClassifierHead, spec: BaseModelSpec) -> None:
    """Refuse a head that reads another number of features than ``spec``'s base has (AdapterIncompatible):
    it passed every other check, so a hot swap moved a working head's name to it and every Classify of
    that name failed (an outside review)."""
    hidden = spec.hidden_size
    if hidden is not None and head.hidden_size != hidden:
        raise AdapterIncompatible(f"head {what} reads {head.hidden_size} features; this base has hidden size {hidden}")


def load_head(store: Store, key: AdapterKey, spec: BaseModelSpec) -> ClassifierHead:
    """Verify a head version (kind, base, checksums) and read it."""
    _, vdir = verified_head_dir(store, key, spec)
    head = ClassifierHead.read(vdir)
    check_head_fits(key, head, spec)
    if head.features_from is not None and head.features_from.tenant != key.tenant:
        raise AdapterFormatError(f"{key}: features_from {head.features_from} belongs to another tenant")
    return head


def read_head_record(store: Store, key: AdapterKey) -> dict[str, Any] | None:
    """The training record kept with a head version (checksums verified), or None when it has none."""
    manifest, vdir = verified_head_dir(store, key)
    if HEAD_RECORD_FILE not in manifest.files:
        return None
    try:
        record = json.loads((vdir / HEAD_RECORD_FILE).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise AdapterFormatError(f"{key}: {HEAD_RECORD_FILE} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise AdapterFormatError(f"{key}: {HEAD_RECORD_FILE} must hold an object")
    return record


def _producer() -> str:
    try:
        return f"lorafleet {importlib.metadata.version('lorafleet')}"
    except importlib.metadata.PackageNotFoundError:
        return "lorafleet (unknown version)"
