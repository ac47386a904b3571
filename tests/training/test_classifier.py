"""`train --method classifier` on the tiny Llama: data checks, metrics, record, determinism, publish gate."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from classifierlib import labelled_rows, train_head, write_labelled

from lorafleet_adapters.errors import AdapterFormatError, AdapterIncompatible
from lorafleet_adapters.head import HEAD_WEIGHTS_FILE, load_head, read_head_record
from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.store import MAX_SMALL_FILE_BYTES, AdapterStore
from lorafleet_training.classifier import (
    NO_LABEL,
    classification_metrics,
    label_from_answer,
    load_labelled,
    stratified_split,
)
from lorafleet_training.errors import PiiFound, TrainingDataError
from lorafleet_training.publish import RECORD_FILE, NoImprovement, publish


@pytest.fixture(scope="module")
def head_out(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_spec: BaseModelSpec) -> Any:
    root = tmp_path_factory.mktemp("head")
    data = write_labelled(root / "intents.jsonl", labelled_rows(8))
    return train_head(tiny_model_dir, tiny_spec, root / "out", data, c=10.0)


def test_bad_lines_are_all_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"text": "ok", "label": "a"}\n'
        '{"text": "no label"}\n'
        "not json\n"
        '{"text": "x", "label": "b", "extra": 1}\n'
        '{"messages": [{"role": "robot", "content": "x"}], "label": "b"}\n'
        '{"text": "hi \\ud800", "label": "a"}\n'  # parses; no UTF-8 form (the fingerprint raised)
        '{"text": "deep", "label": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    )
    with pytest.raises(TrainingDataError) as info:
        load_labelled(path)
    assert [issue.line for issue in info.value.issues] == [2, 3, 4, 5, 6, 7]
    assert "lone surrogate" in info.value.issues[4].message


def test_a_key_given_twice_or_an_overlong_line_is_refused(tmp_path: Path) -> None:
    """The label loader kept the last of two equal keys (trained as "y") and had no line cap, unlike
    the LoRA loader's 1 MiB (an outside review)."""
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "ok", "label": "a"}\n'
        '{"text": "a", "label": "x", "label": "y"}\n'
        '{"text": "' + "x" * (1 << 20) + '", "label": "a"}\n'
    )
    with pytest.raises(TrainingDataError) as info:
        load_labelled(path)
    assert [issue.line for issue in info.value.issues] == [2, 3]
    assert "key 'label' is given twice" in info.value.issues[0].message
    assert "longer than 1048576 bytes" in info.value.issues[1].message


def test_the_prompt_only_baseline_may_generate_its_longest_label(tiny_model_dir: Path) -> None:
    """It generated 8 tokens whatever the labels: a label of more tokens was always cut and scored as
    no label, so the baseline the publish gates compare with could never be right."""
    from transformers import AutoTokenizer

    from lorafleet_training.classifier import answer_budget

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_label = "account_access_two_factor_authentication"
    tokens = len(tokenizer(long_label, add_special_tokens=False)["input_ids"])
    assert tokens > 8
    assert answer_budget(tokenizer, ["billing", long_label], 8) >= tokens + 1
    assert answer_budget(tokenizer, ["billing", "shipping"], 8) == 8


def test_pii_is_refused_before_any_model_loads(tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec) -> None:
    rows = [*labelled_rows(4), {"text": "mail me at jane.doe@example.com", "label": "account"}]
    with pytest.raises(PiiFound):
        train_head(tiny_model_dir, tiny_spec, tmp_path / "out", write_labelled(tmp_path / "d.jsonl", rows))
    assert not (tmp_path / "out").exists()


def test_one_label_is_refused(tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec) -> None:
    rows = [{"text": f"t{i}", "label": "only"} for i in range(4)]
    with pytest.raises(TrainingDataError, match="2\\+ labels"):
        train_head(tiny_model_dir, tiny_spec, tmp_path / "out", write_labelled(tmp_path / "d.jsonl", rows))


def test_a_prompt_over_max_length_is_refused_not_cut(
    tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec
) -> None:
    """Classify pools the whole prompt; a head fitted on the last --max-length tokens of a longer one
    (what training did) would be served features it never saw. Every such line is named."""
    rows = [*labelled_rows(4), {"text": "word " * 200, "label": "billing"}, {"text": "more " * 300, "label": "account"}]
    with pytest.raises(TrainingDataError) as info:
        train_head(
            tiny_model_dir, tiny_spec, tmp_path / "out", write_labelled(tmp_path / "d.jsonl", rows), max_length=64
        )
    assert sorted(issue.line for issue in info.value.issues) == [len(rows) - 1, len(rows)]
    assert "over --max-length 64" in info.value.issues[0].message
    assert not (tmp_path / "out").exists()


def test_stratified_split_is_seeded_and_holds_out_every_label(tmp_path: Path) -> None:
    examples = load_labelled(write_labelled(tmp_path / "d.jsonl", labelled_rows(10)))
    train, held = stratified_split(examples, 0.2, seed=4)
    assert (train, held) == stratified_split(examples, 0.2, seed=4)
    assert held != stratified_split(examples, 0.2, seed=5)[1]
    # 10 rows a label over 4 texts (groups of 3, 3, 2, 2): whole groups until 2 are held out
    held_per_label = {label: sum(e.completion == label for e in held) for label in ("account", "billing", "shipping")}
    assert set(held_per_label.values()) <= {2, 3}, held_per_label
    assert not {e.line for e in train} & {e.line for e in held}


def test_stratified_split_keeps_repeated_texts_together_and_trains_on_every_label(tmp_path: Path) -> None:
    """Repeated texts landed on both sides (20 of 20 held-out texts were trained on), and two examples
    of a label at --val-fraction 0.75 were both held out, so training had none (sklearn's traceback)."""
    rows = [{"text": f"t{i % 4}", "label": "a" if i % 2 else "b"} for i in range(40)]
    examples = load_labelled(write_labelled(tmp_path / "d.jsonl", rows))
    train, held = stratified_split(examples, 0.5, seed=1)
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in held})
    assert {e.completion for e in train} == {"a", "b"}
    pairs = load_labelled(write_labelled(tmp_path / "p.jsonl", labelled_rows(2)))
    train, held = stratified_split(pairs, 0.75, seed=0)
    assert {e.completion for e in train} == {e.completion for e in pairs}


def test_stratified_split_keeps_a_text_with_two_labels_on_one_side(tmp_path: Path) -> None:
    """Texts were grouped within a label only: a text labelled both 'a' and 'b' (a labelling conflict)
    was trained on under one label and scored under the other."""
    rows = [{"text": f"shared {i % 5}", "label": "a" if i % 2 else "b"} for i in range(40)]
    rows += [{"text": f"own {label} {i}", "label": label} for label in ("a", "b") for i in range(6)]
    examples = load_labelled(write_labelled(tmp_path / "d.jsonl", rows))
    for seed in range(10):
        train, held = stratified_split(examples, 0.25, seed)
        assert {e.prompt for e in train}.isdisjoint({e.prompt for e in held}), seed
        assert {e.completion for e in train} == {"a", "b"} and {e.completion for e in held} == {"a", "b"}
        assert len(train) + len(held) == len(examples)


def test_stratified_split_skips_a_group_that_would_overshoot(tmp_path: Path) -> None:
    """Per label, as data.split: 30 rows of one text and 20 distinct at --val-fraction 0.1 held out all 30
    when the big group came first in the shuffled order; the warning names a label far above the fraction."""
    from lorafleet_training.classifier import split_warning

    rows = [{"text": f"same {label}", "label": label} for label in ("a", "b") for _ in range(30)]
    rows += [{"text": f"{label} {i}", "label": label} for label in ("a", "b") for i in range(20)]
    examples = load_labelled(write_labelled(tmp_path / "d.jsonl", rows))
    for seed in range(10):
        _, held = stratified_split(examples, 0.1, seed)
        assert sorted(Counter(e.completion for e in held).values()) == [5, 5], seed
        assert split_warning(examples, held, 0.1) is None
    lopsided = [{"text": f"x{i % 2}", "label": "a"} for i in range(20)] + [
        {"text": f"y{i}", "label": "b"} for i in range(20)
    ]
    examples = load_labelled(write_labelled(tmp_path / "l.jsonl", lopsided))
    _, held = stratified_split(examples, 0.1, 0)
    assert Counter(e.completion for e in held) == {"a": 10, "b": 2}  # 'a' has two texts of 10 rows each
    warning = split_warning(examples, held, 0.1)
    assert warning is not None and "'a' 10 of 20" in warning and "'b'" not in warning


def test_held_out_texts_over_max_length_are_refused_before_the_model_loads(
    tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lorafleet_training.classifier as classifier_mod

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(classifier_mod, "load_feature_model", no_model)
    heldout = write_labelled(tmp_path / "h.jsonl", [*labelled_rows(2), {"text": "word " * 200, "label": "billing"}])
    data = write_labelled(tmp_path / "d.jsonl", labelled_rows(4))
    with pytest.raises(TrainingDataError) as info:
        train_head(tiny_model_dir, tiny_spec, tmp_path / "out", data, max_length=64, eval_data=heldout)
    assert info.value.source == str(heldout) and [i.line for i in info.value.issues] == [7]


def test_eval_data_overlap_is_recorded(tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec) -> None:
    """--eval-data sharing texts with the training data is a warning (a retrain replays it); the record says
    how many, so a reader of the metrics knows."""
    data = write_labelled(tmp_path / "d.jsonl", labelled_rows(4))
    heldout = write_labelled(tmp_path / "h.jsonl", [*labelled_rows(2), {"text": "a new text", "label": "billing"}])
    result = train_head(tiny_model_dir, tiny_spec, tmp_path / "out", data, eval_data=heldout)
    assert result.record["data"]["val_overlap"] == 6
    split_run = train_head(tiny_model_dir, tiny_spec, tmp_path / "split", data, val_fraction=0.3)
    assert split_run.record["data"]["val_overlap"] == 0


def test_classification_metrics_by_hand() -> None:
    truth = ["a", "a", "b", "b", "c"]
    predicted = ["a", "b", "b", "b", NO_LABEL]
    m = classification_metrics(truth, predicted, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    # a: p 1, r .5, f1 2/3; b: p 2/3, r 1, f1 .8; c: 0
    assert m["per_label"]["a"]["recall"] == pytest.approx(0.5)
    assert m["per_label"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert m["confusion_matrix"]["matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1]]
    assert m["confusion_matrix"]["columns"][-1] == NO_LABEL


def test_label_from_answer() -> None:
    labels = ["billing", "shipping"]
    assert label_from_answer(" Billing.", labels) == "billing"
    assert label_from_answer("It is about shipping, not billing", labels) == "shipping"
    assert label_from_answer("I'm sorry for your loss", labels) == NO_LABEL


def test_record_and_determinism(head_out: Any, tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec) -> None:
    record = json.loads((head_out.out_dir / "lorafleet-training.json").read_text())
    assert record["kind"] == "head" and record["method"] == "logreg"
    assert record["data"]["path"] and record["data"]["fingerprint"].startswith("sha256:")
    assert record["hyperparameters"]["seed"] == 1 and record["hyperparameters"]["C"] == 10.0
    head_metrics = record["classification"]["head"]
    assert set(head_metrics["per_label"]) == {"account", "billing", "shipping"}
    assert sum(map(sum, head_metrics["confusion_matrix"]["matrix"])) == record["eval_metrics"]["eval_examples"] == 6
    assert record["eval_metrics"]["macro_f1"] == pytest.approx(head_metrics["macro_f1"])
    again = train_head(tiny_model_dir, tiny_spec, tmp_path / "again", Path(record["data"]["path"]), c=10.0)
    assert (again.out_dir / HEAD_WEIGHTS_FILE).read_bytes() == (head_out.out_dir / HEAD_WEIGHTS_FILE).read_bytes()


def test_publish_keeps_the_record_and_checks_files(head_out: Any, tmp_path: Path, tiny_spec: BaseModelSpec) -> None:
    # A record as training with --eval-generate writes it: the prompt-only base's answers to held-out
    # prompts (they can repeat a customer's text) stay with the training output, not in the store.
    out_dir = tmp_path / "out"
    shutil.copytree(head_out.out_dir, out_dir)
    written = json.loads((out_dir / RECORD_FILE).read_text())
    written["classification"]["base_prompt"] = {"samples": [{"line": 3, "answer": "Ship it to 1 Main St"}]}
    (out_dir / RECORD_FILE).write_text(json.dumps(written))
    store = AdapterStore(tmp_path / "store")
    key = publish(out_dir, store, tiny_spec)
    manifest = store.manifest(key)
    assert manifest.kind == "head" and manifest.rank == 0 and "macro_f1" in manifest.eval_metrics
    assert load_head(store, key, tiny_spec).labels == ("account", "billing", "shipping")
    kept = read_head_record(store, key)
    assert kept is not None
    assert kept["data"]["fingerprint"] == manifest.training_data_fingerprint
    assert "samples" not in json.dumps(kept) and kept["classification"]["head"] == written["classification"]["head"]
    other = BaseModelSpec("sha256:" + "0" * 64, "other", "none", tiny_spec.target_shapes, 64)
    with pytest.raises(AdapterIncompatible):
        load_head(store, key, other)
    weights = store.version_dir(key) / HEAD_WEIGHTS_FILE
    weights.write_bytes(b"tampered")
    with pytest.raises(AdapterFormatError, match="checksum mismatch"):
        load_head(store, key, tiny_spec)
    # Found by an outside review: any size was hashed whole before the head's own size check.
    with open(weights, "r+b") as handle:
        handle.truncate(MAX_SMALL_FILE_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(AdapterFormatError, match=f"{HEAD_WEIGHTS_FILE} is {MAX_SMALL_FILE_BYTES + 1} bytes, over"):
        load_head(store, key, tiny_spec)


def test_a_record_with_large_confusion_matrices_still_publishes(
    head_out: Any, tmp_path: Path, tiny_spec: BaseModelSpec
) -> None:
    """With ~500-700 labels the record the store keeps (indented, with two confusion matrices) went over
    the store's 4 MiB limit: the head trained but could not be published, and the error named a temporary
    file. The store's copy is compact JSON (700 labels fit, matrices and all), and without the matrices
    when even that is too large (1024 labels, the most a head has); the training output keeps them."""
    store = AdapterStore(tmp_path / "store")
    for n, omitted in ((700, False), (1024, True)):
        out_dir = tmp_path / f"out{n}"
        shutil.copytree(head_out.out_dir, out_dir)
        record = json.loads((out_dir / RECORD_FILE).read_text())
        labels = [f"intent-{i:04d}" for i in range(n)]
        matrix = [[0] * n for _ in labels]
        for name in ("head", "base_prompt"):
            matrices = {"confusion_matrix": {"labels": labels, "columns": labels, "matrix": matrix}}
            record["classification"][name] = matrices
        (out_dir / RECORD_FILE).write_text(json.dumps(record, indent=2))
        key = publish(out_dir, store, tiny_spec)
        kept = read_head_record(store, key)
        assert kept is not None and kept["eval_metrics"] == record["eval_metrics"] and kept["data"] == record["data"]
        assert ("omitted" in kept["classification"]["head"]["confusion_matrix"]) is omitted, n
        assert "\n " not in (store.version_dir(key) / RECORD_FILE).read_text()  # compact
        local = json.loads((out_dir / RECORD_FILE).read_text())
        assert len(local["classification"]["head"]["confusion_matrix"]["matrix"]) == n  # the output keeps it


def test_a_record_too_large_for_the_store_fails_at_training(
    tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found at training, with the reason, not at publish time (the store limit shrunk to force it)."""
    import lorafleet_adapters.head as head_mod
    from lorafleet_training.errors import TrainingError

    monkeypatch.setattr(head_mod, "MAX_RECORD_BYTES", 1000)
    data = write_labelled(tmp_path / "d.jsonl", labelled_rows(4))
    with pytest.raises(TrainingError, match=r"over the 1000 bytes an adapter store keeps with a head \(3 labels\)"):
        train_head(tiny_model_dir, tiny_spec, tmp_path / "out", data)
    assert not (tmp_path / "out").exists()


def test_a_head_changed_after_its_checksums_were_verified_is_not_published(
    head_out: Any, tmp_path: Path, tiny_spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head was read after its files were hashed, and what was read was published unchecked."""
    from safetensors.torch import load_file, save_file

    from lorafleet_adapters.head import ClassifierHead

    out_dir = tmp_path / "out"
    shutil.copytree(head_out.out_dir, out_dir)
    real_read = ClassifierHead.read.__func__  # type: ignore[attr-defined]

    def read_after_a_change(cls: type[ClassifierHead], directory: Path) -> ClassifierHead:
        if Path(directory) == out_dir:  # the weights change between the checksum check and this read
            tensors = load_file(str(out_dir / HEAD_WEIGHTS_FILE))
            save_file(
                {k: v * 2 for k, v in tensors.items()}, str(out_dir / HEAD_WEIGHTS_FILE), {"format": "lorafleet-head/1"}
            )
        return real_read(cls, directory)  # type: ignore[no-any-return]

    monkeypatch.setattr(ClassifierHead, "read", classmethod(read_after_a_change))
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(AdapterFormatError, match="differs from the file checked against the training record"):
        publish(out_dir, store, tiny_spec)
    assert not store.root.exists()  # refused before the store was touched


def test_require_improvement_needs_the_prompt_only_baseline(
    head_out: Any, tmp_path: Path, tiny_spec: BaseModelSpec
) -> None:
    with pytest.raises(NoImprovement, match="prompt-only base"):
        publish(head_out.out_dir, AdapterStore(tmp_path / "s"), tiny_spec, require_improvement=True)


def test_cli_train_classifier_then_publish(
    tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from lorafleet_server.config import add_server_arguments
    from lorafleet_training.cli import add_publish_arguments, add_train_arguments, run_publish, run_train

    def parser(add: Any) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        add(p)
        add_server_arguments(p)
        return p

    data = write_labelled(tmp_path / "d.jsonl", labelled_rows(8))
    argv = ["--method", "classifier", "--data", str(data), "--adapter", "acme/cli", "--out", str(tmp_path / "out")]
    argv += ["--no-eval-generate", "--keep-data-ref", "--C", "10", "--val-fraction", "0.25"]
    store = AdapterStore(tmp_path / "store")
    assert run_train(parser(add_train_arguments).parse_args(argv), tiny_spec, tiny_model_dir, store) == 0
    record = json.loads((tmp_path / "out" / "lorafleet-training.json").read_text())
    assert record["hyperparameters"]["C"] == 10.0 and record["hyperparameters"]["val_fraction"] == 0.25
    assert record["data"]["path"] == str(data.resolve())
    capsys.readouterr()
    assert run_publish(parser(add_publish_arguments).parse_args([str(tmp_path / "out")]), store, tiny_spec) == 0
    out = capsys.readouterr().out
    assert "published acme/cli@1 (logreg, held-out macro-F1" in out
    assert "forgetting check: a head reads features of the frozen base" in out
    bad = ["--features-from", "acme/x", "--data", str(data), "--adapter", "acme/y", "--out", str(tmp_path / "o2")]
    assert run_train(parser(add_train_arguments).parse_args(bad), tiny_spec, tiny_model_dir, store) == 1
    assert "error: --features-from: for --method classifier only, not --method lora" in capsys.readouterr().err
    # Found by an outside review: one method's flags given to the other were ignored in silence.
    common = ["--data", str(data), "--adapter", "acme/y", "--out", str(tmp_path / "o3")]
    lora_flags = ["--method", "classifier", "--rank", "16", "--lr", "1e-3", "--targets", "all-linear", *common]
    assert run_train(parser(add_train_arguments).parse_args(lora_flags), tiny_spec, tiny_model_dir, store) == 1
    err = capsys.readouterr().err
    assert "error: --rank, --targets, --lr: for --method lora|qlora only, not --method classifier" in err
    assert (
        run_train(parser(add_train_arguments).parse_args(["--C", "2", *common]), tiny_spec, tiny_model_dir, store) == 1
    )
    assert "error: --C: for --method classifier only, not --method lora" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()


def test_the_eval_data_scan_is_recorded_beside_the_training_data_scan(
    tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec
) -> None:
    """--eval-data was scanned (and redacted with --pii redact) but its report was thrown away: the
    record said nothing of the PII in the held-out file (an outside review)."""
    data = write_labelled(tmp_path / "d.jsonl", labelled_rows(4))
    held_out = [*labelled_rows(1), {"text": "mail me at jane.doe@example.com", "label": "account"}]
    eval_data = write_labelled(tmp_path / "eval.jsonl", held_out)
    trained = train_head(tiny_model_dir, tiny_spec, tmp_path / "out", data, eval_data=eval_data, pii="redact")
    assert trained.record["pii_scan"]["findings"] == 0
    scan = trained.record["eval_pii_scan"]
    assert (scan["mode"], scan["findings"], scan["by_kind"]) == ("redact", 1, {"email": 1})
