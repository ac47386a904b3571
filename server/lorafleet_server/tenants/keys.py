"""API keys: their format, the keys file, the pepper, and a watcher that keeps a current snapshot.

**Format.** A key is ``lf_<key-id>_<secret>``, 48 characters, e.g.
``lf_k3q7vd2mfa5x_7c2vqk4m...`` (shown once, when it is created). Both parts use one alphabet, lowercase
RFC 4648 base32 without padding (``[a-z2-7]``): no ``_``, ``-`` or upper case, so the key splits on
``_`` unambiguously and survives a double-click selection; an upper-cased copy is refused.

- key id: 12 random characters (60 bits), unique in the file. It is not a secret: it names the key in
  ``lorafleet keys list``, ``revoke`` and the server's logs.
- secret: 20 bytes from ``secrets`` (160 bits), base32-encoded to exactly 32 characters.

**What is stored.** Only ``HMAC-SHA256(pepper, secret)`` in hex for each key id, with the tenant, the
role (``tenant`` or ``admin``), created, expires and revoked (UTC ISO-8601, or null) and the optional
per-key ``weight`` (for fair share later) and limits ``max_waiting`` / ``max_running``. A key is
checked by recomputing the HMAC and comparing with ``hmac.compare_digest``. The secret is never written
anywhere and no error message repeats it.

**The pepper** is a server secret kept apart from the keys file: ``LORAFLEET_KEYS_PEPPER`` when set
(read in ``config.py``), else the file ``<keys-file>.pepper`` beside it (64 hex characters = 32 random
bytes, mode 0600, created by the first ``lorafleet keys create``). Why: a keys file that leaks alone
(a backup, a log of a config repository, a support bundle) gives no way to test guesses offline, since
every guess needs the pepper too. 160-bit secrets are out of reach of guessing anyway; the pepper
is what keeps that true for a file copied without its neighbour, and lets a deployment mount the
pepper from a secret store while the keys file is an ordinary file. The file records a short
``pepper_id`` (an HMAC of a fixed label under the pepper) so that a key created with one pepper and
served with another fails loudly at load instead of every key reading as unknown.

**The file** is JSON, ``{"version": 1, "pepper_id": ..., "keys": [...]}``, validated strictly (unknown
or repeated fields, types, ids, tenant names by the adapter tenant rule, roles, timestamps, limits):
a problem is a ``KeyFileError`` naming the entry and the field. Writes replace the file atomically
(temporary file, fsync, ``os.replace``, mode 0600) under an exclusive ``flock`` on
``<keys-file>.lock``, and every read-modify-write (create, revoke) holds that lock across the read,
so keys created in parallel are never lost.

**The watcher** (``KeyFileWatcher``) holds the current ``KeyRing`` (an immutable snapshot), re-reads
the file when its (mtime, size, inode) or the pepper file's changes, keeps the last good ring when a
new version does not load (one ERROR line, ``on_reload(False)``), and treats a missing file as "no
keys".
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NoReturn, get_args

from lorafleet_adapters.errors import InvalidAdapterRef
from lorafleet_adapters.ref import check_ident
from lorafleet_adapters.strict_json import DuplicateKey, unique_keys
from lorafleet_server.tenants.errors import (
    ExpiredKey,
    InvalidKeyRecord,
    KeyFileError,
    KeyFileUnreadable,
    KeyIdNotFound,
    KeysError,
    MalformedKey,
    MissingKey,
    PepperError,
    PepperUnreadable,
    RevokedKey,
    UnknownKey,
    WrongKeyPrefix,
)

log = logging.getLogger(__name__)

KEY_PREFIX = "lf_"
# A read failing with these is the system's passing trouble (tried again next poll); a permission or a
# path that is no file stays until the file changes.
TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EIO, errno.ENOMEM, errno.EAGAIN, errno.EINTR})
KEY_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lower case
KEY_ID_CHARS = 12
SECRET_BYTES = 20  # 160 bits: a multiple of 5 bytes, so base32 needs no padding
SECRET_CHARS = SECRET_BYTES * 8 // 5  # 32
KEY_CHARS = len(KEY_PREFIX) + KEY_ID_CHARS + 1 + SECRET_CHARS  # 48
KEY_SHAPE = f"lf_<{KEY_ID_CHARS}-character id>_<{SECRET_CHARS}-character secret>, both of [a-z2-7]"

FILE_VERSION = 1
PEPPER_SUFFIX = ".pepper"
LOCK_SUFFIX = ".lock"
PEPPER_BYTES = 32
MIN_PEPPER_CHARS = 32
MAX_KEYS_FILE_BYTES = 64 << 20
MAX_DURATION = timedelta(days=36500)
DEFAULT_POLL_SECONDS = 2.0

_KEY_ID = re.compile(f"[a-z2-7]{{{KEY_ID_CHARS}}}")
_SECRET = re.compile(f"[a-z2-7]{{{SECRET_CHARS}}}")
_HMAC_HEX = re.compile(r"[0-9a-f]{64}")
_PEPPER_ID = re.compile(r"[0-9a-f]{16}")
_DURATION = re.compile(r"([1-9][0-9]{0,9})([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PEPPER_ID_LABEL = b"lorafleet keys pepper id v1"
_NO_MATCH = "0" * 64  # compared against when the id is unknown, so both paths cost one HMAC

Role = Literal["tenant", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
KeyStatus = Literal["active", "revoked", "expired"]

_TOP_FIELDS = ("version", "pepper_id", "keys")
_RECORD_FIELDS = (
    "id",
    "tenant",
    "role",
    "secret_hmac",
    "created",
    "expires",
    "revoked",
    "weight",
    "max_waiting",
    "max_running",
)
_REQUIRED_FIELDS = ("id", "tenant", "role", "secret_hmac", "created")


# --- the key itself -------------------------------------------------------------------------------


def generate_key_id() -> str:
    return "".join(secrets.choice(KEY_ALPHABET) for _ in range(KEY_ID_CHARS))


def generate_secret() -> str:
    return base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii").lower()


def format_key(key_id: str, secret: str) -> str:
    return f"{KEY_PREFIX}{key_id}_{secret}"


def parse_key(text: str | None) -> tuple[str, str]:
    """Split a presented key into (key id, secret). Raises MissingKey, WrongKeyPrefix or MalformedKey;
    the messages say what is wrong by position and length, never by content."""
    if not text:
        raise MissingKey("no API key was given")
    if not isinstance(text, str):
        raise MalformedKey(f"the API key must be text, got {type(text).__name__}")
    if not text.startswith(KEY_PREFIX):
        raise WrongKeyPrefix(f"the API key does not start with {KEY_PREFIX!r}: lorafleet keys look like {KEY_SHAPE}")
    if len(text) != KEY_CHARS:
        raise MalformedKey(
            f"the API key is malformed: {len(text)} characters where {KEY_CHARS} are expected ({KEY_SHAPE})"
        )
    key_id, sep, secret = text[len(KEY_PREFIX) :].partition("_")
    if not sep or _KEY_ID.fullmatch(key_id) is None:
        raise MalformedKey(f"the API key is malformed: its id part is not {KEY_ID_CHARS} characters of [a-z2-7]")
    if _SECRET.fullmatch(secret) is None:
        raise MalformedKey(
            f"the API key is malformed: its secret part is not {SECRET_CHARS} characters of [a-z2-7]", key_id
        )
    return key_id, secret


def hash_secret(pepper: bytes, secret: str) -> str:
    """What the file keeps for a secret: HMAC-SHA256 under the pepper, in hex."""
    return hmac.new(pepper, secret.encode("ascii"), hashlib.sha256).hexdigest()


def pepper_id(pepper: bytes) -> str:
    """A short public tag of the pepper, recorded in the file to catch a key file served with another
    pepper. It reveals nothing useful: a keyed hash of a fixed label."""
    return hmac.new(pepper, _PEPPER_ID_LABEL, hashlib.sha256).hexdigest()[:16]


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m`` or ``3600s`` (a positive integer and one unit), at most 100 years."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid duration {text!r}: expected a positive integer and a unit, e.g. 30d, 12h, 90m, 3600s"
        )
    seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"invalid duration {text!r}: at most {MAX_DURATION.days} days")
    return timedelta(seconds=seconds)


def format_timestamp(when: datetime) -> str:
    """UTC ISO-8601 with a ``Z``: whole seconds unless the value has microseconds (so it round-trips)."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_timestamp(text: str) -> datetime:
    """An ISO-8601 time with an offset (``Z`` or ``+hh:mm``), as UTC; anything else is a ValueError."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"is not an ISO-8601 time: {text!r}") from None
    if when.tzinfo is None:
        raise ValueError(f"has no UTC offset ('Z' or +00:00): {text!r}")
    return when.astimezone(UTC)


# --- records and the ring -------------------------------------------------------------------------


def _check_time(name: str, value: object, *, required: bool) -> datetime | None:
    if value is None and not required:
        return None
    if not isinstance(value, datetime):
        raise InvalidKeyRecord(name, f"must be a time{'' if required else ' or null'}, got {type(value).__name__}")
    if value.tzinfo is None:
        raise InvalidKeyRecord(name, "must be a time with a UTC offset")
    return value.astimezone(UTC)


def _check_limit(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidKeyRecord(name, f"must be an integer > 0 or null, got {type(value).__name__}")
    if value <= 0:
        raise InvalidKeyRecord(name, f"must be an integer > 0 or null, got {value}")
    return value


@dataclass(frozen=True)
class KeyRecord:
    """One key as the server knows it. Times are UTC; ``weight`` / limits None mean "the default"."""

    key_id: str
    tenant: str
    role: Role
    secret_hmac: str = field(repr=False)
    created: datetime
    expires: datetime | None = None
    revoked: datetime | None = None
    weight: float | None = None
    max_waiting: int | None = None
    max_running: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, str) or _KEY_ID.fullmatch(self.key_id) is None:
            raise InvalidKeyRecord("id", f"must be {KEY_ID_CHARS} characters of [a-z2-7]")
        try:
            check_ident(self.tenant, "tenant")
        except InvalidAdapterRef as exc:
            raise InvalidKeyRecord("tenant", f"is invalid: {exc}") from None
        if self.role not in ROLES:
            raise InvalidKeyRecord("role", f"must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.secret_hmac, str) or _HMAC_HEX.fullmatch(self.secret_hmac) is None:
            raise InvalidKeyRecord("secret_hmac", "must be 64 lowercase hex characters (an HMAC-SHA256)")
        object.__setattr__(self, "created", _check_time("created", self.created, required=True))
        object.__setattr__(self, "expires", _check_time("expires", self.expires, required=False))
        object.__setattr__(self, "revoked", _check_time("revoked", self.revoked, required=False))
        weight = self.weight
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise InvalidKeyRecord("weight", f"must be a number > 0 or null, got {type(weight).__name__}")
            try:
                value = float(weight)
            except OverflowError:
                value = math.inf
            if not (math.isfinite(value) and value > 0):
                raise InvalidKeyRecord("weight", f"must be a finite number > 0 or null, got {value}")
            object.__setattr__(self, "weight", value)
        _check_limit("max_waiting", self.max_waiting)
        _check_limit("max_running", self.max_running)

    def status(self, now: datetime) -> KeyStatus:
        """Revoked wins over expired: revocation is the operator's explicit word."""
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"

    def to_json(self) -> dict[str, Any]:
        """The entry as the keys file stores it."""
        return {
            "id": self.key_id,
            "tenant": self.tenant,
            "role": self.role,
            "secret_hmac": self.secret_hmac,
            **self._times(),
            "weight": self.weight,
            "max_waiting": self.max_waiting,
            "max_running": self.max_running,
        }

    def describe(self, now: datetime) -> dict[str, Any]:
        """What ``lorafleet keys list`` shows: everything except the HMAC, plus the status at ``now``."""
        return {
            "id": self.key_id,
            "tenant": self.tenant,
            "role": self.role,
            "status": self.status(now),
            **self._times(),
            "weight": self.weight,
            "max_waiting": self.max_waiting,
            "max_running": self.max_running,
        }

    def _times(self) -> dict[str, str | None]:
        return {
            "created": format_timestamp(self.created),
            "expires": None if self.expires is None else format_timestamp(self.expires),
            "revoked": None if self.revoked is None else format_timestamp(self.revoked),
        }


@dataclass(frozen=True)
class KeyRing:
    """An immutable snapshot of the keys and the pepper that checks them; safe to share across threads."""

    records: tuple[KeyRecord, ...] = ()
    pepper: bytes = field(default=b"", repr=False)
    _by_id: Mapping[str, KeyRecord] = field(init=False, repr=False, compare=False)
    _by_tenant: Mapping[str, tuple[KeyRecord, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id: dict[str, KeyRecord] = {}
        for record in self.records:
            if record.key_id in by_id:
                raise KeysError(f"duplicate key id {record.key_id!r}")
            by_id[record.key_id] = record
        by_tenant: dict[str, list[KeyRecord]] = {}
        for record in self.records:
            by_tenant.setdefault(record.tenant, []).append(record)
        object.__setattr__(self, "records", tuple(self.records))
        object.__setattr__(self, "_by_id", MappingProxyType(by_id))
        object.__setattr__(self, "_by_tenant", MappingProxyType({t: tuple(rs) for t, rs in by_tenant.items()}))

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key_id: str) -> KeyRecord | None:
        return self._by_id.get(key_id)

    def active_count(self, now: datetime) -> int:
        return sum(1 for r in self.records if r.status(now) == "active")

    def authenticate(self, text: str | None, now: datetime) -> KeyRecord:
        """The record of the key ``text`` if it is genuine and usable at ``now`` (timezone-aware).

        Raises MissingKey, WrongKeyPrefix, MalformedKey, UnknownKey (no such id, or a wrong secret:
        one answer, so ids cannot be probed), RevokedKey or ExpiredKey. Revoked and expired are said
        only once the secret matched, so only the key's holder learns them.
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        key_id, secret = parse_key(text)
        record = self._by_id.get(key_id)
        digest = hash_secret(self.pepper, secret)
        matches = hmac.compare_digest(digest, _NO_MATCH if record is None else record.secret_hmac)
        if record is None or not matches:
            raise UnknownKey("the API key is not known to this server", key_id)
        status = record.status(now)
        if status == "revoked":
            assert record.revoked is not None
            raise RevokedKey(f"API key {key_id} was revoked at {format_timestamp(record.revoked)}", key_id)
        if status == "expired":
            assert record.expires is not None
            raise ExpiredKey(f"API key {key_id} expired at {format_timestamp(record.expires)}", key_id)
        return self._with_tenant_limits(record, now)

    def _with_tenant_limits(self, record: KeyRecord, now: datetime) -> KeyRecord:
        """``record`` with its tenant's limits: the smallest ``max_waiting`` / ``max_running`` any active
        key of the tenant sets. The engine counts a tenant's requests, not a key's, so the requesting
        key's own limit let a second key of the same tenant (a rotation's new key made without the
        flags) run and queue without one."""
        mine = [r for r in self._by_tenant[record.tenant] if r.status(now) == "active"]

        def smallest(values: list[int | None]) -> int | None:
            given = [v for v in values if v is not None]
            return min(given) if given else None

        limits = smallest([r.max_waiting for r in mine]), smallest([r.max_running for r in mine])
        if limits == (record.max_waiting, record.max_running):
            return record
        return replace(record, max_waiting=limits[0], max_running=limits[1])


@dataclass(frozen=True)
class NewKey:
    """A freshly created key: the full text (to show once) and the record that was stored."""

    key: str = field(repr=False)
    record: KeyRecord


# --- the pepper -----------------------------------------------------------------------------------


def pepper_path(keys_file: Path) -> Path:
    return keys_file.with_name(keys_file.name + PEPPER_SUFFIX)


def lock_path(keys_file: Path) -> Path:
    return keys_file.with_name(keys_file.name + LOCK_SUFFIX)


def _check_pepper(text: str, where: str) -> bytes:
    value = text.strip()
    if len(value) < MIN_PEPPER_CHARS or not value.isascii() or not value.isprintable() or " " in value:
        raise PepperError(
            f"the pepper in {where} must be at least {MIN_PEPPER_CHARS} printable ASCII characters "
            f"without spaces (it has {len(value)} characters)"
        )
    return value.encode("ascii")


@dataclass(frozen=True)
class PepperSource:
    """Where the pepper comes from: ``override`` (``LORAFLEET_KEYS_PEPPER``) when set, else the file
    ``<keys-file>.pepper``."""

    keys_file: Path
    override: str | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return pepper_path(self.keys_file)

    def read(self) -> bytes:
        if self.override is not None:
            return _check_pepper(self.override, "LORAFLEET_KEYS_PEPPER")
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise PepperError(
                f"no pepper: {self.path} does not exist and LORAFLEET_KEYS_PEPPER is not set "
                "(the first `lorafleet keys create` creates it; keep it with the keys file)"
            ) from None
        except OSError as exc:
            error = PepperUnreadable if exc.errno in TRANSIENT_ERRNOS else PepperError
            raise error(f"cannot read the pepper {self.path}: {exc.strerror or exc}") from None
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise PepperError(f"the pepper {self.path} is not ASCII text") from None
        return _check_pepper(text, str(self.path))

    def ensure(self) -> bytes:
        """The pepper, creating ``<keys-file>.pepper`` (0600, 32 random bytes in hex) when there is
        none. Created complete or not at all: written to a temporary file, then linked into place,
        which fails if another process got there first (then its pepper is used)."""
        if self.override is not None or self.path.exists():
            return self.read()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                os.fchmod(fh.fileno(), 0o600)
                fh.write(secrets.token_hex(PEPPER_BYTES) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(self.path.parent)
        return self.read()


# --- the file -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyFile:
    """A keys file as read, before any pepper is applied (``lorafleet keys list`` needs no pepper)."""

    records: tuple[KeyRecord, ...] = ()
    pepper_id: str | None = None


class _BadJson(ValueError):
    """A JSON document that json.loads would accept but a keys file may not have."""


def _refuse_constant(name: str) -> NoReturn:
    raise _BadJson(f"{name} is not a JSON number")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _entry_name(index: int, entry: object) -> str:
    key_id = entry.get("id") if isinstance(entry, dict) else None
    if isinstance(key_id, str) and _KEY_ID.fullmatch(key_id):
        return f"keys[{index}] (id {key_id})"
    return f"keys[{index}]"


def _time_field(entry: dict[str, Any], name: str) -> datetime:
    value = entry.get(name)
    if not isinstance(value, str):
        raise InvalidKeyRecord(name, f"must be an ISO-8601 time string, got {_json_type(value)}")
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise InvalidKeyRecord(name, str(exc)) from None


def _optional_time_field(entry: dict[str, Any], name: str) -> datetime | None:
    return None if entry.get(name) is None else _time_field(entry, name)


def _record_from_json(entry: dict[str, Any]) -> KeyRecord:
    unknown = [name for name in entry if name not in _RECORD_FIELDS]
    if unknown:
        raise InvalidKeyRecord(unknown[0], f"is not a key field (known: {', '.join(_RECORD_FIELDS)})")
    for name in _REQUIRED_FIELDS:
        if name not in entry:
            raise InvalidKeyRecord(name, "is missing")
    for name in ("id", "tenant", "role", "secret_hmac"):
        if not isinstance(entry[name], str):
            raise InvalidKeyRecord(name, f"must be a string, got {_json_type(entry[name])}")
    weight = entry.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float)):
        raise InvalidKeyRecord("weight", f"must be a number > 0 or null, got {_json_type(weight)}")
    for name in ("max_waiting", "max_running"):
        value = entry.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidKeyRecord(name, f"must be an integer > 0 or null, got {_json_type(value)}")
    return KeyRecord(
        key_id=entry["id"],
        tenant=entry["tenant"],
        role=entry["role"],
        secret_hmac=entry["secret_hmac"],
        created=_time_field(entry, "created"),
        expires=_optional_time_field(entry, "expires"),
        revoked=_optional_time_field(entry, "revoked"),
        weight=weight,
        max_waiting=entry.get("max_waiting"),
        max_running=entry.get("max_running"),
    )


def parse_key_file(data: bytes, where: str) -> KeyFile:
    """Validate a keys document; every problem is a KeyFileError that starts with ``where`` and names
    the entry and the field. Values are echoed only where they are no secret (never an HMAC)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"keys file {where}: is not UTF-8 text") from None
    try:
        doc = json.loads(text, object_pairs_hook=unique_keys, parse_constant=_refuse_constant)
    except (_BadJson, DuplicateKey) as exc:
        raise KeyFileError(f"keys file {where}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise KeyFileError(
            f"keys file {where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise KeyFileError(f"keys file {where}: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise KeyFileError(f"keys file {where}: not a usable JSON document ({str(exc)[:80]})") from None
    if not isinstance(doc, dict):
        raise KeyFileError(f"keys file {where}: must be a JSON object, got {_json_type(doc)}")
    unknown = [name for name in doc if name not in _TOP_FIELDS]
    if unknown:
        raise KeyFileError(f"keys file {where}: unknown field {unknown[0]!r} (known: {', '.join(_TOP_FIELDS)})")
    version = doc.get("version")
    if isinstance(version, bool) or version != FILE_VERSION:
        raise KeyFileError(f"keys file {where}: field 'version' must be {FILE_VERSION}, got {version!r}")
    found_pepper_id = doc.get("pepper_id")
    if found_pepper_id is not None and not (isinstance(found_pepper_id, str) and _PEPPER_ID.fullmatch(found_pepper_id)):
        raise KeyFileError(f"keys file {where}: field 'pepper_id' must be 16 lowercase hex characters or null")
    entries = doc.get("keys")
    if not isinstance(entries, list):
        raise KeyFileError(f"keys file {where}: field 'keys' must be an array, got {_json_type(entries)}")
    records: list[KeyRecord] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        name = _entry_name(index, entry)
        if not isinstance(entry, dict):
            raise KeyFileError(f"keys file {where}: {name} must be an object, got {_json_type(entry)}")
        try:
            record = _record_from_json(entry)
        except InvalidKeyRecord as exc:
            raise KeyFileError(f"keys file {where}: {name}: {exc}") from None
        if record.key_id in seen:
            raise KeyFileError(f"keys file {where}: {name}: field 'id' repeats an earlier key's id")
        seen.add(record.key_id)
        records.append(record)
    return KeyFile(tuple(records), found_pepper_id)


def read_key_file(path: Path) -> KeyFile:
    """The file's contents; a missing file is an empty one ("no keys")."""
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_KEYS_FILE_BYTES:
                raise KeyFileError(f"keys file {path}: {size} bytes, over the {MAX_KEYS_FILE_BYTES}-byte limit")
            data = fh.read(MAX_KEYS_FILE_BYTES + 1)
    except FileNotFoundError:
        return KeyFile()
    except OSError as exc:
        error = KeyFileUnreadable if exc.errno in TRANSIENT_ERRNOS else KeyFileError
        raise error(f"keys file {path}: cannot read it: {exc.strerror or exc}") from None
    return parse_key_file(data, str(path))


def load_keys(path: Path, pepper: bytes) -> KeyRing:
    """The keys of ``path`` as a ring checked with ``pepper``; a missing file is an empty ring."""
    contents = read_key_file(path)
    _check_pepper_matches(path, contents, pepper)
    return KeyRing(contents.records, pepper)


def _check_pepper_matches(path: Path, contents: KeyFile, pepper: bytes) -> None:
    if contents.pepper_id is not None and contents.pepper_id != pepper_id(pepper):
        raise PepperError(
            f"keys file {path} was written with another pepper (pepper id {contents.pepper_id}, this "
            f"pepper's {pepper_id(pepper)}): keep {pepper_path(path).name} beside it, or set "
            "LORAFLEET_KEYS_PEPPER to the pepper it was written with"
        )


def _real(path: Path) -> Path:
    """The file ``path`` names through any symlinks: a write replaced the link with a file of its own
    (an outside review: `keys revoke` through a linked path said "revoked" while the servers' real file
    kept the key active), and its lock did not serialise with writers using the real path."""
    return Path(os.path.realpath(path))


@contextlib.contextmanager
def lock_keys_file(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``path`` (``flock`` on ``<keys-file>.lock`` beside the real file). Not
    re-entrant: the functions below that take it must not be called while it is held."""
    path = _real(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_locked(path: Path, records: Iterable[KeyRecord], file_pepper_id: str | None) -> None:
    doc = {"version": FILE_VERSION, "pepper_id": file_pepper_id, "keys": [r.to_json() for r in records]}
    data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
    path = _real(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def save_keys(path: Path, records: Iterable[KeyRecord], pepper: bytes) -> None:
    """Replace the whole file atomically, under the lock. A read-modify-write must hold the lock across
    its read as well: use ``create_key`` / ``revoke_key``."""
    records = tuple(records)
    KeyRing(records, pepper)  # refuses duplicate ids before anything is written
    with lock_keys_file(path):
        _write_locked(path, records, pepper_id(pepper))


def create_key(
    path: Path,
    pepper: PepperSource,
    *,
    tenant: str,
    role: Role,
    now: datetime,
    expires: datetime | None = None,
    weight: float | None = None,
    max_waiting: int | None = None,
    max_running: int | None = None,
) -> NewKey:
    """Add a new key to ``path`` and return it (the only time its text exists). The fields are checked
    before anything is written; the pepper file is created if this is the file's first key."""
    created = _utc_now(now).replace(microsecond=0)
    placeholder = KeyRecord(
        key_id="a" * KEY_ID_CHARS,
        tenant=tenant,
        role=role,
        secret_hmac=_NO_MATCH,
        created=created,
        expires=expires,
        weight=weight,
        max_waiting=max_waiting,
        max_running=max_running,
    )
    with lock_keys_file(path):
        current = read_key_file(path)
        has_keys = current.pepper_id is not None or bool(current.records)
        secret_pepper = pepper.read() if has_keys else pepper.ensure()
        _check_pepper_matches(path, current, secret_pepper)
        taken = {r.key_id for r in current.records}
        key_id = generate_key_id()
        while key_id in taken:
            key_id = generate_key_id()
        secret = generate_secret()
        record = replace(placeholder, key_id=key_id, secret_hmac=hash_secret(secret_pepper, secret))
        _write_locked(path, (*current.records, record), pepper_id(secret_pepper))
    return NewKey(format_key(key_id, secret), record)


def _utc_now(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


def revoke_key(path: Path, key_id: str, now: datetime) -> tuple[KeyRecord, bool]:
    """Mark ``key_id`` revoked at ``now``. Returns the record and whether this call revoked it (False:
    it already was, and nothing is written). Needs no pepper: revoking must work in an emergency."""
    if _KEY_ID.fullmatch(key_id) is None:
        raise KeyIdNotFound(
            f"not a key id: expected {KEY_ID_CHARS} characters of [a-z2-7], as `lorafleet keys list` shows"
        )
    if not path.exists():  # checked again under the lock; this only avoids creating a lock file for nothing
        raise KeyIdNotFound(f"no key with id {key_id}: {path} does not exist")
    with lock_keys_file(path):
        current = read_key_file(path)
        records = list(current.records)
        index = next((i for i, r in enumerate(records) if r.key_id == key_id), None)
        if index is None:
            raise KeyIdNotFound(f"no key with id {key_id} in {path}")
        record = records[index]
        if record.revoked is not None:
            return record, False
        records[index] = revoked = replace(record, revoked=_utc_now(now).replace(microsecond=0))
        _write_locked(path, records, current.pepper_id)
    return revoked, True


def loose_permissions(keys_file: Path, pepper_file: Path | None) -> list[str]:
    """What others than the owner may do that they should not: change the keys file (a tenant on the
    host could make its key an admin's without knowing the pepper), or read or change the pepper (forge
    keys). Both are written 0600; a copy without -p, a restore or a config tool can widen them."""
    problems = []
    checks = [(keys_file, 0o022, "written by group or others")]
    if pepper_file is not None:  # group read is fine: a Kubernetes fsGroup makes a 0400 Secret 0440
        checks.append((pepper_file, 0o027, "written by group or read by others"))
    for path, loose, what in checks:
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            continue
        if mode & loose:
            problems.append(f"{path} (mode {mode:04o}) can be {what}: chmod 600 it")
    return problems


# --- the watcher ----------------------------------------------------------------------------------

_Stat = tuple[int, int, int]


def _stat(path: Path) -> _Stat | None:
    """(mtime_ns, size, inode), None when the file does not exist. An unreadable path gets a value of
    its own so that the load is tried (and its error reported)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return (-1, -1, -(exc.errno or 1))
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class KeyFileWatcher:
    """The current KeyRing of a keys file, reloaded when the file changes.

    ``poll()`` is cheap when nothing changed (two ``stat`` calls) and may be called from any thread;
    ``start(poll_seconds)`` runs it on a daemon thread ("keys-watch") until ``stop()``. ``ring`` and
    ``authenticate`` read one immutable snapshot, so they need no lock. ``on_reload(ok)`` is told
    about every reload attempt (a metric counter, typically).
    """

    def __init__(self, path: Path, pepper: PepperSource, on_reload: Callable[[bool], None] | None = None) -> None:
        self._path = path
        self._pepper = pepper
        self._on_reload = on_reload if on_reload is not None else _ignore
        self._ring = KeyRing()
        self._seen: tuple[_Stat | None, _Stat | None] | None = None
        self._last_error = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def ring(self) -> KeyRing:
        return self._ring

    def authenticate(self, text: str | None, now: datetime) -> KeyRecord:
        return self._ring.authenticate(text, now)

    def poll(self) -> bool:
        """Reload if the keys file or the pepper file changed since the last poll. Returns True when a
        new ring was installed. A file that does not load keeps the last good ring; it is reported
        once (not on every poll) and tried again when it changes."""
        with self._lock:
            pepper_stat = _stat(self._pepper.path) if self._pepper.override is None else None
            seen = (_stat(self._path), pepper_stat)
            if seen == self._seen:
                return False
            self._seen = seen
            previous = self._ring
            try:
                ring = KeyRing() if seen[0] is None else load_keys(self._path, self._pepper.read())
            except KeysError as exc:
                if isinstance(exc, KeyFileUnreadable | PepperUnreadable):
                    self._seen = None  # the system failed the read, not the file: try again next poll
                if str(exc) != self._last_error:  # a failure is reported once, not on every poll
                    log.error(
                        "keys file %s: not reloaded, the last good keys (%d) stay: %s", self._path, len(previous), exc
                    )
                self._last_error = str(exc)
                self._revoke_what_the_file_revokes(previous)
                self._on_reload(False)
                return False
            except Exception as exc:  # a bug, not a bad file: keep serving the last good keys
                log.error(
                    "keys file %s: not reloaded (%s: %s), the last good keys (%d) stay",
                    self._path,
                    type(exc).__name__,
                    exc,
                    len(previous),
                )
                self._on_reload(False)
                return False
            self._ring = ring
            self._last_error = ""
            if seen[0] is None:
                level = logging.WARNING if len(previous) else logging.INFO
                log.log(level, "keys file %s: not there, no API keys", self._path)
            else:
                active = ring.active_count(datetime.now(UTC))
                log.info("keys file %s: loaded %d keys (%d active)", self._path, len(ring), active)
                for problem in loose_permissions(self._path, None if self._pepper.override else self._pepper.path):
                    log.warning("%s", problem)
            self._on_reload(True)
            return True

    def _revoke_what_the_file_revokes(self, previous: KeyRing) -> None:
        """After a reload failed, still apply what only takes access away: a key the file revokes or lets
        expire sooner. ``lorafleet keys revoke`` needs no pepper (an emergency must work), so without
        this a revocation written while the pepper was missing or replaced, or read by a failing
        reload, was never applied: the key kept working. A key the file no longer lists stays: an
        empty or truncated file (a placeholder applied over the real one) must not lock every caller
        out. The rest waits for a good load."""
        try:
            contents = read_key_file(self._path)  # its parse needs no pepper
        except KeysError:
            return
        listed = {r.key_id: r for r in contents.records}
        kept: list[KeyRecord] = []
        changed: list[str] = []
        for record in previous.records:
            new = listed.get(record.key_id)
            if new is None:
                kept.append(record)
                continue
            narrowed = record
            if new.revoked is not None and record.revoked is None:
                narrowed = replace(narrowed, revoked=new.revoked)
            if new.expires is not None and (record.expires is None or new.expires < record.expires):
                narrowed = replace(narrowed, expires=new.expires)
            if narrowed != record:
                changed.append(record.key_id)
            kept.append(narrowed)
        if changed:
            self._ring = KeyRing(tuple(kept), previous.pepper)
            log.warning(
                "keys file %s: applied what takes access away from keys %s (revoked or expiring sooner); "
                "nothing else changes until the file loads",
                self._path,
                ", ".join(sorted(changed)),
            )

    def start(self, poll_seconds: float = DEFAULT_POLL_SECONDS) -> None:
        """Load now (so the ring is current when this returns), then poll every ``poll_seconds``."""
        if not poll_seconds > 0:
            raise ValueError("poll_seconds must be > 0")
        if self._thread is not None:
            raise RuntimeError("the keys file watcher is already running")
        self.poll()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(poll_seconds,), name="keys-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self, poll_seconds: float) -> None:
        while not self._stop.wait(poll_seconds):
            try:
                self.poll()
            except Exception:  # e.g. on_reload raised; the next pass may succeed
                log.exception("keys file watch pass failed")


def _ignore(ok: bool) -> None:
    """The default ``on_reload``: nothing counts reloads."""
