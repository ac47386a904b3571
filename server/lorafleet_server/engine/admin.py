"""Adapter administration on a running server: views of the tiers, prefetch, pin, unload.

This module talks only to the engine and its ``AdapterManager``. Slot changes and slot snapshots run
on the engine thread between steps (``Engine.run``, with a bounded wait: ``EngineTimeout`` when the
engine does not get to them in time); store reads and host loads run on the caller's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from lorafleet_adapters.device_slots import SlotInfo
from lorafleet_adapters.errors import AdapterError, AdapterNotFound, InvalidAdapterRef, StoreUnavailable
from lorafleet_adapters.manifest import Manifest
from lorafleet_adapters.ref import AdapterKey, AdapterRef, check_ident
from lorafleet_server.engine.adapter_manager import Tier
from lorafleet_server.engine.engine import Engine
from lorafleet_server.engine.versions import RefreshResult
from lorafleet_server.errors import AdapterBusy

__all__ = ["AdapterAdmin", "AdapterView", "Tier", "VersionView"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionView:
    version: int
    manifest: Manifest
    tier: Tier
    pinned: bool
    active_requests: int


@dataclass(frozen=True)
class AdapterView:
    tenant: str
    name: str
    latest: int | None
    versions: tuple[VersionView, ...]


class AdapterAdmin:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._manager = engine.adapters

    def page(
        self, tenant: str = "", after: tuple[str, str] | None = None, limit: int | None = None
    ) -> tuple[list[AdapterView], tuple[str, str] | None]:
        """The adapters (of ``tenant``) after ``after`` (tenant, name) in tenant and name order, at most
        ``limit`` of them (None: all); and the last one's (tenant, name) when more follow, else None.
        Only the page's adapters are read from the store (one more, to know whether more follow), and
        only their versions' manifests and tiers: a listing of thousands of versions did not fit one
        gRPC response, and each page listed the whole store again."""
        if tenant:
            check_ident(tenant, "tenant")
        summaries = self._manager.list_store(tenant or None, after, None if limit is None else limit + 1)
        more = limit is not None and len(summaries) > limit
        summaries = summaries[:limit] if limit is not None else summaries
        slots = self._slots() if summaries else {}  # one snapshot for the whole page
        views = [self._view(s.tenant, s.name, s.latest, s.versions, slots) for s in summaries]
        return views, ((views[-1].tenant, views[-1].name) if more else None)

    def list(self, tenant: str = "") -> list[AdapterView]:
        return self.page(tenant)[0]

    def get(self, reference: str) -> AdapterView:
        ref = AdapterRef.parse(reference)
        if ref.version is not None:
            raise InvalidAdapterRef("GetAdapter takes tenant/name without a version")
        versions = self._manager.store_versions(ref)
        if not versions:
            raise AdapterNotFound(f"adapter {ref.tenant}/{ref.name} is not in the store")
        latest = self._manager.store_latest(ref)
        return self._view(ref.tenant, ref.name, latest, versions, self._slots())

    def load(self, reference: str) -> tuple[AdapterKey, Tier]:
        """Prefetch a version into a device slot (waits for the host load on this thread)."""
        manager = self._manager
        key = manager.resolve(AdapterRef.parse(reference))
        if manager.kind(key) in ("prompt", "head"):  # no slot weights: verified and held on the host
            manager.verify(key)
            return key, Tier.HOST
        weights = manager.host_weights(key)
        return key, self._engine.run(lambda: manager.prefetch(key, weights))

    def pin(self, reference: str) -> AdapterKey:
        key, _ = self.load(reference)
        if not self._engine.run(lambda: self._manager.pin(key)):
            raise AdapterBusy(f"{key} was evicted before it could be pinned; try again")
        return key

    def unpin(self, reference: str) -> AdapterKey:
        key = self._manager.resolve(AdapterRef.parse(reference))
        self._engine.run(lambda: self._manager.unpin(key))
        return key

    def unload(self, reference: str) -> tuple[AdapterKey, bool]:
        key = self._manager.resolve(AdapterRef.parse(reference))
        freed = self._engine.run(lambda: self._manager.unload(key))
        return key, freed

    def refresh(self) -> RefreshResult:
        """Look for newly published versions now (the watcher also does this every poll interval)."""
        return self._manager.refresh()

    def _slots(self) -> dict[AdapterKey, SlotInfo]:
        """The device tier as the engine thread sees it between steps."""
        return self._engine.run(self._manager.slot_snapshot)

    def _view(
        self,
        tenant: str,
        name: str,
        latest: int | None,
        versions: tuple[int, ...],
        slots: Mapping[AdapterKey, SlotInfo],
    ) -> AdapterView:
        views = []
        for v in versions:
            key = AdapterKey(tenant, name, v)
            try:
                manifest = self._manager.manifest(key)
            except StoreUnavailable:
                raise
            except AdapterError as exc:  # one unreadable version (damaged, or a newer writer's fields)
                log.warning("listing %s: version %d left out, its manifest does not read: %s", key, v, exc)
                continue  # listing every other adapter failed with its error (an outside review)
            slot = slots.get(key)
            tier = Tier.DEVICE if slot is not None else Tier.HOST if self._manager.on_host(key) else Tier.STORE
            views.append(
                VersionView(
                    version=v,
                    manifest=manifest,
                    tier=tier,
                    pinned=bool(slot and slot.pinned),
                    active_requests=slot.leases if slot else 0,
                )
            )
        return AdapterView(tenant=tenant, name=name, latest=latest, versions=tuple(views))
