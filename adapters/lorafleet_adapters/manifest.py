"""The manifest of one published adapter version (``manifest.json``)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from lorafleet_adapters.errors import AdapterFormatError, AdapterIncompatible, InvalidAdapterRef
from lorafleet_adapters.ref import check_ident, check_version
from lorafleet_adapters.strict_json import unique_keys

if TYPE_CHECKING:
    from lorafleet_adapters.peft_format import BaseModelSpec

SCHEMA_VERSION = 1
KINDS = ("lora", "prompt", "head")
METHODS = ("lora", "qlora")
PROMPT_METHOD = "prompt"  # the method of kind "prompt" versions (no weights, rank 0)
HEAD_METHOD = "logreg"  # the method of kind "head" versions (a classifier on pooled features, rank 0)
MAX_MANIFEST_BYTES = 1 << 20

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# A file recorded in a manifest is a plain name inside the version directory: no separators, no "..".
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def utc_now_iso() -> str:
    """The current UTC time as ISO-8601 with a 'Z' suffix, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def check_file_name(name: str) -> str:
    """Return `name` if it is a safe plain file name for a version directory, else raise."""
    if not isinstance(name, str) or _FILE_NAME.fullmatch(name) is None or ".." in name:
        raise AdapterFormatError(f"manifest field 'files': {name!r} is not a plain file name")
    return name


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    tenant: str
    name: str
    version: int
    kind: str
    method: str
    base_fingerprint: str
    base_model: str
    base_quantization: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    files: Mapping[str, str]
    created_at: str
    producer: str
    training_data_fingerprint: str | None = None
    eval_metrics: Mapping[str, float] = field(default_factory=dict)
    pii_scan: Mapping[str, Any] | None = None
    # The base's prompt format (BaseModelSpec.prompt_format) when published; absent in older manifests.
    base_prompt_format: str | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        if self.schema_version != SCHEMA_VERSION:
            raise AdapterFormatError(
                f"manifest field 'schema_version' is {self.schema_version}; only {SCHEMA_VERSION} is supported"
            )
        try:
            check_ident(self.tenant, "tenant")
            check_ident(self.name, "adapter name")
            check_version(self.version)
        except InvalidAdapterRef as exc:
            raise AdapterFormatError(f"manifest: {exc}") from None
        if self.kind not in KINDS:
            raise AdapterFormatError(f"manifest field 'kind' is {self.kind!r}; expected one of {KINDS}")
        if self.kind == "prompt":
            if self.method != PROMPT_METHOD or self.rank != 0:
                raise AdapterFormatError("a manifest of kind 'prompt' has method 'prompt' and rank 0")
        elif self.kind == "head":
            if self.method != HEAD_METHOD or self.rank != 0:
                raise AdapterFormatError(f"a manifest of kind 'head' has method {HEAD_METHOD!r} and rank 0")
        elif self.method not in METHODS:
            raise AdapterFormatError(f"manifest field 'method' is {self.method!r}; expected one of {METHODS}")
        elif self.rank < 1:
            raise AdapterFormatError(f"manifest field 'rank' is {self.rank}; expected >= 1")
        try:
            datetime.fromisoformat(self.created_at)
        except ValueError:
            raise AdapterFormatError(
                f"manifest field 'created_at' is {self.created_at!r}; expected an ISO-8601 timestamp"
            ) from None
        if not is_finite_number(self.lora_alpha):
            raise AdapterFormatError(f"manifest field 'lora_alpha' is {self.lora_alpha}; expected a finite number")
        for file_name, digest in self.files.items():
            check_file_name(file_name)
            if not isinstance(digest, str) or _SHA256_HEX.fullmatch(digest) is None:
                raise AdapterFormatError(f"manifest field 'files': {file_name!r} has no valid sha256 hex digest")
        for metric, value in self.eval_metrics.items():
            if not isinstance(metric, str) or not is_finite_number(value):
                raise AdapterFormatError(f"manifest field 'eval_metrics': {metric!r} is not a finite number")
        object.__setattr__(self, "lora_alpha", float(self.lora_alpha))
        object.__setattr__(self, "target_modules", tuple(sorted(self.target_modules)))
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))
        object.__setattr__(self, "eval_metrics", MappingProxyType({k: float(v) for k, v in self.eval_metrics.items()}))
        if self.pii_scan is not None:
            object.__setattr__(self, "pii_scan", MappingProxyType(dict(self.pii_scan)))

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["target_modules"] = list(self.target_modules)
        data["files"] = dict(self.files)
        data["eval_metrics"] = dict(self.eval_metrics)
        data["pii_scan"] = None if self.pii_scan is None else dict(self.pii_scan)
        # Left out when unknown. A server older than the field refuses a manifest that has it (unknown
        # fields are refused): upgrade servers before trainers (docs/fleet.md).
        if self.base_prompt_format is None:
            del data["base_prompt_format"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate a manifest; raise AdapterFormatError naming the bad field."""
        try:
            data = json.loads(text, object_pairs_hook=unique_keys)  # a key given twice: refused, not last-wins
        except (ValueError, RecursionError) as exc:
            raise AdapterFormatError(f"manifest.json is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise AdapterFormatError("manifest.json must hold a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterFormatError(f"manifest.json has unknown fields {unknown}")
        required = {f.name for f in fields(cls) if f.name not in _OPTIONAL}
        missing = sorted(required - set(data))
        if missing:
            raise AdapterFormatError(f"manifest.json lacks required fields {missing}")
        if isinstance(data.get("target_modules"), list):
            data["target_modules"] = tuple(data["target_modules"])
        if data.get("eval_metrics") is None:
            data["eval_metrics"] = {}
        return cls(**data)


_OPTIONAL = frozenset({"training_data_fingerprint", "eval_metrics", "pii_scan", "base_prompt_format"})


def prompt_formats_differ(built: str | None, current: str) -> bool:
    """Whether a version built under prompt format ``built`` does not fit a base of ``current``: both
    known (not None or "") and not the same. A side that does not know its format passes."""
    return bool(built and current and built != current)


def built_for(manifest: Manifest, spec: BaseModelSpec) -> bool:
    """Whether ``manifest``'s version was built for ``spec``'s base: the same weights and, where both
    know it, the same prompt format; and a head, the same quantization (it reads the base's features).
    A version that is not is stale (``lorafleet retrain --stale``)."""
    return (
        manifest.base_fingerprint == spec.fingerprint
        and not prompt_formats_differ(manifest.base_prompt_format, spec.prompt_format)
        and not head_quantization_differs(manifest, spec)
    )


def head_quantization_differs(manifest: Manifest, spec: BaseModelSpec) -> bool:
    """A head fitted on the features of a base quantized otherwise than ``spec``'s (unquantized features
    under an NF4 base flipped 24 of 136 answers, an outside review). Only heads: a LoRA's weights are
    served on any quantization of its base."""
    return manifest.kind == "head" and manifest.base_quantization != spec.quantization


def check_loadable_lora(key: object, manifest: Manifest, spec: BaseModelSpec) -> None:
    """Refuse, before any weights are read, a version ``spec``'s base cannot load as a LoRA: another kind
    (AdapterFormatError), or built for other base weights or another prompt format (AdapterIncompatible)."""
    if manifest.kind != "lora":
        raise AdapterFormatError(f"{key}: manifest kind is {manifest.kind!r}; only 'lora' has weights")
    if manifest.base_fingerprint != spec.fingerprint:
        raise AdapterIncompatible(
            f"{key} was built for base {manifest.base_fingerprint} ({manifest.base_model}, "
            f"{manifest.base_quantization}); this server's base is {spec.fingerprint} "
            f"({spec.model_id}, {spec.quantization})"
        )
    check_prompt_format(key, manifest, spec.prompt_format)


def check_servable(key: object, manifest: Manifest, spec: BaseModelSpec) -> None:
    """Refuse, from its manifest alone, a version ``spec``'s base cannot serve: a LoRA or a head built
    for other base weights, or any kind published under another prompt format (AdapterIncompatible)."""
    if manifest.kind == "lora":
        check_loadable_lora(key, manifest, spec)
        return
    if manifest.kind == "head" and manifest.base_fingerprint != spec.fingerprint:
        raise AdapterIncompatible(
            f"{key} was built for base {manifest.base_fingerprint} ({manifest.base_model}); this server's base "
            f"is {spec.fingerprint} ({spec.model_id})"
        )
    if head_quantization_differs(manifest, spec):
        raise AdapterIncompatible(
            f"{key} is a head fitted on the features of the {manifest.base_quantization} base; this server's "
            f"base is {spec.quantization}, whose features differ: retrain it (lorafleet retrain --stale)"
        )
    check_prompt_format(key, manifest, spec.prompt_format)


def check_prompt_format(key: object, manifest: Manifest, spec_prompt_format: str) -> None:
    """Refuse a version published under another prompt format than the server's base (its tokenizer or
    chat template changed while the weights did not); a side that does not know its format passes."""
    if prompt_formats_differ(manifest.base_prompt_format, spec_prompt_format):
        raise AdapterIncompatible(
            f"{key} was trained with another tokenizer or chat template (prompt format "
            f"{manifest.base_prompt_format}) than this server's base, whose prompt format is "
            f"{spec_prompt_format}: retrain it with `lorafleet retrain --stale`"
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that is finite as a float: JSON's 1e999 is inf, and an integer of
    400 digits has no float (``math.isfinite`` raises OverflowError on it)."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except OverflowError:
        return False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_types(m: Manifest) -> None:
    checks: dict[str, tuple[bool, str]] = {
        "schema_version": (_is_int(m.schema_version), "an integer"),
        "tenant": (isinstance(m.tenant, str), "a string"),
        "name": (isinstance(m.name, str), "a string"),
        "version": (_is_int(m.version), "an integer"),
        "kind": (isinstance(m.kind, str), "a string"),
        "method": (isinstance(m.method, str), "a string"),
        "base_fingerprint": (
            isinstance(m.base_fingerprint, str) and bool(m.base_fingerprint),
            "a non-empty string",
        ),
        "base_model": (isinstance(m.base_model, str), "a string"),
        "base_quantization": (isinstance(m.base_quantization, str), "a string"),
        "rank": (_is_int(m.rank), "an integer"),
        "lora_alpha": (_is_number(m.lora_alpha), "a number"),
        "use_rslora": (isinstance(m.use_rslora, bool), "a boolean"),
        "target_modules": (
            isinstance(m.target_modules, tuple | list) and all(isinstance(t, str) for t in m.target_modules),
            "a list of strings",
        ),
        "files": (isinstance(m.files, Mapping) and all(isinstance(k, str) for k in m.files), "an object"),
        "created_at": (isinstance(m.created_at, str) and bool(m.created_at), "a non-empty string"),
        "producer": (isinstance(m.producer, str) and bool(m.producer), "a non-empty string"),
        "training_data_fingerprint": (
            m.training_data_fingerprint is None or isinstance(m.training_data_fingerprint, str),
            "a string or null",
        ),
        "eval_metrics": (isinstance(m.eval_metrics, Mapping), "an object"),
        "pii_scan": (m.pii_scan is None or isinstance(m.pii_scan, Mapping), "an object or null"),
        "base_prompt_format": (
            m.base_prompt_format is None or isinstance(m.base_prompt_format, str),
            "a string or null",
        ),
    }
    for name, (ok, expected) in checks.items():
        if not ok:
            raise AdapterFormatError(f"manifest field {name!r} must be {expected}, got {getattr(m, name)!r}")
