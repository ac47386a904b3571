"""Domain errors of API keys: plain exceptions, mapped to gRPC status codes only at the edge.

Two families. ``AuthenticationError`` is what a caller gets for the key it presented; each subclass
carries a ``reason`` code (for a metric label and a log field) and a message that says what is wrong
without ever repeating the secret. ``KeysError`` is an operator's problem: a keys file or pepper that
cannot be used, or a key id that is not in the file.
"""

from __future__ import annotations

from typing import ClassVar, Literal

AuthFailure = Literal["missing", "malformed", "wrong_prefix", "unknown_key", "revoked", "expired"]


class TenantsError(Exception):
    """Base of every error of ``lorafleet_server.tenants``."""


class AuthenticationError(TenantsError):
    """The presented API key does not authenticate. ``key_id`` is the id part when it could be parsed
    (an id is no secret: ``lorafleet keys list`` shows it); the secret is never kept."""

    reason: ClassVar[AuthFailure]

    def __init__(self, message: str, key_id: str | None = None) -> None:
        super().__init__(message)
        self.key_id = key_id


class MissingKey(AuthenticationError):
    """No API key was presented (or an empty one)."""

    reason = "missing"


class WrongKeyPrefix(AuthenticationError):
    """The text does not start with ``lf_``: not a lorafleet key at all (another service's key, or a
    ``Bearer`` scheme left in front of it)."""

    reason = "wrong_prefix"


class MalformedKey(AuthenticationError):
    """It starts with ``lf_`` but is not ``lf_<12-char id>_<32-char secret>`` in the key alphabet."""

    reason = "malformed"


class UnknownKey(AuthenticationError):
    """No key with this id, or the secret does not match it. Both read the same to the caller, so a
    caller cannot learn which ids exist; ``key_id`` still tells the server's log which id was tried."""

    reason = "unknown_key"


class RevokedKey(AuthenticationError):
    """A genuine key that ``lorafleet keys revoke`` has revoked (said only after the secret matched)."""

    reason = "revoked"


class ExpiredKey(AuthenticationError):
    """A genuine key past its ``expires`` time (said only after the secret matched)."""

    reason = "expired"


class KeysError(TenantsError):
    """A keys file, a pepper or a key id that the operator must fix."""


class KeyFileError(KeysError):
    """The keys file is unreadable or does not validate; the message names the entry and the field."""


class PepperError(KeysError):
    """The pepper is missing, unreadable, too short, or not the one the keys file was written with."""


class KeyFileUnreadable(KeyFileError):
    """Reading the keys file failed (too many open files, an I/O error); its contents may be fine."""


class PepperUnreadable(PepperError):
    """Reading the pepper file failed; its contents may be fine."""


class InvalidKeyRecord(KeysError, ValueError):
    """One field of a key record is out of its rules; ``field`` names it (as it is named in the file)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field {field!r} {message}")
        self.field = field
        self.detail = message


class KeyIdNotFound(KeysError):
    """An operator named a key id that is not in the keys file (``lorafleet keys revoke``)."""
