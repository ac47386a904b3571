"""Hot swap over real gRPC: publishing a new version while streams run drops and mis-routes nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2elib import make_real_adapter

from lorafleet import LoraFleetClient, Message, Sampling
from lorafleet_server.app import Service, build_service
from lorafleet_server.config import ServerConfig
from lorafleet_server.grpc.server import BackgroundServer

POLL = 0.5
PROMPT = [Message("user", "Write a short story about a lighthouse keeper.")]
SAMPLING = Sampling(max_new_tokens=40)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("swap-adapters")
    return [
        make_real_adapter(
            default_model_dir,
            root / f"v{i}",
            10 + i,
            b_std=0.3,
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj"],
        )
        for i in range(3)
    ]


@pytest.fixture
def server(tmp_path: Path, default_model_dir: Path) -> Iterator[tuple[Service, LoraFleetClient]]:
    config = ServerConfig(
        model=default_model_dir,
        data_dir=tmp_path,
        port=0,
        metrics_port=0,
        max_batch_size=16,
        max_seq_len=256,
        max_new_tokens=64,
        max_loaded_adapters=4,
        max_lora_rank=16,
        adapter_poll_seconds=POLL,
    )
    service = build_service(config)
    bg = BackgroundServer(service)
    port = bg.start()
    with LoraFleetClient(f"127.0.0.1:{port}", timeout=180) as client:
        yield service, client
    bg.stop()


def _run_streams(
    client: LoraFleetClient, n: int, started: threading.Barrier
) -> tuple[list[threading.Thread], list[tuple[str, str] | Exception | None]]:
    results: list[tuple[str, str] | Exception | None] = [None] * n

    def one(i: int) -> None:
        try:
            stream = client.stream(messages=PROMPT, adapter="acme/bot", sampling=SAMPLING)
            chunks = iter(stream)
            first = next(chunks)
            started.wait(timeout=120)
            text = first + "".join(chunks)
            results[i] = (text, stream.result.adapter)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def _publish(service: Service, new_version: Path, corrupt: bool) -> None:
    """Publish the next version; when ``corrupt``, damage its weights after the checked publish."""
    service.store.import_peft(new_version, "acme", "bot", service.base.spec)
    if corrupt:
        latest = max(service.store.versions("acme", "bot"))
        vdir = service.store.root / "acme" / "bot" / "versions" / str(latest)
        data = (vdir / "adapter_model.safetensors").read_bytes()
        (vdir / "adapter_model.safetensors").write_bytes(data[:-128])


@pytest.mark.parametrize("corrupt", [False, True])
def test_publish_while_streams_run(
    server: tuple[Service, LoraFleetClient], versions: list[Path], corrupt: bool
) -> None:
    service, client = server
    service.store.import_peft(versions[0], "acme", "bot", service.base.spec)
    reference_v1 = client.generate(messages=PROMPT, adapter="acme/bot@1", sampling=SAMPLING).text
    assert client.generate(messages=PROMPT, adapter="acme/bot", sampling=SAMPLING).adapter == "acme/bot@1"

    n = 8
    started = threading.Barrier(n + 1)
    threads, results = _run_streams(client, n, started)
    started.wait(timeout=120)  # every stream has its first chunk: all were admitted on v1
    _publish(service, versions[1], corrupt)
    for t in threads:
        t.join(timeout=300)

    assert all(isinstance(r, tuple) for r in results), results  # zero failed RPCs
    for r in results:
        assert isinstance(r, tuple)
        text, adapter = r
        assert adapter == "acme/bot@1"
        assert text == reference_v1

    deadline = time.monotonic() + POLL * 10
    served = client.generate(messages=PROMPT, adapter="acme/bot", sampling=SAMPLING)
    want = "acme/bot@1" if corrupt else "acme/bot@2"
    while served.adapter != want and time.monotonic() < deadline:
        time.sleep(POLL / 5)
        served = client.generate(messages=PROMPT, adapter="acme/bot", sampling=Sampling(max_new_tokens=1))
    assert served.adapter == want
    if corrupt:
        time.sleep(POLL * 3)  # several polls later the broken version is still refused
        again = client.generate(messages=PROMPT, adapter="acme/bot", sampling=SAMPLING)
        assert again.adapter == "acme/bot@1" and again.text == reference_v1
        assert service.metrics.registry.get_sample_value("lorafleet_adapter_swap_failures_total") == 1
    else:
        reference_v2 = client.generate(messages=PROMPT, adapter="acme/bot@2", sampling=SAMPLING).text
        assert reference_v2 != reference_v1
        assert client.generate(messages=PROMPT, adapter="acme/bot", sampling=SAMPLING).text == reference_v2


def test_refresh_rpc_swaps_now(server: tuple[Service, LoraFleetClient], versions: list[Path]) -> None:
    service, client = server
    service.store.import_peft(versions[0], "acme", "bot", service.base.spec)
    assert client.generate("Hi", adapter="acme/bot", sampling=Sampling(max_new_tokens=1)).adapter == "acme/bot@1"
    service.store.import_peft(versions[2], "acme", "bot", service.base.spec)
    result = client.refresh_adapters()
    swaps = [(s.adapter, s.from_version, s.to_version) for s in result.swaps]
    assert swaps in ([("acme/bot", 1, 2)], [])  # [] only if the poller won the race
    assert client.generate("Hi", adapter="acme/bot", sampling=Sampling(max_new_tokens=1)).adapter == "acme/bot@2"
