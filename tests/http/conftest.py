"""Fixtures of the HTTP API tests: a tiny-model server with API keys (unit level), and the real default
model behind both edges (e2e, the ``live`` server of tests/e2e with the HTTP API started next to it)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from enginelib import server_config
from httplib import TinyHttp, new_key

from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_server.app import build_service
from lorafleet_server.grpc.server import server_keys
from lorafleet_server.http.server import BackgroundHttpServer

# The e2e fixtures (a real gRPC server on the real default model, real adapters) are imported, not copied.
_E2E = Path(__file__).resolve().parents[1] / "e2e"
sys.path.insert(0, str(_E2E))
_spec = importlib.util.spec_from_file_location("e2e_conftest", _E2E / "conftest.py")
assert _spec is not None and _spec.loader is not None
_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_e2e)
live = _e2e.live
real_adapters = _e2e.real_adapters


@pytest.fixture(scope="module")
def tiny_http(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, peft_adapter: Any) -> Iterator[TinyHttp]:
    """The HTTP API alone on a tiny random model, with keys: acme and beta (tenants), ops (admin), and
    tight (tenant, one running request and at most one waiting for a row)."""
    data = tmp_path_factory.mktemp("http-tiny")
    keys_file = data / "keys.json"
    keys = {
        "acme": new_key(keys_file, "acme", "tenant"),
        "beta": new_key(keys_file, "beta", "tenant"),
        "ops": new_key(keys_file, "ops", "admin"),
        "tight": new_key(keys_file, "tight", "tenant", max_waiting=1, max_running=1),
    }
    config = server_config(
        model=tiny_model_dir,
        data_dir=data,
        port=0,
        metrics_port=0,
        max_batch_size=4,
        max_seq_len=256,
        max_new_tokens=200,
        default_max_new_tokens=8,
        max_loaded_adapters=4,
        max_lora_rank=32,
        max_message_bytes=1 << 20,
        keys_poll_seconds=0.2,
        adapter_poll_seconds=0,
    )
    service = build_service(config)
    spec = service.base.spec
    service.store.import_peft(peft_adapter(seed=3), "acme", "support", spec)
    service.store.publish_prompt("beta", "secret", PromptTemplate(system="You answer for Beta."), spec)
    service.engine.start()
    server_keys_ = server_keys(config)
    server_keys_.start(config.keys_poll_seconds)
    server = BackgroundHttpServer(service, server_keys_)
    server.start()
    try:
        yield TinyHttp(service, server.url, keys)
    finally:
        server.stop()
        service.engine.shutdown(0.0)
        server_keys_.stop()
