"""Adapter references: ``tenant/name[@version]``, parsed and validated before any file is touched."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorafleet_adapters.errors import InvalidAdapterRef

MAX_REF_CHARS = 140
MIN_VERSION = 1
MAX_VERSION = 999_999_999

_IDENT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_VERSION = re.compile(r"[1-9][0-9]{0,8}")


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters of a string: a caller's 1 MB
    name must not come back as a 1 MB message (gRPC would refuse to send it) or a 1 MB log line."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)


def is_ident(value: str) -> bool:
    """Whether ``value`` is a valid tenant or adapter name."""
    return _IDENT.fullmatch(value) is not None


def check_ident(value: str, field: str) -> str:
    """Return `value` if it is a valid tenant or adapter name, else raise InvalidAdapterRef."""
    if not isinstance(value, str) or _IDENT.fullmatch(value) is None:
        raise InvalidAdapterRef(
            f"invalid {field} {shown(value)}: expected 1-63 characters of [a-z0-9_-] starting with [a-z0-9]"
        )
    return value


def check_version(value: int) -> int:
    """Return `value` if it is a valid version number (1..999999999), else raise InvalidAdapterRef."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_VERSION <= value <= MAX_VERSION:
        raise InvalidAdapterRef(f"invalid version {value!r}: expected an integer in {MIN_VERSION}..{MAX_VERSION}")
    return value


def parse_version(text: str) -> int:
    """Parse a canonical decimal version (no sign, no leading zeros), else raise InvalidAdapterRef."""
    if _VERSION.fullmatch(text) is None:
        raise InvalidAdapterRef(
            f"invalid version {shown(text)}: expected a decimal integer in {MIN_VERSION}..{MAX_VERSION} "
            "without leading zeros"
        )
    return int(text)


@dataclass(frozen=True)
class AdapterRef:
    """A reference as a client writes it; `version` None means the latest published version."""

    tenant: str
    name: str
    version: int | None = None

    def __post_init__(self) -> None:
        check_ident(self.tenant, "tenant")
        check_ident(self.name, "adapter name")
        if self.version is not None:
            check_version(self.version)

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """Parse ``tenant/name`` or ``tenant/name@version``; raise InvalidAdapterRef on anything else."""
        if not isinstance(text, str):
            raise InvalidAdapterRef(f"adapter reference must be a string, got {type(text).__name__}")
        if not text:
            raise InvalidAdapterRef("adapter reference is empty")
        if len(text) > MAX_REF_CHARS:
            raise InvalidAdapterRef(f"adapter reference is {len(text)} characters long; the limit is {MAX_REF_CHARS}")
        if not text.isascii() or not text.isprintable() or any(c.isspace() for c in text):
            raise InvalidAdapterRef(f"adapter reference {text!r} contains whitespace, control or non-ASCII characters")
        body, at, version_text = text.partition("@")
        if at and not version_text:
            raise InvalidAdapterRef(f"adapter reference {text!r} has '@' but no version after it")
        parts = body.split("/")
        if len(parts) != 2:
            raise InvalidAdapterRef(f"adapter reference {text!r} must have the form tenant/name[@version]")
        tenant, name = parts
        version = parse_version(version_text) if at else None
        return cls(check_ident(tenant, "tenant"), check_ident(name, "adapter name"), version)

    def __str__(self) -> str:
        base = f"{self.tenant}/{self.name}"
        return base if self.version is None else f"{base}@{self.version}"


@dataclass(frozen=True)
class AdapterKey:
    """One concrete, immutable published version."""

    tenant: str
    name: str
    version: int

    def __post_init__(self) -> None:
        check_ident(self.tenant, "tenant")
        check_ident(self.name, "adapter name")
        check_version(self.version)

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.tenant, self.name, self.version)

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}@{self.version}"
