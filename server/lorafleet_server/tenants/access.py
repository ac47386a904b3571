"""Who may reach what, independent of the transport: the Bearer key of a request and tenant isolation.

Both edges use these (gRPC in ``grpc/auth.py``, HTTP in ``http/auth.py``), so a key is read and a tenant
is isolated the same way whichever protocol the caller speaks. Nothing here knows gRPC or HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from lorafleet_adapters.errors import AdapterNotFound
from lorafleet_adapters.ref import AdapterRef
from lorafleet_server.tenants.errors import MalformedKey, MissingKey
from lorafleet_server.tenants.keys import KeyRecord

AUTHORIZATION = "authorization"
BEARER = "bearer"
# Schemes named back to a caller that sent one (the word only, never what follows it). Anything else is
# not repeated: a value without a scheme may be the key itself.
KNOWN_SCHEMES = frozenset({"basic", "digest", "negotiate", "token", "apikey"})


class KeyChecker(Protocol):
    """What an edge needs of the keys: whether they are enforced now, and checking one."""

    @property
    def enforcing(self) -> bool: ...

    def authenticate(self, text: str, now: datetime) -> KeyRecord: ...


class Caller(Protocol):
    """The part of the engine's ``Principal`` that isolation reads (the key's tenant and role)."""

    @property
    def tenant(self) -> str: ...

    @property
    def role(self) -> str: ...


def bearer_key(metadata: Sequence[tuple[str, str | bytes]] | None, where: str = "metadata") -> str:
    """The key of the request's ``authorization: Bearer <key>`` entry (the scheme in any case).

    ``metadata``: the request's (name, value) pairs, names in lower case (gRPC metadata, HTTP headers);
    ``where`` names them in messages. Raises MissingKey (no entry, or ``Bearer`` with nothing after it)
    or MalformedKey (more than one entry, another scheme, no scheme). The messages never contain what
    was sent, except a well-known scheme word such as ``Basic``.
    """
    values = [value for key, value in metadata or () if key == AUTHORIZATION]
    if not values:
        raise MissingKey(f"no API key: send the {where} 'authorization: Bearer <key>'")
    if len(values) > 1:
        raise MalformedKey(f"more than one 'authorization' {where} entry: send exactly one, 'Bearer <key>'")
    value = values[0]
    if not isinstance(value, str):
        raise MalformedKey(f"the 'authorization' {where} is not text: send 'Bearer <key>'")
    scheme, space, key = value.strip().partition(" ")
    if scheme.lower() != BEARER:
        if space and scheme.lower() in KNOWN_SCHEMES:
            raise MalformedKey(f"the 'authorization' {where} uses the {scheme} scheme: send 'Bearer <key>'")
        raise MalformedKey(f"the 'authorization' {where} is not 'Bearer <key>'")
    key = key.strip()
    if not key:
        raise MissingKey(f"the 'authorization' {where} says Bearer but carries no key: send 'Bearer <key>'")
    return key


def is_foreign(principal: Caller | None, tenant: str) -> bool:
    """Whether ``tenant``'s adapters are out of the caller's reach: a tenant key and another tenant.
    On a server without keys (no principal) and for admin keys nothing is foreign."""
    return principal is not None and principal.role != "admin" and tenant != principal.tenant


def sees_every_tenant(principal: Caller | None) -> bool:
    """Whether what the server holds for all tenants together (the slot memory of every loaded adapter,
    which tells their ranks and targets) may be shown: to admin keys, and on a server without keys."""
    return principal is None or principal.role == "admin"


def check_adapter_access(principal: Caller | None, ref: AdapterRef | None) -> None:
    """Inference through another tenant's adapter fails exactly as an adapter that does not exist: the
    store's own words for an unknown adapter (``AdapterStore.resolve``), with or without a version, so
    the answer says nothing about whether the name exists. The base model (None) is open to all."""
    if ref is not None and is_foreign(principal, ref.tenant):
        raise AdapterNotFound(f"adapter {ref.tenant}/{ref.name} not found")


def check_admin_view(principal: Caller | None, ref: AdapterRef) -> None:
    """GetAdapter on another tenant's adapter: the admin view's own words for an adapter with no
    versions in the store (``AdapterAdmin.get``)."""
    if is_foreign(principal, ref.tenant):
        raise AdapterNotFound(f"adapter {ref.tenant}/{ref.name} is not in the store")


def listed_tenant(principal: Caller | None, requested: str) -> str | None:
    """Which tenant's adapters a listing shows: ``requested`` ("" = all) for admins and on a server
    without keys; for a tenant key its own tenant, and None (an empty listing, as for a tenant with no
    adapters) when it asks for another one."""
    if principal is None or principal.role == "admin":
        return requested
    if requested and requested != principal.tenant:
        return None
    return principal.tenant
