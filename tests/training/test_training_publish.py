from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from lorafleet_adapters.errors import AdapterFormatError, AdapterIncompatible
from lorafleet_adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, BaseModelSpec
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_training.errors import PiiFound
from lorafleet_training.publish import RECORD_FILE, NoImprovement, publish, publish_prompt, stale
from lorafleet_training.retrain import stale_latest

OTHER_BASE = "sha256:" + "0" * 64


def _copy(trained: Any, dst: Path) -> Path:
    return Path(shutil.copytree(trained.out_dir, dst))


def test_publish_writes_the_manifest_from_the_training_record(
    trained: Any, tmp_path: Path, tiny_spec: BaseModelSpec
) -> None:
    store = AdapterStore(tmp_path / "store")
    key = publish(trained.out_dir, store, tiny_spec, require_improvement=True)
    assert key == AdapterKey("acme", "colors", 1)
    manifest = store.manifest(key)
    record = trained.record
    assert manifest.kind == "lora" and manifest.method == "lora"
    assert manifest.base_fingerprint == tiny_spec.fingerprint
    assert (manifest.rank, manifest.lora_alpha, manifest.target_modules) == (4, 8.0, ("q_proj", "v_proj"))
    assert manifest.training_data_fingerprint == record["data"]["fingerprint"]
    assert dict(manifest.eval_metrics) == record["eval_metrics"]
    assert manifest.pii_scan is not None and manifest.pii_scan["mode"] == "refuse"
    assert {k: v for k, v in manifest.files.items() if k in record["files"]} == record["files"]
    weights = store.load(key, tiny_spec)  # the serving path accepts it
    assert weights.rank == 4 and len(weights.modules) == 4  # q_proj and v_proj of 2 layers
    assert publish(trained.out_dir, store, tiny_spec, adapter="acme/colors-b") == AdapterKey("acme", "colors-b", 1)
    assert store.resolve(AdapterRef("acme", "colors")) == key


def test_publish_refuses_an_adapter_trained_on_another_base(
    trained: Any, tmp_path: Path, tiny_spec: BaseModelSpec
) -> None:
    store = AdapterStore(tmp_path / "store")
    other = dataclasses.replace(tiny_spec, fingerprint=OTHER_BASE)
    with pytest.raises(AdapterIncompatible) as info:
        publish(trained.out_dir, store, other)
    assert tiny_spec.fingerprint in str(info.value) and OTHER_BASE in str(info.value)
    assert not (tmp_path / "store").exists() or store.list() == []


def test_require_improvement_refuses_a_worse_adapter(trained: Any, tmp_path: Path, tiny_spec: BaseModelSpec) -> None:
    out = _copy(trained, tmp_path / "worse")
    record = json.loads((out / RECORD_FILE).read_text())
    record["eval_metrics"]["adapter_loss"] = record["eval_metrics"]["base_loss"] + 0.5
    (out / RECORD_FILE).write_text(json.dumps(record))
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(NoImprovement, match="not below the base's"):
        publish(out, store, tiny_spec, require_improvement=True)
    del record["eval_metrics"]["base_loss"]
    (out / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(NoImprovement, match="no held-out losses"):
        publish(out, store, tiny_spec, require_improvement=True)
    assert publish(out, store, tiny_spec).version == 1  # without the flag it is the user's call


def test_publish_checks_the_recorded_checksums(trained: Any, tmp_path: Path, tiny_spec: BaseModelSpec) -> None:
    out = _copy(trained, tmp_path / "tampered")
    config = json.loads((out / CONFIG_FILE).read_text())
    config["lora_alpha"] = 64
    (out / CONFIG_FILE).write_text(json.dumps(config))
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(AdapterFormatError, match=f"{CONFIG_FILE}: sha256 .* differs"):
        publish(out, store, tiny_spec)
    (out / WEIGHTS_FILE).unlink()
    shutil.copy(trained.out_dir / CONFIG_FILE, out / CONFIG_FILE)
    with pytest.raises(AdapterFormatError, match="missing"):
        publish(out, store, tiny_spec)
    (out / RECORD_FILE).unlink()
    with pytest.raises(AdapterFormatError, match="not a `lorafleet train` output"):
        publish(out, store, tiny_spec)
    assert not (tmp_path / "store").exists()  # refused before the store was touched


def test_stale_lists_versions_built_for_another_base(trained: Any, tmp_path: Path, tiny_spec: BaseModelSpec) -> None:
    store = AdapterStore(tmp_path / "store")
    key = publish(trained.out_dir, store, tiny_spec)
    assert stale(store, tiny_spec) == ([], [])
    refreshed = dataclasses.replace(tiny_spec, fingerprint=OTHER_BASE)
    assert stale(store, refreshed) == ([(key, f"base {tiny_spec.fingerprint}")], [])
    # the same weights under another tokenizer or chat template: stale too, and retrain --stale sees it
    assert tiny_spec.prompt_format  # the tiny model has the real tokenizer files
    retemplated = dataclasses.replace(tiny_spec, prompt_format="sha256:" + "9" * 64)
    expected = f"prompt format {tiny_spec.prompt_format} (this base: {retemplated.prompt_format})"
    assert stale(store, retemplated) == ([(key, expected)], [])
    assert stale_latest(store, retemplated, None) == ([(key, store.manifest(key))], [])
    assert stale_latest(store, tiny_spec, None) == ([], [])
    # a manifest that cannot be read is reported, not fatal to the rest
    manifest_text = (store.version_dir(key) / "manifest.json").read_text()
    (store.version_dir(key) / "manifest.json").write_text("{")
    stale_now, unreadable = stale_latest(store, retemplated, None)
    assert stale_now == [] and [k for k, _ in unreadable] == [key]
    # `adapters stale` said nothing and exited 0, as for a store with nothing stale
    listed, unread = stale(store, retemplated)
    assert listed == [] and [k for k, _ in unread] == [key]
    # a damaged `latest` pointer: reported (retrain --stale exits 1), not passed over (it exited 0)
    (store.version_dir(key) / "manifest.json").write_text(manifest_text)
    (store.root / key.tenant / key.name / "latest").write_text("junk")
    stale_now, unreadable = stale_latest(store, retemplated, None)
    assert stale_now == [] and unreadable == [(key, f"cannot read {key.tenant}/{key.name}'s latest version pointer")]


def test_an_adapter_trained_under_another_prompt_format_is_not_published(
    trained: Any, tmp_path: Path, tiny_spec: BaseModelSpec
) -> None:
    """The model directory's chat template changed between training and publishing: the version would be
    stamped with the new format and served under it."""
    store = AdapterStore(tmp_path / "store")
    retemplated = dataclasses.replace(tiny_spec, prompt_format="sha256:" + "9" * 64)
    with pytest.raises(AdapterIncompatible, match="another tokenizer or chat template"):
        publish(trained.out_dir, store, retemplated)
    assert not (tmp_path / "store").exists()  # refused before the store was touched
    unknown = dataclasses.replace(tiny_spec, prompt_format="")  # a base without tokenizer files cannot tell
    assert store.manifest(publish(trained.out_dir, store, unknown)).base_prompt_format is None


@pytest.mark.skipif(
    not hasattr(AdapterStore, "publish_prompt"),
    reason="AdapterStore.publish_prompt (atomic publish of prompt adapters) does not exist yet",
)
def test_publish_prompt_goes_through_the_store(tmp_path: Path, tiny_spec: BaseModelSpec) -> None:
    store = AdapterStore(tmp_path / "store")
    turns = [{"role": "user", "content": "Frame warranty?"}, {"role": "assistant", "content": "Lifetime."}]
    key = publish_prompt(store, "zephyr", "support-prompt", "Answer tersely.", turns, tiny_spec)
    manifest = store.manifest(key)
    assert manifest.kind == "prompt" and manifest.base_fingerprint == tiny_spec.fingerprint
    prompt = json.loads((store.version_dir(key) / "prompt.json").read_text())
    assert prompt == {"system": "Answer tersely.", "examples": turns}


def test_publish_prompt_scans_for_pii_before_touching_the_store(tmp_path: Path, tiny_spec: BaseModelSpec) -> None:
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(PiiFound, match="system"):
        publish_prompt(store, "zephyr", "p", "Escalate to boss@example.com.", [], tiny_spec)
    assert not (tmp_path / "store").exists()


def test_a_symlink_or_mount_point_as_out_is_refused_before_training(
    tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A symlinked --out trained, then failed with "Cannot call rmtree on a symbolic link" and deleted
    the staged adapter; a mount point cannot be renamed over either. Both are refused up front."""
    from classifierlib import labelled_rows, train_head, write_labelled
    from training_testlib import qa_rows, write_jsonl

    from lorafleet_training import trainer as trainer_mod
    from lorafleet_training.errors import TrainingError
    from lorafleet_training.trainer import TrainConfig, train

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(trainer_mod, "load_peft_model", no_model)
    data = write_jsonl(tmp_path / "train.jsonl", qa_rows(8))
    (tmp_path / "real").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    config = TrainConfig(data=data, adapter="acme/x", out_dir=link, base_model_dir=tiny_model_dir, rank=4)
    with pytest.raises(TrainingError, match=r"is a symbolic link .*pass the directory itself \(--out .*real\)"):
        train(config, tiny_spec, progress=False, echo=lambda _: None)
    labelled = write_labelled(tmp_path / "labelled.jsonl", labelled_rows(4))
    with pytest.raises(TrainingError, match="is a symbolic link"):
        train_head(tiny_model_dir, tiny_spec, link, labelled)
    mount = tmp_path / "mnt"
    mount.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mount or real_ismount(p))
    with pytest.raises(TrainingError, match=r"is a mount point.*choose a directory inside it"):
        train(dataclasses.replace(config, out_dir=mount), tiny_spec, progress=False, echo=lambda _: None)
    assert list((tmp_path / "real").iterdir()) == [] and list(mount.iterdir()) == []
    # An --out that cannot be written (a file in its path): refused up front, not after training as a
    # traceback that lost the model (an outside review).
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TrainingError, match=r"cannot write the output beside .*afile/out"):
        train(dataclasses.replace(config, out_dir=tmp_path / "afile" / "out"), tiny_spec, progress=False, echo=print)
    with pytest.raises(TrainingError, match="cannot write the output beside"):
        train_head(tiny_model_dir, tiny_spec, tmp_path / "afile" / "head", labelled)


def test_a_failure_moving_the_output_into_place_keeps_it(
    trained: Any, tmp_path: Path, tiny_spec: BaseModelSpec
) -> None:
    """--out turned into a symlink while training ran: the final rename failed and the staged, verified
    adapter was deleted with the error. It is kept, the error names it, and it publishes from there."""
    from lorafleet_training.errors import OutputNotPlaced
    from lorafleet_training.publish import read_training_record, write_training_dir

    out_dir = tmp_path / "out"
    (tmp_path / "elsewhere").mkdir()

    def save_then_out_becomes_a_link(stage: Path) -> None:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy(trained.out_dir / name, stage / name)
        out_dir.symlink_to(tmp_path / "elsewhere", target_is_directory=True)

    record = {k: v for k, v in trained.record.items() if k != "files"}
    with pytest.raises(OutputNotPlaced) as info:
        write_training_dir(out_dir, save_then_out_becomes_a_link, record, tiny_spec)
    staged = info.value.staged
    assert str(staged) in str(info.value) and "symbolic link" in str(info.value)
    assert staged.parent == tmp_path and read_training_record(staged)["files"].keys() == {CONFIG_FILE, WEIGHTS_FILE}
    assert publish(staged, AdapterStore(tmp_path / "store"), tiny_spec, max_forgetting=None) == AdapterKey(
        "acme", "colors", 1
    )


def test_files_changed_after_the_checksum_check_are_not_published(
    trained: Any, tmp_path: Path, tiny_spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify_files hashed the output directory, then the store copied the files from it, and nothing
    compared what it copied with the record: a file changed in between (a valid adapter still) was
    published as if checked."""
    from safetensors.torch import load_file, save_file

    from lorafleet_training import publish as publish_mod

    out_dir = _copy(trained, tmp_path / "out")
    real_verify = publish_mod.verify_files

    def verify_then_change(directory: Path, record: Any) -> None:
        real_verify(directory, record)
        tensors = load_file(str(out_dir / WEIGHTS_FILE))
        save_file({k: v * 2 for k, v in tensors.items()}, str(out_dir / WEIGHTS_FILE), {"format": "pt"})

    monkeypatch.setattr(publish_mod, "verify_files", verify_then_change)
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors: the copy staged for publishing"):
        publish(out_dir, store, tiny_spec)
    assert store.versions("acme", "colors") == ()
