"""Base refresh: `lorafleet retrain --stale` on a changed base publishes a head at least as good (served over
real gRPC), refuses one that got worse, and says why it skips what it cannot retrain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from classifierlib import labelled_rows, train_head, write_labelled
from enginelib import server_config
from modellib import copy_tokenizer
from transformers import AutoModelForCausalLM

from lorafleet import FailedPreconditionError, LoraFleetClient
from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.app import build_service
from lorafleet_server.cli import main
from lorafleet_server.grpc.server import BackgroundServer
from lorafleet_training.publish import publish


def derived_base(src: Path, out: Path, change: str) -> Path:
    """A second tiny base: ``nudged`` (every weight moved by a little noise: another fingerprint, the same
    quality) or ``collapsed`` (final norm zeroed: every input gets the same features)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        if change == "nudged":
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 1e-4)
        else:
            model.model.norm.weight.zero_()
    model.save_pretrained(out)
    copy_tokenizer(src, out)
    return out


def retrain(
    capsys: pytest.CaptureFixture[str], model: Path, data_dir: Path, store: Path, *extra: str
) -> tuple[int, str]:
    capsys.readouterr()
    code = main(
        ["retrain", "--stale", "--model", str(model), "--data-dir", str(data_dir), "--store", str(store), *extra]
    )
    return code, capsys.readouterr().out


def test_retrain_stale_head_on_a_new_base(
    tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    store = AdapterStore(tmp_path / "store")
    data = write_labelled(tmp_path / "intents.jsonl", labelled_rows(12))
    # The tiny random model's features tell identical texts apart, not meanings: the head is scored on
    # a held-out file of the training texts (a split keeps repeated texts on one side, so a split's
    # held-out texts are new to it and score at chance), replayed by the retrain like any --eval-data.
    heldout = write_labelled(tmp_path / "heldout.jsonl", labelled_rows(4))
    train_head(tiny_model_dir, tiny_spec, tmp_path / "v1", data, c=10.0, eval_data=heldout)
    assert publish(tmp_path / "v1", store, tiny_spec) == AdapterKey("acme", "intents", 1)
    old_f1 = store.manifest(AdapterKey("acme", "intents", 1)).eval_metrics["macro_f1"]
    assert old_f1 > 0.5  # well above chance (1/3), so a collapsed base can do worse
    train_head(tiny_model_dir, tiny_spec, tmp_path / "nodata", data, adapter="acme/private", keep_data_ref=False)
    publish(tmp_path / "nodata", store, tiny_spec)

    nudged = derived_base(tiny_model_dir, tmp_path / "nudged", "nudged")
    code, out = retrain(capsys, nudged, tmp_path / "d", store.root, "--dry-run")
    assert code == 1  # the head without a data reference cannot be retrained
    assert "acme/intents@1\tplanned" in out
    assert "acme/private@1\tskipped" in out and "--keep-data-ref" in out
    assert store.versions("acme", "intents") == (1,)  # a dry run trains and publishes nothing

    code, out = retrain(capsys, nudged, tmp_path / "d", store.root, "--tenant", "acme")
    assert "acme/intents@1\tpublished as acme/intents@2" in out, out
    new = store.manifest(AdapterKey("acme", "intents", 2))
    assert new.kind == "head" and new.eval_metrics["macro_f1"] >= old_f1
    assert new.base_fingerprint != store.manifest(AdapterKey("acme", "intents", 1)).base_fingerprint

    # the retrained version serves on the new base over gRPC; the old one is refused there
    config = server_config(
        model=nudged,
        data_dir=tmp_path / "serve",
        adapter_store=store.root,
        port=0,
        metrics_port=0,
        max_batch_size=4,
        max_seq_len=256,
        max_new_tokens=16,
        default_max_new_tokens=8,
        max_lora_rank=16,
    )
    service = build_service(config)
    server = BackgroundServer(service)
    port = server.start()
    try:
        with LoraFleetClient(f"127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_ready(30)
            answer = client.classify("Where is my parcel? The courier never came", adapter="acme/intents")
            assert answer.adapter == "acme/intents@2"
            with pytest.raises(FailedPreconditionError, match="retrain"):
                client.classify("hello", adapter="acme/intents@1")
    finally:
        server.stop()

    # a base on which the head got worse: refused, the latest stays where it was
    collapsed = derived_base(tiny_model_dir, tmp_path / "collapsed", "collapsed")
    code, out = retrain(capsys, collapsed, tmp_path / "d2", store.root)
    assert code == 1
    assert "acme/intents@2\trefused" in out and "got worse" in out, out
    assert store.versions("acme", "intents") == (1, 2)
    assert store.resolve(AdapterRef("acme", "intents")).version == 2
