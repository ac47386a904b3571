"""`retrain --stale` planning: which stale adapters it would retrain, and why it skips the others."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from classifierlib import labelled_rows, train_head, write_labelled

from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_adapters.store import AdapterStore
from lorafleet_training.publish import publish
from lorafleet_training.retrain import retrain_stale


def test_dry_run_reasons(tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec, peft_adapter: object) -> None:
    store = AdapterStore(tmp_path / "store")
    rows = labelled_rows(6)
    for name in ("ok", "changed", "missing"):
        data = write_labelled(tmp_path / f"{name}.jsonl", rows)
        train_head(tiny_model_dir, tiny_spec, tmp_path / name, data, adapter=f"acme/{name}")
        publish(tmp_path / name, store, tiny_spec)
    write_labelled(tmp_path / "changed.jsonl", [*rows, {"text": "one more", "label": "billing"}])
    (tmp_path / "missing.jsonl").unlink()
    store.publish_prompt("acme", "terse", PromptTemplate(system="Be terse."), tiny_spec)
    lora = peft_adapter(seed=3)  # type: ignore[operator]
    store.import_peft(lora, "acme", "support", tiny_spec)

    assert retrain_stale(store, tiny_spec, tiny_model_dir, dry_run=True) == []  # nothing is stale on this base
    new_base = dataclasses.replace(tiny_spec, fingerprint="sha256:" + "1" * 64)
    outcomes = {str(o.old): o for o in retrain_stale(store, new_base, tiny_model_dir, dry_run=True, tenant="acme")}
    assert outcomes["acme/ok@1"].status == "planned"
    assert (
        outcomes["acme/changed@1"].status == "skipped" and "changed since training" in outcomes["acme/changed@1"].reason
    )
    assert outcomes["acme/missing@1"].status == "skipped" and "not reachable" in outcomes["acme/missing@1"].reason
    assert outcomes["acme/terse@1"].status == "skipped" and "nothing to train" in outcomes["acme/terse@1"].reason
    assert outcomes["acme/support@1"].status == "skipped" and "training record" in outcomes["acme/support@1"].reason
    assert store.versions("acme", "ok") == (1,)
