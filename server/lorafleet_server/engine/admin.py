"""Adapter administration on a running server: views of the tiers, prefetch, pin, unload.

Slot changes run on the engine thread (``Engine.call``); host loads run on the caller's thread.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lorafleet_adapters.errors import AdapterNotFound, InvalidAdapterRef
from lorafleet_adapters.manifest import Manifest
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_server.engine.engine import Engine
from lorafleet_server.engine.versions import RefreshResult
from lorafleet_server.errors import AdapterBusy


class Tier(enum.Enum):
    STORE = "store"
    HOST = "host"
    DEVICE = "device"


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

    def list(self, tenant: str = "") -> list[AdapterView]:
        if tenant:
            AdapterRef.parse(f"{tenant}/x")  # validates the tenant name
        summaries = self._manager.store.list(tenant or None)
        return [self._view(s.tenant, s.name, s.latest, s.versions) for s in summaries]

    def get(self, reference: str) -> AdapterView:
        ref = AdapterRef.parse(reference)
        if ref.version is not None:
            raise InvalidAdapterRef("GetAdapter takes tenant/name without a version")
        versions = self._manager.store.versions(ref.tenant, ref.name)
        if not versions:
            raise AdapterNotFound(f"adapter {ref.tenant}/{ref.name} is not in the store")
        latest = self._manager.store.resolve(ref).version
        return self._view(ref.tenant, ref.name, latest, versions)

    def load(self, reference: str) -> tuple[AdapterKey, Tier]:
        """Prefetch a version into a device slot (waits for the host load)."""
        key = self._manager.resolve(AdapterRef.parse(reference))
        manager = self._manager
        if manager.kind(key) == "prompt":  # no weights: verified and held on the host
            manager.prompt(key)
            return key, Tier.HOST
        weights = manager.host_weights(key)

        def install() -> Tier:
            if manager.slots.install(key, weights) is None:
                raise AdapterBusy(f"every device slot is in use; {key} stays on the host tier")
            return Tier.DEVICE

        return key, self._engine.call(install).result()

    def pin(self, reference: str) -> AdapterKey:
        key, _ = self.load(reference)
        if not self._engine.call(lambda: self._manager.pin(key)).result():
            raise AdapterBusy(f"{key} was evicted before it could be pinned; try again")
        return key

    def unpin(self, reference: str) -> AdapterKey:
        key = self._manager.resolve(AdapterRef.parse(reference))
        self._engine.call(lambda: self._manager.unpin(key)).result()
        return key

    def unload(self, reference: str) -> tuple[AdapterKey, bool]:
        key = self._manager.resolve(AdapterRef.parse(reference))
        freed = self._engine.call(lambda: self._manager.unload(key)).result()
        return key, freed

    def refresh(self) -> RefreshResult:
        """Look for newly published versions now (the watcher also does this every poll interval)."""
        return self._manager.versions.refresh()

    def _view(self, tenant: str, name: str, latest: int | None, versions: tuple[int, ...]) -> AdapterView:
        slots = self._engine.call(self._manager.slots.snapshot).result()
        views = []
        for v in versions:
            key = AdapterKey(tenant, name, v)
            slot = slots.get(key)
            on_host = key in self._manager.host_cache
            tier = Tier.DEVICE if slot is not None else Tier.HOST if on_host else Tier.STORE
            views.append(
                VersionView(
                    version=v,
                    manifest=self._manager.store.manifest(key),
                    tier=tier,
                    pinned=bool(slot and slot.pinned),
                    active_requests=slot.leases if slot else 0,
                )
            )
        return AdapterView(tenant=tenant, name=name, latest=latest, versions=tuple(views))
