"""A server (the real engine on the tiny model) on an S3 store, with the store going away and coming back.

Warm adapters keep serving, cold ones fail with StoreUnavailable (UNAVAILABLE at the edges, one table
in edge/status.py), a new version published before the outage is not refused for it, and everything
recovers by itself once SeaweedFS is back on the same data directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from enginelib import generate, request, server_config, tiny_service
from seaweedlib import SeaweedFS

from lorafleet_adapters.backend import StoreSettings, open_store
from lorafleet_adapters.errors import StoreUnavailable
from lorafleet_adapters.s3_store import S3AdapterStore
from lorafleet_server.app import Service, build_service
from lorafleet_server.edge.status import status_for
from lorafleet_server.engine.versions import RefreshResult

pytestmark = pytest.mark.slow  # the tiny model per test, SeaweedFS stopped and started again

BUCKET = "serving"
PROMPT = "The capital of France is"
T = TypeVar("T")


@pytest.fixture
def seaweed(seaweed_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> SeaweedFS:
    """The module's SeaweedFS, running (a test that stopped it had it back on the same data), with
    its endpoint and credentials in the environment."""
    if seaweed_server.process is None:
        seaweed_server.restart()
    for name, value in seaweed_server.env().items():
        monkeypatch.setenv(name, value)
    return seaweed_server


@pytest.fixture
def url(seaweed: SeaweedFS, tmp_path: Path) -> str:
    return f"s3://{BUCKET}/{tmp_path.name}"  # each test its own prefix


@pytest.fixture
def service(url: str, tiny_model_dir: Path, tmp_path: Path) -> Iterator[Service]:
    svc = tiny_service(
        tiny_model_dir,
        tmp_path / "unused",
        adapter_store=url,
        adapter_cache_dir=tmp_path / "cache",
        adapter_poll_seconds=0.0,  # the test runs the watcher's passes itself (manager.refresh)
    )
    yield svc
    svc.engine.shutdown(10)


def served(svc: Service, adapter: str) -> tuple[str, list[int]]:
    sink = generate(svc.engine, request(PROMPT, adapter=adapter, max_new_tokens=4))
    return sink.summary.adapter, sink.token_ids


def eventually(call: Callable[[], T], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def test_store_down_warm_serves_cold_unavailable_then_recovers(
    seaweed: SeaweedFS, url: str, service: Service, peft_adapter: Any, tmp_path: Path
) -> None:
    assert isinstance(service.store, S3AdapterStore)
    spec = service.base.spec
    adapters = [peft_adapter(seed=300 + i, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]) for i in range(3)]
    service.store.import_peft(adapters[0], "acme", "warm", spec)
    service.store.import_peft(adapters[1], "acme", "cold", spec)
    warm = served(service, "acme/warm")
    assert warm[0] == "acme/warm@1"
    disk_loads = service.metrics.registry.get_sample_value("lorafleet_adapter_loads_total", {"tier": "disk"})
    assert disk_loads == 1  # downloaded once into the replica's disk cache
    # Another machine publishes version 2 of the warm adapter; this replica has not polled yet.
    publisher = open_store(StoreSettings(url, cache_dir=tmp_path / "publisher"))
    assert str(publisher.import_peft(adapters[2], "acme", "warm", spec)) == "acme/warm@2"

    seaweed.stop(grace=0)
    assert served(service, "acme/warm") == warm  # warm: keeps serving, same tokens
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{seaweed.ports['s3']}.*unreachable") as refused:
        served(service, "acme/cold")  # cold: refused at admission, with the store's own words
    assert status_for(refused.value) == grpc.StatusCode.UNAVAILABLE  # what a client sees

    def poll() -> RefreshResult:  # the poller's pass
        return service.engine.adapters.versions.refresh(full=False)

    result = poll()  # a poll during the outage: nothing swapped, nothing refused
    assert result.swaps == () and result.failures == ()

    seaweed.restart()
    assert eventually(lambda: served(service, "acme/cold"))[0] == "acme/cold@1"
    result = eventually(poll)
    assert [(s.adapter, s.from_version, s.to_version) for s in result.swaps] == [("acme/warm", 1, 2)]
    assert served(service, "acme/warm")[0] == "acme/warm@2"


def test_server_refuses_to_start_on_a_store_it_cannot_use(
    seaweed: SeaweedFS, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before loading the model: the store's own message, within seconds."""

    def start(**overrides: Any) -> None:
        build_service(server_config(model=tiny_model_dir, data_dir=tmp_path, **overrides))

    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="bucket 'missing-bucket' does not exist"):
        start(adapter_store="s3://missing-bucket/x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StoreUnavailable, match="access denied"):
        start(adapter_store=f"s3://{BUCKET}/x")
    seaweed.stop(grace=0)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        start(adapter_store=f"s3://{BUCKET}/x")
    assert time.monotonic() - started < 20


def test_a_version_the_replica_cannot_fetch_now_is_retried_not_refused(
    url: str, service: Service, peft_adapter: Any, tmp_path: Path
) -> None:
    """A poll that cannot fetch the new version (here: the replica's disk cache refuses it, as a
    full disk would) leaves the old one serving and tries again next pass; only a version that is
    itself bad is refused for good."""
    assert isinstance(service.store, S3AdapterStore)
    spec = service.base.spec
    adapters = [peft_adapter(seed=400 + i, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]) for i in range(2)]
    service.store.import_peft(adapters[0], "acme", "bot", spec)
    assert served(service, "acme/bot")[0] == "acme/bot@1"
    publisher = open_store(StoreSettings(url, cache_dir=tmp_path / "publisher"))
    new = publisher.import_peft(adapters[1], "acme", "bot", spec)
    blocker = service.store.cache.path(new)
    blocker.write_text("not a directory")  # the download cannot be installed
    poll = service.engine.adapters.versions.refresh  # the poller's pass: full=False
    result = poll(full=False)
    assert result.swaps == () and result.failures == ()
    assert served(service, "acme/bot")[0] == "acme/bot@1"
    blocker.unlink()
    result = poll(full=False)  # the publish marker is unchanged since the last poll: retried all the same
    assert [(s.adapter, s.to_version) for s in result.swaps] == [("acme/bot", 2)]
    assert served(service, "acme/bot")[0] == "acme/bot@2"
