"""The caller as the engine sees it, from an authenticated API key: one mapping for both edges."""

from __future__ import annotations

from lorafleet_server.engine.types import Principal
from lorafleet_server.tenants.keys import KeyRecord


def principal_from(record: KeyRecord) -> Principal:
    """The key's id, tenant, role, weight and limits; never anything from the request."""
    return Principal(
        key_id=record.key_id,
        tenant=record.tenant,
        role=record.role,
        weight=record.weight if record.weight is not None else 1.0,
        max_waiting=record.max_waiting,
        max_running=record.max_running,
    )
