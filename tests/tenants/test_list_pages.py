"""ListAdapters in pages over a real gRPC channel (tiny model): a store of thousands of versions did not
fit one response (each adapter carries every version's manifest), so the listing comes in pages of
``page_size`` adapters, continued by an opaque cursor; the Python clients read every page."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from enginelib import server_config

from lorafleet import AsyncLoraFleetClient, LoraFleetClient
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_proto.v1 import adapters_pb2, adapters_pb2_grpc
from lorafleet_server.app import build_service
from lorafleet_server.grpc.server import BackgroundServer
from lorafleet_server.tenants.keys import PepperSource, create_key

ACME = [f"acme/p{i}" for i in range(5)]
# More than a page of 100 (the Python clients' size), so "page_size 0 is everything" can be told apart.
ALL = sorted([*ACME, "beta/only", *(f"zed/z{i:03d}" for i in range(110))])


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    data = tmp_path_factory.mktemp("pages")
    keys_file = data / "keys.json"
    now = datetime.now(UTC)
    keys = {
        name: create_key(keys_file, PepperSource(keys_file), tenant=tenant, role=role, now=now).key
        for name, tenant, role in (("ops", "ops", "admin"), ("acme", "acme", "tenant"))
    }
    service = build_service(server_config(model=tiny_model_dir, data_dir=data, port=0, metrics_port=0, max_seq_len=256))
    spec = service.base.spec
    for ref in ALL:
        tenant, name = ref.split("/")
        service.store.publish_prompt(tenant, name, PromptTemplate(system=f"You are {name}."), spec)
    server = BackgroundServer(service)
    try:
        yield f"127.0.0.1:{server.start()}", keys
    finally:
        server.stop(drain_seconds=0)


def pages(target: str, key: str, size: int, tenant: str = "") -> list[tuple[list[str], str]]:
    """Every page of ListAdapters: (its adapters, its next_page_token)."""
    metadata = (("authorization", f"Bearer {key}"),)
    got: list[tuple[list[str], str]] = []
    with grpc.insecure_channel(target) as channel:
        stub = adapters_pb2_grpc.AdaptersServiceStub(channel)
        token = ""
        while True:
            request = adapters_pb2.ListAdaptersRequest(tenant=tenant, page_size=size, page_token=token)
            reply = stub.ListAdapters(request, metadata=metadata, timeout=30)
            got.append(([f"{a.tenant}/{a.name}" for a in reply.adapters], reply.next_page_token))
            token = reply.next_page_token
            if not token:
                return got


def test_pages_of_page_size_in_order_each_adapter_once(served: tuple[str, dict[str, str]]) -> None:
    target, keys = served
    got = pages(target, keys["ops"], 50)
    assert [names for names, _ in got] == [ALL[0:50], ALL[50:100], ALL[100:]]
    assert all(token for _, token in got[:-1]) and got[-1][1] == ""
    assert pages(target, keys["ops"], 0) == [(ALL, "")]  # 0: all in one, as a client from before pages asks
    assert pages(target, keys["ops"], 10**9) == [(ALL, "")]  # past the maximum: the maximum
    # a tenant key pages through its own adapters only, whatever tenant it names
    assert [n for names, _ in pages(target, keys["acme"], 2) for n in names] == ACME
    assert pages(target, keys["acme"], 2, tenant="beta") == [([], "")]


def test_a_page_token_the_server_did_not_issue_is_invalid_argument(served: tuple[str, dict[str, str]]) -> None:
    target, keys = served
    metadata = (("authorization", f"Bearer {keys['ops']}"),)
    with grpc.insecure_channel(target) as channel:
        stub = adapters_pb2_grpc.AdaptersServiceStub(channel)
        for token in ("not base64!", "bm8tc2xhc2g", "QUNNRS9Y"):  # garbage, "no-slash", "ACME/X"
            with pytest.raises(grpc.RpcError) as info:
                stub.ListAdapters(adapters_pb2.ListAdaptersRequest(page_token=token), metadata=metadata, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "page_token is not a next_page_token this server returned" in (info.value.details() or "")


def test_the_clients_read_every_page(served: tuple[str, dict[str, str]]) -> None:
    target, keys = served
    with LoraFleetClient(target, api_key=keys["ops"], timeout=30) as client:
        assert [a.ref for a in client.list_adapters(page_size=7)] == ALL
        assert [a.ref for a in client.list_adapters()] == ALL

    async def listed() -> list[str]:
        async with AsyncLoraFleetClient(target, api_key=keys["ops"], timeout=30) as client:
            return [a.ref for a in await client.list_adapters(page_size=7)]

    assert asyncio.run(listed()) == ALL
