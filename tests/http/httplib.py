"""Helpers of the HTTP API tests (fixtures live in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lorafleet_server.app import Service
from lorafleet_server.tenants.keys import PepperSource, create_key


@dataclass
class TinyHttp:
    service: Service
    url: str
    keys: dict[str, str]  # name -> key text

    @property
    def model_id(self) -> str:
        return self.service.info.model_id

    def metric(self, name: str, **labels: str) -> float:
        return self.service.metrics.registry.get_sample_value(name, labels or None) or 0.0


def new_key(path: Path, tenant: str, role: str, **kwargs: Any) -> str:
    return create_key(path, PepperSource(path), tenant=tenant, role=role, now=datetime.now(UTC), **kwargs).key  # type: ignore[arg-type]
