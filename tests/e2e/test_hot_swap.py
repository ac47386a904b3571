"""Hot swap over real gRPC: publishing a new version while streams run drops and mis-routes nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from e2elib import make_real_adapter, start_queued
from enginelib import engine_held, server_config

from lorafleet import LoraFleetClient, Message, Sampling
from lorafleet_server.app import Service, build_service
from lorafleet_server.grpc.server import BackgroundServer
from lorafleet_server.model.runner import RowStep

POLL = 0.5
PROMPT = [Message("user", "Write a short story about a lighthouse keeper.")]
SAMPLING = Sampling(max_new_tokens=24)


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
    config = server_config(
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


def _stream(client: LoraFleetClient) -> tuple[str, str]:
    stream = client.stream(messages=PROMPT, adapter="acme/bot", sampling=SAMPLING)
    text = "".join(stream)
    return text, stream.result.adapter


class StepHold:
    """Stops the engine thread after the first step in which ``rows`` requests all decode, until released.

    At that point every one of them has produced a token and none can have finished (each needs more
    steps than that), so whatever the test does meanwhile happens while all of them are mid-stream.
    """

    def __init__(self, service: Service, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached = threading.Event()
        self._resume = threading.Event()
        original = service.engine.runner.step

        def step(plan: list[RowStep], **options: Any) -> Any:
            out = original(plan, **options)
            if not self.reached.is_set() and len(plan) == rows and all(len(r.token_ids) == 1 for r in plan):
                self.reached.set()
                assert self._resume.wait(120), "never released"
            return out

        monkeypatch.setattr(service.engine.runner, "step", step)

    def release(self) -> None:
        self._resume.set()


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
    server: tuple[Service, LoraFleetClient], versions: list[Path], corrupt: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, client = server
    service.store.import_peft(versions[0], "acme", "bot", service.base.spec)
    reference_v1 = client.generate(messages=PROMPT, adapter="acme/bot@1", sampling=SAMPLING).text
    assert client.generate(messages=PROMPT, adapter="acme/bot", sampling=Sampling(max_new_tokens=1)).adapter == (
        "acme/bot@1"
    )

    n = 8
    hold = StepHold(service, n, monkeypatch)
    with engine_held(service.engine):  # all n start together, in one step
        streams = start_queued(service, [partial(_stream, client)] * n)
        assert service.engine.load_stats() == (0, n)
    try:
        assert hold.reached.wait(120), "the streams never decoded together"
        # Every stream has a token and none has finished: all n run, on v1, while the new version
        # is published and the watcher's pass swaps to it (or refuses it).
        assert service.engine.load_stats() == (n, 0)
        assert not any(f.done() for f in streams)
        _publish(service, versions[1], corrupt)
        service.engine.adapters.versions.refresh()  # the poller's pass, now (a pass it ran meanwhile counts too)
        assert service.engine.adapters.versions.serving()["acme/bot"] == (1 if corrupt else 2)
        failures = service.metrics.registry.get_sample_value("lorafleet_adapter_swap_failures_total")
        swaps = service.metrics.registry.get_sample_value("lorafleet_adapter_swaps_total")
        assert (swaps, failures) == ((0, 1) if corrupt else (1, 0))
        assert service.engine.load_stats() == (n, 0) and not any(f.done() for f in streams)
    finally:
        hold.release()
    # Zero failed RPCs, each served by the version it was admitted on, with that version's text.
    assert [f.result(timeout=300) for f in streams] == [(reference_v1, "acme/bot@1")] * n

    served = client.generate(messages=PROMPT, adapter="acme/bot", sampling=SAMPLING)
    if corrupt:
        assert served.adapter == "acme/bot@1" and served.text == reference_v1
        for _ in range(3):  # later passes do not retry (nor count again) the broken version
            assert service.engine.adapters.versions.refresh().failures == ()
        assert service.metrics.registry.get_sample_value("lorafleet_adapter_swap_failures_total") == 1
        assert client.generate(messages=PROMPT, adapter="acme/bot", sampling=Sampling(max_new_tokens=1)).adapter == (
            "acme/bot@1"
        )
    else:
        assert served.adapter == "acme/bot@2"
        reference_v2 = client.generate(messages=PROMPT, adapter="acme/bot@2", sampling=SAMPLING).text
        assert reference_v2 != reference_v1 and served.text == reference_v2


def test_refresh_rpc_swaps_now(server: tuple[Service, LoraFleetClient], versions: list[Path]) -> None:
    service, client = server
    service.engine.adapters.versions.stop()  # no poller: the RPC's pass is the only one
    service.store.import_peft(versions[0], "acme", "bot", service.base.spec)
    assert client.generate("Hi", adapter="acme/bot", sampling=Sampling(max_new_tokens=1)).adapter == "acme/bot@1"
    service.store.import_peft(versions[2], "acme", "bot", service.base.spec)
    assert client.generate("Hi", adapter="acme/bot", sampling=Sampling(max_new_tokens=1)).adapter == "acme/bot@1"
    result = client.refresh_adapters()
    assert [(s.adapter, s.from_version, s.to_version) for s in result.swaps] == [("acme/bot", 1, 2)]
    assert list(result.failures) == []
    assert list(client.refresh_adapters().swaps) == []  # nothing newer: a second pass changes nothing
    assert client.generate("Hi", adapter="acme/bot", sampling=Sampling(max_new_tokens=1)).adapter == "acme/bot@2"
