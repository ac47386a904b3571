"""Classify over real gRPC with the real default model: a published head, hot swap, wrong adapter kinds, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from classifierlib import labelled_rows, train_head, write_labelled
from e2elib import wait_until
from enginelib import server_config

from lorafleet import FailedPreconditionError, InvalidArgumentError, LoraFleetClient, Message
from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_server.app import Service, build_service
from lorafleet_server.grpc.server import BackgroundServer
from lorafleet_training.publish import publish

POLL = 0.5


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> dict[str, Path]:
    """Two trained head outputs on the real base: intents, and the same data with upper-case labels."""
    from lorafleet_server.model.loader import base_spec_from_files

    spec: BaseModelSpec = base_spec_from_files(default_model_dir, "none", max_lora_rank=16)
    root = tmp_path_factory.mktemp("e2e-heads")
    rows = labelled_rows(6)
    upper = [{**row, "label": row["label"].upper()} for row in rows]
    train_head(default_model_dir, spec, root / "v1", write_labelled(root / "v1.jsonl", rows))
    train_head(default_model_dir, spec, root / "v2", write_labelled(root / "v2.jsonl", upper))
    return {"v1": root / "v1", "v2": root / "v2"}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path, real_adapters: dict[str, Path]
) -> Iterator[tuple[Service, LoraFleetClient, int]]:
    config = server_config(
        model=default_model_dir,
        data_dir=tmp_path_factory.mktemp("classify-data"),
        port=0,
        metrics_port=0,
        max_batch_size=8,
        max_seq_len=256,
        max_new_tokens=32,
        default_max_new_tokens=8,
        max_loaded_adapters=4,
        max_lora_rank=16,
        adapter_poll_seconds=POLL,
    )
    service = build_service(config)
    service.store.import_peft(real_adapters["support"], "acme", "support", service.base.spec)
    bg = BackgroundServer(service)
    port = bg.start()
    with LoraFleetClient(f"127.0.0.1:{port}", timeout=120) as client:
        client.wait_for_ready(30)
        yield service, client, port
    bg.stop()


def test_classify_hot_swap_and_wrong_kinds(
    server: tuple[Service, LoraFleetClient, int], heads: dict[str, Path]
) -> None:
    service, client, _ = server
    spec = service.base.spec
    publish(heads["v1"], service.store, spec)

    result = client.classify("I was charged twice, I need a refund for this invoice", adapter="acme/intents")
    assert result.adapter == "acme/intents@1"
    assert [s.label for s in result.labels] != [] and {s.label for s in result.labels} == {
        "account",
        "billing",
        "shipping",
    }
    assert sum(s.probability for s in result.labels) == pytest.approx(1.0, abs=1e-4)
    assert result.label == "billing"
    top = client.classify(messages=[Message("user", "my parcel never arrived")], adapter="acme/intents", top_k=1)
    assert len(top.labels) == 1

    # hot swap: a new version is picked up by the watcher; requests then get its labels
    publish(heads["v2"], service.store, spec)
    wait_until(
        lambda: client.classify("hello", adapter="acme/intents").adapter == "acme/intents@2", 30, "the swap to v2"
    )
    swapped = client.classify("I was charged twice, I need a refund for this invoice", adapter="acme/intents")
    assert swapped.label == "BILLING"
    pinned = client.classify("hello", adapter="acme/intents@1")  # an explicit version still answers
    assert pinned.adapter == "acme/intents@1"

    # wrong kinds, both ways, name the kind
    with pytest.raises(FailedPreconditionError, match="kind 'head'"):
        client.generate("hello", adapter="acme/intents")
    with pytest.raises(FailedPreconditionError, match="kind 'head'"):
        client.embed("hello", adapter="acme/intents")
    with pytest.raises(FailedPreconditionError, match="kind 'lora'"):
        client.classify("hello", adapter="acme/support")
    with pytest.raises(InvalidArgumentError, match="head adapter"):
        client.classify("hello", adapter="")
    # the LoRA still generates: the refusals left the server healthy
    assert client.generate("hello", adapter="acme/support").text is not None


def test_cli_classify(server: tuple[Service, LoraFleetClient, int], heads: dict[str, Path]) -> None:
    service, _, port = server
    if not service.store.versions("acme", "intents"):
        publish(heads["v1"], service.store, service.base.spec)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafleet",
            "classify",
            "where is my parcel",
            "--adapter",
            "acme/intents@1",
            "--top-k",
            "2",
            "--target",
            f"127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    answer: dict[str, Any] = json.loads(out.stdout)
    assert answer["adapter"] == "acme/intents@1" and len(answer["labels"]) == 2
    assert answer["label"] == answer["labels"][0]["label"]
