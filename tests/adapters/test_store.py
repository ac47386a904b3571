from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from adapters_testlib import FINGERPRINT, TRICKY_NAMES, MakeAdapter, edit_config, pages

from lorafleet_adapters import store as store_module
from lorafleet_adapters.errors import (
    AdapterError,
    AdapterFormatError,
    AdapterIncompatible,
    AdapterNotFound,
    InvalidAdapterRef,
    StoreUnavailable,
)
from lorafleet_adapters.manifest import prompt_formats_differ, sha256_file
from lorafleet_adapters.peft_format import WEIGHTS_FILE, BaseModelSpec, load_adapter_weights
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_adapters.store import AdapterStore, AdapterSummary


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing handles it."""


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


def ref(text: str) -> AdapterRef:
    return AdapterRef.parse(text)


def test_import_list_resolve_load(store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec) -> None:
    extra = {
        "eval_metrics": {"loss": 1.5},
        "training_data_fingerprint": "sha256:feed",
        "pii_scan": {"hits": 0},
    }
    key = store.import_peft(adapter_dir, "acme", "support", spec, extra=extra)
    assert key == AdapterKey("acme", "support", 1)
    assert store.list() == [AdapterSummary("acme", "support", (1,), 1)]
    assert store.resolve(ref("acme/support")) == key
    assert store.resolve(ref("acme/support@1")) == key

    vdir = store.version_dir(key)
    assert sorted(p.name for p in vdir.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    assert list((store.root / ".staging").iterdir()) == []

    manifest = store.manifest(key)
    assert (manifest.tenant, manifest.name, manifest.version, manifest.kind) == ("acme", "support", 1, "lora")
    assert manifest.files[WEIGHTS_FILE] == sha256_file(adapter_dir / WEIGHTS_FILE)
    assert set(manifest.files) == {"README.md", "adapter_config.json", WEIGHTS_FILE}
    assert manifest.base_fingerprint == FINGERPRINT and manifest.base_model == "tiny-llama"
    assert manifest.rank == 4 and manifest.lora_alpha == 8.0 and manifest.method == "lora"
    assert manifest.target_modules == ("q_proj", "v_proj")
    assert manifest.eval_metrics == {"loss": 1.5} and manifest.pii_scan == {"hits": 0}
    assert manifest.training_data_fingerprint == "sha256:feed"
    assert manifest.producer.startswith("lorafleet ") and manifest.created_at.endswith("Z")

    weights = store.load(key, spec)
    reference = load_adapter_weights(adapter_dir, spec)
    assert weights.key == key and weights.rank == 4
    for name, (a, b) in reference.modules.items():
        assert torch.equal(weights.modules[name][0], a) and torch.equal(weights.modules[name][1], b)


def test_versions_increment(store: AdapterStore, make_adapter: MakeAdapter, spec: BaseModelSpec) -> None:
    first, _ = make_adapter(seed=1)
    second, _ = make_adapter(seed=2, r=8, lora_alpha=4)
    assert store.import_peft(first, "acme", "support", spec).version == 1
    assert store.import_peft(second, "acme", "support", spec, method="qlora").version == 2
    assert store.import_peft(first, "zeta", "other", spec).version == 1
    assert store.versions("acme", "support") == (1, 2)
    assert store.resolve(ref("acme/support")) == AdapterKey("acme", "support", 2)
    assert store.resolve(ref("acme/support@1")).version == 1
    assert store.manifest(AdapterKey("acme", "support", 2)).method == "qlora"
    assert store.load(AdapterKey("acme", "support", 2), spec).rank == 8
    assert [s.tenant for s in store.list()] == ["acme", "zeta"]
    assert store.list("zeta") == [AdapterSummary("zeta", "other", (1,), 1)]
    assert store.list("nobody") == []


def test_pages_of_the_listing_join_up_to_the_whole_listing(store: AdapterStore, spec: BaseModelSpec) -> None:
    """ListAdapters pages: each asks the store for the adapters after the last one it had, no more than
    its size (one page read the whole store and cut it, for every page)."""
    from lorafleet_adapters.prompt import PromptTemplate

    for tenant in ("acme", "acme-x", "z"):
        for name in TRICKY_NAMES:
            store.publish_prompt(tenant, name, PromptTemplate(name), spec)
    (store.root / "acme" / "a-a").mkdir()  # an adapter folder with nothing published: not listed
    whole = store.list()
    assert [(s.tenant, s.name) for s in whole] == sorted((t, n) for t in ("acme", "acme-x", "z") for n in TRICKY_NAMES)
    for limit in (1, 2, 3, 7, 8, 9, 100):
        assert [s for page in pages(store, limit) for s in page] == whole, limit
        assert [s for page in pages(store, limit, "acme-x") for s in page] == store.list("acme-x"), limit
    assert store.list(after=("acme-x", "b-"), limit=2) == whole[16:18]  # from the next tenant on
    assert store.list(after=("zz", ""), limit=2) == []


def test_not_found_messages(store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec) -> None:
    store.import_peft(adapter_dir, "acme", "support", spec)
    with pytest.raises(AdapterNotFound, match="acme/other not found"):
        store.resolve(ref("acme/other"))
    with pytest.raises(AdapterNotFound, match="nobody/support not found"):
        store.resolve(ref("nobody/support@1"))
    with pytest.raises(AdapterNotFound, match=r"has no version 5 \(has \[1\]\)"):
        store.resolve(ref("acme/support@5"))
    with pytest.raises(AdapterNotFound):
        store.load(AdapterKey("acme", "support", 5), spec)


def test_empty_and_missing_root(tmp_path: Path, adapter_dir: Path, spec: BaseModelSpec) -> None:
    (tmp_path / "empty").mkdir()
    assert AdapterStore(tmp_path / "empty").list() == []
    missing = AdapterStore(tmp_path / "missing")
    with pytest.raises(StoreUnavailable, match="missing"):
        missing.list()
    with pytest.raises(StoreUnavailable):
        missing.resolve(ref("acme/support"))
    with pytest.raises(StoreUnavailable):
        missing.resolve(ref("acme/support@1"))
    assert missing.import_peft(adapter_dir, "acme", "support", spec).version == 1  # creates the root
    assert len(missing.list()) == 1
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreUnavailable, match="not a directory"):
        AdapterStore(tmp_path / "file").list()


def test_checksum_tamper_detected(store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec) -> None:
    key = store.import_peft(adapter_dir, "acme", "support", spec)
    weights_path = store.version_dir(key) / WEIGHTS_FILE
    data = bytearray(weights_path.read_bytes())
    data[-1] ^= 0x01  # still a valid safetensors file, different weights
    weights_path.write_bytes(bytes(data))
    with pytest.raises(AdapterFormatError, match=r"checksum mismatch for adapter_model\.safetensors"):
        store.load(key, spec)
    (store.version_dir(key) / "README.md").unlink()
    weights_path.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0x01]))
    with pytest.raises(AdapterFormatError, match=r"README\.md listed in manifest\.json is missing"):
        store.load(key, spec)


def test_manifest_identity_checked(store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec) -> None:
    key = store.import_peft(adapter_dir, "acme", "support", spec)
    path = store.version_dir(key) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["name"] = "other"
    path.write_text(json.dumps(manifest))
    with pytest.raises(AdapterFormatError, match="describes acme/other@1"):
        store.load(key, spec)


def _rewrite_manifest(store: AdapterStore, key: AdapterKey, **changes: Any) -> None:
    path = store.version_dir(key) / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_manifest_must_list_the_files_its_kind_needs(
    store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec
) -> None:
    """Unlisted, a prompt's prompt.json would be read without its checksum, and a LoRA's weights were a
    KeyError (INTERNAL); the kind check too (an outside mutation run dropped both unnoticed)."""
    from lorafleet_adapters.prompt import PROMPT_FILE, PromptTemplate

    key = store.import_peft(adapter_dir, "acme", "support", spec)
    files = json.loads((store.version_dir(key) / "manifest.json").read_text())["files"]
    _rewrite_manifest(store, key, files={k: v for k, v in files.items() if k != WEIGHTS_FILE})
    with pytest.raises(AdapterFormatError, match=f"manifest.json does not list {WEIGHTS_FILE}"):
        store.load(key, spec)
    _rewrite_manifest(store, key, files=files, kind="head", method="logreg", rank=0)
    with pytest.raises(AdapterFormatError, match="manifest kind is 'head'; only 'lora' has weights"):
        store.load(key, spec)
    prompt = store.publish_prompt("acme", "faq", PromptTemplate(system="Be brief."), spec)
    _rewrite_manifest(store, prompt, files={})
    with pytest.raises(AdapterFormatError, match=f"manifest.json does not list {PROMPT_FILE}"):
        store.load_prompt(prompt)


def test_fingerprint_mismatch(store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec) -> None:
    key = store.import_peft(adapter_dir, "acme", "support", spec)
    other = BaseModelSpec("sha256:other", "tiny-llama", "nf4", spec.target_shapes, spec.max_lora_rank)
    with pytest.raises(AdapterIncompatible) as info:
        store.load(key, other)
    assert FINGERPRINT in str(info.value) and "sha256:other" in str(info.value)


def test_prompt_format_mismatch(store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec) -> None:
    """Same weights, another tokenizer or chat template: the adapter sees other token ids for the same
    request. A version names the format it was published under; an older one (or a side that does not
    know its own) passes."""
    trained = dataclasses.replace(spec, prompt_format="sha256:" + "a" * 64)
    key = store.import_peft(adapter_dir, "acme", "support", trained)
    manifest = store.manifest(key)
    assert manifest.base_prompt_format == trained.prompt_format
    assert json.loads(manifest.to_json())["base_prompt_format"] == trained.prompt_format
    store.load(key, trained)
    store.load(key, dataclasses.replace(spec, prompt_format=""))  # a base that cannot tell: served
    changed = dataclasses.replace(spec, prompt_format="sha256:" + "b" * 64)
    with pytest.raises(AdapterIncompatible, match="another tokenizer or chat template") as info:
        store.load(key, changed)
    assert "sha256:" + "b" * 64 in str(info.value)
    assert prompt_formats_differ(manifest.base_prompt_format, changed.prompt_format)
    # published without a format (an older trainer): the field is left out of the JSON, and any base serves it
    old_key = store.import_peft(adapter_dir, "acme", "legacy", dataclasses.replace(spec, prompt_format=""))
    assert "base_prompt_format" not in json.loads(store.manifest(old_key).to_json())
    store.load(old_key, changed)


def test_invalid_import_publishes_nothing(store: AdapterStore, make_adapter: MakeAdapter, spec: BaseModelSpec) -> None:
    with pytest.raises(InvalidAdapterRef):
        store.import_peft(make_adapter()[0], "Acme", "support", spec)
    assert not store.root.exists()  # refused before any file was touched
    bad, _ = make_adapter()
    edit_config(bad, use_dora=True)
    with pytest.raises(AdapterFormatError, match="use_dora"):
        store.import_peft(bad, "acme", "support", spec)
    with pytest.raises(AdapterFormatError, match="unknown manifest extra"):
        store.import_peft(make_adapter()[0], "acme", "support", spec, extra={"owner": "me"})
    assert store.list() == []
    assert list((store.root / ".staging").iterdir()) == []


def test_a_training_record_must_be_one_small_json_object(
    store: AdapterStore, make_adapter: MakeAdapter, spec: BaseModelSpec
) -> None:
    """The record `lorafleet retrain` reads back is checked at publish: an object, each key once, at most
    the manifest's size; nothing is published otherwise."""
    record = store_module.RETRAIN_RECORD_FILE
    for text, message in (
        ('{"steps": 10, "steps": 99}', "not valid JSON: key 'steps' is given twice"),
        ("[1, 2]", "must hold a JSON object"),
        ("{", "not valid JSON"),
        ("{}" + " " * store_module.MAX_MANIFEST_BYTES, "is larger than"),
    ):
        source, _ = make_adapter()
        (source / record).write_text(text)
        with pytest.raises(AdapterFormatError, match=message):
            store.import_peft(source, "acme", "support", spec)
    assert store.list() == []
    source, _ = make_adapter()
    (source / record).write_text('{"steps": 10}')
    key = store.import_peft(source, "acme", "support", spec)
    assert record in store.manifest(key).files


def test_only_known_files_copied(store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec) -> None:
    (adapter_dir / "adapter_model.bin").write_bytes(b"pickle")
    (adapter_dir / "notes.txt").write_text("x")
    key = store.import_peft(adapter_dir, "acme", "support", spec)
    names = {p.name for p in store.version_dir(key).iterdir()}
    assert "adapter_model.bin" not in names and "notes.txt" not in names


def test_bin_only_source_refused(store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec) -> None:
    (adapter_dir / WEIGHTS_FILE).rename(adapter_dir / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="only safetensors"):
        store.import_peft(adapter_dir, "acme", "support", spec)


def test_crash_mid_publish_leaves_nothing_visible(
    store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: Any) -> None:
        raise Crash

    monkeypatch.setattr(os, "rename", crash)
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)  # a dead process cleans nothing
    with pytest.raises(Crash):
        store.import_peft(adapter_dir, "acme", "support", spec)
    monkeypatch.undo()
    leftovers = list((store.root / ".staging").iterdir())
    assert len(leftovers) == 1 and (leftovers[0] / "manifest.json").is_file()
    assert store.list() == []
    assert store.versions("acme", "support") == ()
    with pytest.raises(AdapterNotFound):
        store.resolve(ref("acme/support"))
    assert store.import_peft(adapter_dir, "acme", "support", spec).version == 1


def test_crash_before_latest_update(
    store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.import_peft(adapter_dir, "acme", "support", spec)

    def crash(self: AdapterStore, key: AdapterKey) -> None:
        raise Crash

    monkeypatch.setattr(AdapterStore, "_advance_latest", crash)
    with pytest.raises(Crash):
        store.import_peft(adapter_dir, "acme", "support", spec)
    monkeypatch.undo()
    # Version 2 is complete and addressable; `latest` still names version 1.
    assert store.list() == [AdapterSummary("acme", "support", (1, 2), 1)]
    assert store.resolve(ref("acme/support")).version == 1
    store.load(AdapterKey("acme", "support", 2), spec)


def test_every_pointer_move_changes_the_change_token(
    store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    store.check()
    assert store.change_token() == ""
    seen = [""]
    for name in ("support", "support", "other"):
        store.import_peft(adapter_dir, "acme", name, spec)
        seen.append(store.change_token())
    assert len(set(seen)) == len(seen)  # even the same adapter published twice
    assert "acme/other@1" in seen[-1]
    assert [(s.tenant, s.name) for s in store.list()] == [("acme", "other"), ("acme", "support")]

    # A marker that cannot be written does not fail the publish (the version and pointer are in place).
    real = store_module.atomic_write_text

    def no_marker(path: Path, text: str) -> None:
        if path.name == ".published":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(store_module, "atomic_write_text", no_marker)
    assert store.import_peft(adapter_dir, "acme", "support", spec).version == 3
    assert store.resolve(ref("acme/support")).version == 3
    assert store.change_token() == seen[-1] and "next full rescan" in caplog.text


def test_io_error_during_publish(
    store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "rename", broken)
    with pytest.raises(StoreUnavailable, match="I/O error"):
        store.import_peft(adapter_dir, "acme", "support", spec)
    monkeypatch.undo()
    assert list((store.root / ".staging").iterdir()) == []
    assert store.list() == []


def test_lost_rename_race_takes_next_number(
    store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_rename = os.rename

    def rival_wins_first(src: Any, dst: Any) -> None:
        monkeypatch.setattr(os, "rename", real_rename)
        Path(dst).mkdir()
        (Path(dst) / "rival-data").write_text("x")  # another publisher got there first
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rival_wins_first)
    key = store.import_peft(adapter_dir, "acme", "support", spec)
    assert key.version == 2
    assert store.resolve(ref("acme/support")) == key


def test_concurrent_publishers(store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec) -> None:
    keys: list[AdapterKey] = []
    threads = [
        threading.Thread(target=lambda: keys.append(store.import_peft(adapter_dir, "acme", "support", spec)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(k.version for k in keys) == [1, 2, 3, 4]
    assert store.resolve(ref("acme/support")).version == 4


# One publisher process: waits for "go" on stdin so that all of them publish at once.
PUBLISHER = r"""
import json, sys
from pathlib import Path
from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.store import AdapterStore

job = json.loads(sys.argv[1])
fields = job["spec"]
spec = BaseModelSpec(**{**fields, "target_shapes": {k: tuple(v) for k, v in fields["target_shapes"].items()}})
store = AdapterStore(Path(job["root"]))
print("ready", flush=True)
sys.stdin.readline()
versions = [store.import_peft(Path(job["src"]), "acme", "shared", spec).version for _ in range(job["count"])]
print(json.dumps(versions), flush=True)
"""


def test_concurrent_publishers_in_separate_processes(
    store: AdapterStore, make_adapter: MakeAdapter, spec: BaseModelSpec
) -> None:
    publishers, each = 4, 3
    sources = [make_adapter(seed=70 + i)[0] for i in range(publishers)]  # each publisher its own adapter
    spec_fields = {
        "fingerprint": spec.fingerprint,
        "model_id": spec.model_id,
        "quantization": spec.quantization,
        "target_shapes": {k: list(v) for k, v in spec.target_shapes.items()},
        "max_lora_rank": spec.max_lora_rank,
        "max_adapter_bytes": spec.max_adapter_bytes,
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                PUBLISHER,
                json.dumps({"root": str(store.root), "src": str(src), "spec": spec_fields, "count": each}),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for src in sources
    ]
    try:
        for proc in procs:  # every process has imported everything: the publishes themselves overlap
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        published = []
        for proc in procs:
            assert proc.stdout is not None
            published.append(json.loads(proc.stdout.readline() or "null"))
            assert proc.wait(120) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    versions = sorted(v for got in published for v in got)
    assert versions == list(range(1, publishers * each + 1))  # distinct, none lost, no gap
    assert store.versions("acme", "shared") == tuple(versions)
    for src, got in zip(sources, published, strict=True):
        files = {name: sha256_file(src / name) for name in ("adapter_config.json", WEIGHTS_FILE, "README.md")}
        for version in got:
            key = AdapterKey("acme", "shared", version)
            manifest = store.manifest(key)  # names this very version
            assert dict(manifest.files) == files  # the publisher's own files, nothing mixed in
            assert sorted(p.name for p in store.version_dir(key).iterdir()) == sorted([*files, "manifest.json"])
            store.load(key, spec)  # complete: every checksum, the header and the shapes verify
    assert store.resolve(ref("acme/shared")).version == publishers * each
    assert (store.root / "acme" / "shared" / "latest").read_text() == f"{publishers * each}\n"
    assert list((store.root / ".staging").iterdir()) == []


def test_latest_pointer_problems(store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec) -> None:
    store.import_peft(adapter_dir, "acme", "support", spec)
    latest = store.root / "acme" / "support" / "latest"
    latest.write_text("7\n")
    with pytest.raises(AdapterNotFound, match="names version 7, which does not exist"):
        store.resolve(ref("acme/support"))
    assert store.list() == [AdapterSummary("acme", "support", (1,), None)]
    latest.write_text("../../etc")
    with pytest.raises(AdapterNotFound, match="corrupt"):
        store.resolve(ref("acme/support"))
    latest.unlink()  # a first publish interrupted before the pointer: fall back to the highest version
    assert store.resolve(ref("acme/support")).version == 1
    store.import_peft(adapter_dir, "acme", "support", spec)
    latest.unlink()  # two versions: the highest, not the first (a mutation test found this unchecked)
    assert store.resolve(ref("acme/support")).version == 2


def test_a_fifo_for_a_pointer_or_the_publish_marker_is_refused_not_waited_on(
    store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec
) -> None:
    """Found by an outside review: a FIFO at ``latest`` or at the publish marker blocked the open of
    every resolve, watcher poll and publish of that adapter for ever (the open waits for a writer)."""
    store.import_peft(adapter_dir, "acme", "support", spec)
    latest, marker = store.root / "acme" / "support" / "latest", store.root / store_module.PUBLISHED_MARKER
    for path in (latest, marker):
        path.unlink()
        os.mkfifo(path)
    outcome: dict[str, object] = {}

    def read() -> None:
        for name, call in (("resolve", lambda: store.resolve(ref("acme/support"))), ("token", store.change_token)):
            try:
                outcome[name] = call()
            except AdapterError as exc:
                outcome[name] = exc

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    for path in (latest, marker):  # a blocked open returns once a writer comes and goes
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert not reader.is_alive(), "a read blocked on a FIFO"
    assert isinstance(outcome["resolve"], AdapterError) and "not a regular file" in str(outcome["resolve"])
    assert isinstance(outcome["token"], AdapterError | str)


@pytest.mark.parametrize("damage", ["", "\n", "\x002", "../../etc", "9" * 40, "symlink"])
def test_a_publish_repairs_a_damaged_latest_pointer(
    store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec, tmp_path: Path, damage: str
) -> None:
    store.import_peft(adapter_dir, "acme", "support", spec)
    latest = store.root / "acme" / "support" / "latest"
    if damage == "symlink":  # a pointer that leads out of the store
        (tmp_path / "outside").write_text("1\n")
        latest.unlink()
        latest.symlink_to(tmp_path / "outside")
    else:
        latest.write_text(damage)  # torn or junk
    with pytest.raises((AdapterNotFound, AdapterFormatError)):
        store.resolve(ref("acme/support"))  # by name the adapter cannot be resolved: not guessed
    key = store.import_peft(adapter_dir, "acme", "support", spec)  # a publish is not blocked by it...
    assert key.version == 2
    assert not latest.is_symlink() and latest.read_text() == "2\n"  # ...and repairs it
    assert store.resolve(ref("acme/support")) == key
    if damage == "symlink":
        assert (tmp_path / "outside").read_text() == "1\n"  # the link was replaced, not followed
    assert store.import_peft(adapter_dir, "acme", "support", spec).version == 3
    assert store.resolve(ref("acme/support")).version == 3


def test_junk_ignored(store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec) -> None:
    store.import_peft(adapter_dir, "acme", "support", spec)
    (store.root / ".staging" / "half-written").mkdir()
    (store.root / "README.txt").write_text("hello")
    (store.root / "Upper").mkdir()
    (store.root / "acme" / "notes.txt").write_text("x")
    versions = store.root / "acme" / "support" / "versions"
    for junk in ("007", "tmp", "3"):  # "3" has no manifest: not a published version
        (versions / junk).mkdir()
    (store.root / "acme" / "empty").mkdir()
    assert store.list() == [AdapterSummary("acme", "support", (1,), 1)]


def test_symlinks_out_of_root_refused(
    store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec, tmp_path: Path
) -> None:
    key = store.import_peft(adapter_dir, "acme", "support", spec)
    vdir = store.version_dir(key)
    outside = tmp_path / "outside"
    shutil.copytree(store.root, outside)

    # A version directory that is a symlink leading outside.
    (vdir.parent / "2").symlink_to(outside / "acme" / "support" / "versions" / "1")
    assert store.versions("acme", "support") == (1,)
    with pytest.raises(AdapterNotFound, match="outside the adapter store"):
        store.version_dir(AdapterKey("acme", "support", 2))
    with pytest.raises(AdapterNotFound):
        store.resolve(ref("acme/support@2"))
    with pytest.raises(AdapterNotFound):
        store.load(AdapterKey("acme", "support", 2), spec)

    # A `latest` pointer that is a symlink leading outside.
    latest = store.root / "acme" / "support" / "latest"
    latest.unlink()
    latest.symlink_to(outside / "acme" / "support" / "latest")
    with pytest.raises(AdapterNotFound, match="outside the adapter store"):
        store.resolve(ref("acme/support"))
    assert store.list() == [AdapterSummary("acme", "support", (1,), None)]

    # A tenant directory that is a symlink leading outside.
    (store.root / "evil").symlink_to(outside / "acme")
    assert [s.tenant for s in store.list()] == ["acme"]
    with pytest.raises(AdapterNotFound):
        store.resolve(ref("evil/support@1"))

    # Files inside a version that are symlinks leading outside.
    (vdir / WEIGHTS_FILE).unlink()
    (vdir / WEIGHTS_FILE).symlink_to(outside / "acme" / "support" / "versions" / "1" / WEIGHTS_FILE)
    with pytest.raises(AdapterNotFound, match="outside the adapter store"):
        store.load(key, spec)
    (vdir / "manifest.json").unlink()
    (vdir / "manifest.json").symlink_to(outside / "acme" / "support" / "versions" / "1" / "manifest.json")
    with pytest.raises(AdapterNotFound):
        store.resolve(ref("acme/support@1"))


def test_symlinked_root_works_and_aliases_are_caught(
    store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec, tmp_path: Path
) -> None:
    key = store.import_peft(adapter_dir, "acme", "support", spec)
    (tmp_path / "link").symlink_to(store.root)
    via_link = AdapterStore(tmp_path / "link")
    assert via_link.resolve(ref("acme/support")) == key
    assert via_link.load(key, spec).rank == 4
    # A symlink inside the root is followed, but a version only answers to its own identity.
    (store.root / "alias").symlink_to(store.root / "acme")
    with pytest.raises(AdapterFormatError, match="describes acme/support@1"):
        store.load(AdapterKey("alias", "support", 1), spec)


def test_stale_staging_left_by_crashed_publishes_is_swept(
    store: AdapterStore, adapter_dir: Path, spec: BaseModelSpec
) -> None:
    store.import_peft(adapter_dir, "acme", "support", spec)
    staging = store.root / ".staging"
    old_dir, old_file, fresh = staging / "acme.support.crashed", staging / "stray.tmp", staging / "acme.support.live"
    old_dir.mkdir()
    (old_dir / "adapter_model.safetensors").write_bytes(b"x" * 16)
    old_file.write_text("x")
    fresh.mkdir()
    outside = store.root.parent / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    link = staging / "link-out"
    link.symlink_to(outside, target_is_directory=True)
    day_ago = time.time() - 2 * 24 * 3600
    for path in (old_dir, old_file):
        os.utime(path, (day_ago, day_ago))
    os.utime(link, (day_ago, day_ago), follow_symlinks=False)

    assert store.import_peft(adapter_dir, "acme", "support", spec).version == 2  # a publish sweeps
    assert sorted(p.name for p in staging.iterdir()) == ["acme.support.live"]
    assert (outside / "keep.txt").read_text() == "keep"  # the link went, never what it points at
    assert store.sweep_staging(max_age_seconds=0) == ["acme.support.live"]
