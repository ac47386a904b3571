"""`lorafleet retrain --stale` for LoRA adapters: the version keeps its training record, a stale LoRA is
trained again on the new base with the recorded method, hyperparameters and seed, published when its
held-out loss is not worse, refused when it is, and skipped (with the reason) when it cannot be retrained.
Run through the real CLI (``lorafleet_server.cli.main``), on a directory store and on an S3 bucket."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from modellib import copy_tokenizer
from seaweedlib import SeaweedFS
from training_testlib import qa_rows, write_jsonl
from transformers import AutoModelForCausalLM

from lorafleet_adapters.backend import StoreSettings, open_store
from lorafleet_adapters.manifest import sha256_file
from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_adapters.store import RETRAIN_RECORD_FILE, AdapterStore
from lorafleet_server.cli import main
from lorafleet_training.retrain import read_lora_record

TRAIN = ("--rank", "4", "--alpha", "8", "--epochs", "1", "--lr", "2e-2", "--batch-size", "4", "--seed", "3")
TRAIN_FAST = (*TRAIN, "--max-length", "64", "--val-fraction", "0.25", "--no-eval-generate", "--no-progress")


def derived_base(src: Path, out: Path, change: str) -> Path:
    """A second tiny base: ``nudged`` (the input embedding of the last token id, which the data never uses,
    moved: another fingerprint, the same model on this data) or ``collapsed`` (final norm zeroed: uniform
    next-token odds, whatever the adapter does)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        if change == "nudged":
            model.model.embed_tokens.weight[-1].add_(1e-3)
        else:
            model.model.norm.weight.zero_()
    model.save_pretrained(out)
    copy_tokenizer(src, out)
    return out


def train_colors(model_dir: Path, spec: BaseModelSpec, data: Path, out: Path) -> None:
    """A small LoRA "acme/colors" trained on ``data`` into ``out``, its data's location kept for retrain."""
    from lorafleet_training.trainer import TrainConfig, train

    config = TrainConfig(
        data=data,
        adapter="acme/colors",
        out_dir=out,
        base_model_dir=model_dir,
        rank=4,
        epochs=1,
        max_length=64,
        val_fraction=0.25,
        eval_generate=False,
        forgetting_check=False,
        keep_data_ref=True,
    )
    train(config, spec, progress=False, echo=lambda _: None)


def cli(capsys: pytest.CaptureFixture[str], model: Path, tmp_path: Path, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main([*args, "--model", str(model), "--data-dir", str(tmp_path / "serve")])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def train_and_publish(
    capsys: pytest.CaptureFixture[str],
    model: Path,
    tmp_path: Path,
    store: str,
    data: Path,
    adapter: str,
    *extra: str,
) -> None:
    out = tmp_path / adapter.replace("/", ".")
    code, text = cli(
        capsys,
        model,
        tmp_path,
        "train",
        "--data",
        str(data),
        "--adapter",
        adapter,
        "--out",
        str(out),
        *TRAIN_FAST,
        *extra,
    )
    assert code == 0, text
    code, text = cli(capsys, model, tmp_path, "publish", str(out), "--store", store, "--max-forgetting", "inf")
    assert code == 0, text


def test_retrain_stale_lora_on_a_new_base(
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_spec: BaseModelSpec,
    peft_adapter: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = AdapterStore(tmp_path / "store")
    root = str(store.root)
    data = write_jsonl(tmp_path / "colors.jsonl", qa_rows(8))
    train_and_publish(capsys, tiny_model_dir, tmp_path, root, data, "acme/colors", "--keep-data-ref")
    train_and_publish(capsys, tiny_model_dir, tmp_path, root, data, "acme/private")  # no --keep-data-ref
    changed = write_jsonl(tmp_path / "changed.jsonl", qa_rows(8))
    train_and_publish(capsys, tiny_model_dir, tmp_path, root, changed, "acme/changed", "--keep-data-ref")
    write_jsonl(changed, qa_rows(9))
    store.import_peft(peft_adapter(seed=7), "acme", "legacy", tiny_spec)  # a plain PEFT import: no record

    v1 = AdapterKey("acme", "colors", 1)
    old = store.manifest(v1)
    assert RETRAIN_RECORD_FILE in old.files  # checksummed like every file of the version
    record = read_lora_record(store, v1, old)
    assert record is not None and record["data"]["path"] == str(data.resolve())
    assert record["hyperparameters"]["seed"] == 3 and "samples" not in record  # no held-out texts
    private = AdapterKey("acme", "private", 1)
    private_record = read_lora_record(store, private, store.manifest(private))
    assert private_record is not None and private_record["data"]["path"] is None  # the location was not allowed
    old_loss = old.eval_metrics["adapter_loss"]
    assert old_loss < old.eval_metrics["base_loss"]  # it learned: a collapsed base can only do worse

    nudged = derived_base(tiny_model_dir, tmp_path / "nudged", "nudged")
    code, out = cli(capsys, nudged, tmp_path, "retrain", "--stale", "--dry-run", "--store", root)
    assert code == 1, out  # three cannot be retrained
    assert "acme/colors@1\tplanned" in out and "(lora)" in out, out
    assert "acme/private@1\tskipped" in out and "--keep-data-ref" in out
    assert "acme/changed@1\tskipped" in out and "changed since training" in out
    assert "acme/legacy@1\tskipped" in out and "no training record" in out
    assert store.versions("acme", "colors") == (1,)  # a dry run trains and publishes nothing

    code, out = cli(capsys, nudged, tmp_path, "retrain", "--stale", "--store", root, "--max-forgetting", "inf")
    assert "acme/colors@1\tpublished as acme/colors@2 (adapter_loss" in out, out
    new = store.manifest(AdapterKey("acme", "colors", 2))
    assert new.kind == "lora" and new.method == "lora" and (new.rank, new.target_modules) == (4, ("q_proj", "v_proj"))
    assert new.base_fingerprint != old.base_fingerprint
    assert new.training_data_fingerprint == old.training_data_fingerprint
    assert new.eval_metrics["adapter_loss"] <= old_loss
    again = read_lora_record(store, AdapterKey("acme", "colors", 2), new)
    assert again is not None and again["data"]["eval_fingerprint"] == record["data"]["eval_fingerprint"]
    assert again["data"]["path"] == str(data.resolve())  # retrainable again on the next base
    assert store.versions("acme", "private") == (1,) and store.versions("acme", "legacy") == (1,)

    # a base on which the adapter got worse: refused with both numbers, the latest stays where it was
    collapsed = derived_base(tiny_model_dir, tmp_path / "collapsed", "collapsed")
    code, out = cli(capsys, collapsed, tmp_path, "retrain", "--stale", "--tenant", "acme", "--store", root)
    assert code == 1
    line = next(x for x in out.splitlines() if x.startswith("acme/colors@2\t"))
    assert "\trefused (adapter_loss" in line and "got worse" in line, out
    assert store.versions("acme", "colors") == (1, 2)
    assert store.resolve(AdapterRef("acme", "colors")).version == 2


def test_a_tampered_record_is_not_trusted(tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec) -> None:
    """The record is a checksummed file of the version: edited in place, retrain refuses to read it."""
    from lorafleet_training.publish import publish
    from lorafleet_training.retrain import retrain_stale

    train_colors(tiny_model_dir, tiny_spec, write_jsonl(tmp_path / "colors.jsonl", qa_rows(4)), tmp_path / "out")
    store = AdapterStore(tmp_path / "store")
    key = publish(tmp_path / "out", store, tiny_spec)
    path = store.version_dir(key) / RETRAIN_RECORD_FILE
    assert sha256_file(path) == store.manifest(key).files[RETRAIN_RECORD_FILE]
    record = json.loads(path.read_text())
    record["hyperparameters"]["epochs"] = 50
    path.chmod(0o644)
    path.write_text(json.dumps(record))
    other = dataclasses.replace(tiny_spec, fingerprint="sha256:" + "2" * 64)
    [outcome] = retrain_stale(store, other, tiny_model_dir, dry_run=True)
    assert outcome.status == "skipped" and "checksum mismatch" in outcome.reason


BUCKET = "retrain"


def test_retrain_with_the_store_as_an_s3_url(
    tmp_path: Path,
    tiny_model_dir: Path,
    seaweed_server: SeaweedFS,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in seaweed_server.env().items():
        monkeypatch.setenv(name, value)
    url = f"s3://{BUCKET}/{tmp_path.name}"
    data = write_jsonl(tmp_path / "colors.jsonl", qa_rows(8))
    train_and_publish(capsys, tiny_model_dir, tmp_path, url, data, "acme/colors", "--keep-data-ref")
    nudged = derived_base(tiny_model_dir, tmp_path / "nudged", "nudged")
    code, out = cli(capsys, nudged, tmp_path, "retrain", "--stale", "--store", url, "--max-forgetting", "inf")
    assert code == 0 and "acme/colors@1\tpublished as acme/colors@2" in out, out
    replica = open_store(StoreSettings(url, cache_dir=tmp_path / "replica"))
    new = replica.manifest(AdapterKey("acme", "colors", 2))
    assert (
        RETRAIN_RECORD_FILE in new.files
        and new.base_fingerprint != replica.manifest(AdapterKey("acme", "colors", 1)).base_fingerprint
    )
    record = read_lora_record(replica, AdapterKey("acme", "colors", 2), new)
    assert record is not None and record["data"]["fingerprint"] == new.training_data_fingerprint


def test_a_version_published_while_retraining_is_not_buried(
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_spec: BaseModelSpec,
    peft_adapter: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stale list is read before training: an operator's v2 published meanwhile (perhaps already on
    the new base) was buried under v3, a retrained copy of v1 (an outside review's repro)."""
    import lorafleet_training.trainer as trainer_mod

    store = AdapterStore(tmp_path / "store")
    data = write_jsonl(tmp_path / "colors.jsonl", qa_rows(8))
    train_and_publish(capsys, tiny_model_dir, tmp_path, str(store.root), data, "acme/colors", "--keep-data-ref")
    nudged = derived_base(tiny_model_dir, tmp_path / "nudged", "nudged")
    real_train = trainer_mod.train

    def train_while_someone_publishes(*args: Any, **kwargs: Any) -> Any:
        result = real_train(*args, **kwargs)
        store.import_peft(peft_adapter(seed=9), "acme", "colors", tiny_spec)  # v2, by someone else
        return result

    monkeypatch.setattr(trainer_mod, "train", train_while_someone_publishes)
    code, out = cli(
        capsys, nudged, tmp_path, "retrain", "--stale", "--store", str(store.root), "--max-forgetting", "inf"
    )
    assert code == 1, out
    assert "acme/colors@1\trefused" in out and "acme/colors@2 was published while acme/colors@1 was retrained" in out
    assert store.versions("acme", "colors") == (1, 2)


def test_an_unexpected_error_fails_one_adapter_not_the_fleet(
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_spec: BaseModelSpec,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Only AdapterError/ValueError/TypeError were caught per adapter: any other exception (a KeyError in
    a record, an OSError, a bug) stopped `retrain --stale` at that adapter, with no line for the others
    and no summary. It is that adapter's "retraining failed"; the others go on; the exit code is 1."""
    import argparse

    from classifierlib import labelled_rows, train_head, write_labelled

    import lorafleet_training.classifier as classifier_mod
    import lorafleet_training.retrain as retrain_mod
    import lorafleet_training.trainer as trainer_mod
    from lorafleet_training.cli import add_retrain_arguments, run_retrain
    from lorafleet_training.publish import publish

    store = AdapterStore(tmp_path / "store")
    labelled = write_labelled(tmp_path / "intents.jsonl", labelled_rows(6))
    for name in ("a", "b"):
        train_head(tiny_model_dir, tiny_spec, tmp_path / name, labelled, adapter=f"acme/{name}")
        publish(tmp_path / name, store, tiny_spec)
    train_colors(tiny_model_dir, tiny_spec, write_jsonl(tmp_path / "colors.jsonl", qa_rows(4)), tmp_path / "colors")
    publish(tmp_path / "colors", store, tiny_spec)
    new_base = dataclasses.replace(tiny_spec, fingerprint="sha256:" + "3" * 64)
    real_train_classifier = classifier_mod.train_classifier

    def head_training_that_breaks_for_a(config: Any, *args: Any, **kwargs: Any) -> Any:
        if config.adapter == "acme/a":
            raise RuntimeError("the features pass ran out of disk")
        return real_train_classifier(config, *args, **kwargs)

    def lora_training_that_breaks(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("hyperparameters")

    monkeypatch.setattr(classifier_mod, "train_classifier", head_training_that_breaks_for_a)
    monkeypatch.setattr(trainer_mod, "train", lora_training_that_breaks)
    parser = argparse.ArgumentParser()
    add_retrain_arguments(parser)
    capsys.readouterr()
    code = run_retrain(parser.parse_args(["--stale"]), store, new_base, tiny_model_dir)
    captured = capsys.readouterr()
    lines = {line.split("\t")[0]: line for line in captured.out.splitlines()}
    assert code == 1, captured
    assert "\trefused: retraining failed: RuntimeError: the features pass ran out of disk" in lines["acme/a@1"]
    assert "\tpublished as acme/b@2" in lines["acme/b@1"]  # after a's failure, b still retrained
    assert "\trefused: retraining failed: KeyError: 'hyperparameters'" in lines["acme/colors@1"]
    assert "3 stale adapter(s)" in captured.err and "1 published, 2 not" in captured.err

    # an unexpected error while planning (reading the record) fails that adapter too, even in a dry run
    real_read = retrain_mod.read_head_record

    def unreadable_a(store: Any, key: AdapterKey) -> Any:
        if key.name == "a":
            raise OSError(5, "Input/output error")
        return real_read(store, key)

    monkeypatch.setattr(retrain_mod, "read_head_record", unreadable_a)
    outcomes = {str(o.old): o for o in retrain_mod.retrain_stale(store, new_base, tiny_model_dir, dry_run=True)}
    assert outcomes["acme/a@1"].status == "refused" and "OSError" in outcomes["acme/a@1"].reason
    assert outcomes["acme/colors@1"].status == "planned"


def test_a_head_is_not_compared_on_another_held_out_split(
    tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The split rule changed (same-text groups across labels, no overshoot): a head trained before would
    be split differently now, and its macro-F1 compared with one measured on other examples."""
    from classifierlib import labelled_rows, train_head, write_labelled

    import lorafleet_training.classifier as classifier_mod
    import lorafleet_training.retrain as retrain_mod
    from lorafleet_training.publish import publish

    store = AdapterStore(tmp_path / "store")
    labelled = write_labelled(tmp_path / "intents.jsonl", labelled_rows(6))
    trained = train_head(tiny_model_dir, tiny_spec, tmp_path / "h", labelled, adapter="acme/h")
    assert trained.record["data"]["split_fingerprint"]
    publish(tmp_path / "h", store, tiny_spec)
    real_split = classifier_mod.stratified_split

    def another_split(examples: Any, val_fraction: float, seed: int) -> Any:
        return real_split(examples, val_fraction, seed + 1)

    monkeypatch.setattr(classifier_mod, "stratified_split", another_split)
    new_base = dataclasses.replace(tiny_spec, fingerprint="sha256:" + "4" * 64)
    [outcome] = retrain_mod.retrain_stale(store, new_base, tiny_model_dir)
    assert outcome.status == "refused" and "held-out split differs" in outcome.reason
    assert store.resolve(AdapterRef("acme", "h")) == AdapterKey("acme", "h", 1)
