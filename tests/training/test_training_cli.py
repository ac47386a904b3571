from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest
from training_testlib import qa_rows, write_jsonl

from lorafleet_adapters.peft_format import WEIGHTS_FILE, BaseModelSpec
from lorafleet_adapters.ref import AdapterKey
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.config import add_server_arguments
from lorafleet_training.cli import (
    add_publish_arguments,
    add_publish_prompt_arguments,
    add_retrain_arguments,
    add_train_arguments,
    run_publish,
    run_publish_prompt,
    run_stale,
    run_train,
    train_config_from_args,
)
from lorafleet_training.trainer import DEFAULT_TARGETS


def _parser(add: Any) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add(parser)
    add_server_arguments(parser)  # mounted next to the server's options: no clash
    return parser


def test_train_arguments_map_onto_the_config(tmp_path: Path) -> None:
    parser = _parser(add_train_arguments)
    args = parser.parse_args(["--data", "d.jsonl", "--adapter", "acme/x", "--out", "o", "--data-dir", "dd"])
    config = train_config_from_args(args, tmp_path)
    assert (config.method, config.targets, config.pii, config.base_model_dir) == (
        "lora",
        DEFAULT_TARGETS,
        "refuse",
        tmp_path,
    )
    assert args.data_dir == Path("dd") and config.data == Path("d.jsonl")
    args = parser.parse_args(
        [
            "--data",
            "d",
            "--adapter",
            "a/b",
            "--out",
            "o",
            "--method",
            "qlora",
            "--rank",
            "8",
            "--alpha",
            "16",
            "--targets",
            "all-linear",
            "--epochs",
            "2",
            "--lr",
            "1e-3",
            "--seed",
            "7",
            "--pii",
            "redact",
            "--val-fraction",
            "0.2",
            "--batch-size",
            "2",
            "--max-length",
            "256",
        ]
    )
    config = train_config_from_args(args, tmp_path)
    assert (config.method, config.rank, config.alpha, config.targets) == ("qlora", 8, 16.0, ("all-linear",))
    assert (config.epochs, config.lr, config.seed, config.pii) == (2, 1e-3, 7, "redact")
    assert (config.val_fraction, config.batch_size, config.max_length) == (0.2, 2, 256)


def test_run_train_reports_bad_lines_and_fails(
    tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [qa_rows(1)[0], "nope", {"prompt": "p", "completion": 3}])
    args = _parser(add_train_arguments).parse_args(
        ["--data", str(data), "--adapter", "acme/x", "--out", str(tmp_path / "o"), "--no-progress"]
    )
    assert run_train(args, tiny_spec, tiny_model_dir) == 1
    err = capsys.readouterr().err
    assert "line 2: invalid JSON" in err and "line 3: 'completion' must be a string" in err
    assert not (tmp_path / "o").exists()


def test_train_then_publish_then_stale_through_the_cli(
    tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [*qa_rows(6), {"prompt": "Mail", "completion": " x@example.com"}])
    out = tmp_path / "out"
    argv = [
        "--data",
        str(data),
        "--adapter",
        "acme/cli",
        "--out",
        str(out),
        "--rank",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--max-length",
        "64",
        "--val-fraction",
        "0.3",
        "--no-eval-generate",
        "--no-progress",
        "--pii",
        "redact",
    ]
    assert run_train(_parser(add_train_arguments).parse_args(argv), tiny_spec, tiny_model_dir) == 0
    said = capsys.readouterr().out
    assert "1 finding(s)" in said and "epoch 1/1: train loss" in said and "held-out evaluation" in said
    assert (out / WEIGHTS_FILE).is_file()

    store_root = tmp_path / "store"  # the store `lorafleet` opened (--store applied: tests/store/test_store_cli.py)
    args = _parser(add_publish_arguments).parse_args([str(out), "--store", str(store_root)])
    assert run_publish(args, AdapterStore(store_root), tiny_spec) == 0
    assert "published acme/cli@1 (lora, held-out loss" in capsys.readouterr().out
    manifest = AdapterStore(store_root).manifest(AdapterKey("acme", "cli", 1))
    assert manifest.pii_scan is not None and manifest.pii_scan["mode"] == "redact"

    other = BaseModelSpec("sha256:" + "1" * 64, "other", "none", tiny_spec.target_shapes, 64)
    args = _parser(add_publish_arguments).parse_args([str(out), "--as", "acme/again"])
    assert run_publish(args, AdapterStore(store_root), other) == 1
    assert "trained on base" in capsys.readouterr().err

    assert run_stale(argparse.Namespace(store=None), AdapterStore(store_root), other) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"acme/cli@1\tbase {tiny_spec.fingerprint}"
    assert "1 stale version(s)" in captured.err


def test_publish_prompt_from_an_examples_file(
    tmp_path: Path, tiny_spec: BaseModelSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    shots = write_jsonl(
        tmp_path / "shots.jsonl",
        [
            {"messages": [{"role": "user", "content": "Warranty?"}, {"role": "assistant", "content": "10 years."}]},
            {"prompt": "Returns?", "completion": "30 days; write to help@zephyr.example."},
        ],
    )
    store = AdapterStore(tmp_path / "store")
    parser = _parser(add_publish_prompt_arguments)
    args = parser.parse_args(["zephyr/support-prompt", "--system", "Terse.", "--examples", str(shots)])
    assert run_publish_prompt(args, store, tiny_spec) == 1
    assert "email" in capsys.readouterr().err
    args = parser.parse_args(
        ["zephyr/support-prompt", "--system", "Terse.", "--examples", str(shots), "--pii", "redact"]
    )
    assert run_publish_prompt(args, store, tiny_spec) == 0
    assert "published prompt adapter zephyr/support-prompt@1 (4 few-shot turns)" in capsys.readouterr().out
    key = AdapterKey("zephyr", "support-prompt", 1)
    template = store.load_prompt(key)
    assert template.system == "Terse."
    assert [t.content for t in template.examples] == [
        "Warranty?",
        "10 years.",
        "Returns?",
        "30 days; write to [EMAIL].",
    ]
    manifest = store.manifest(key)
    assert manifest.kind == "prompt" and manifest.pii_scan is not None and manifest.pii_scan["findings"] == 1
    template_file = tmp_path / "t.json"
    template_file.write_text(json.dumps({"examples": [{"role": "user", "content": "q"}]}))
    args = parser.parse_args(["zephyr/p2", "--examples", str(template_file)])
    assert run_publish_prompt(args, store, tiny_spec) == 1
    err = capsys.readouterr().err
    assert "'system' must be a non-empty string" in err and "end with an assistant turn" in err


@pytest.mark.parametrize("adder", [add_publish_arguments, add_retrain_arguments])
def test_max_forgetting_must_be_a_fraction_or_inf(adder: Any) -> None:
    """nan passed the gate whatever the forgetting (x > nan is False)."""
    parser = _parser(adder)
    base = ["out"] if adder is add_publish_arguments else ["--stale"]
    assert parser.parse_args([*base, "--max-forgetting", "inf"]).max_forgetting == math.inf
    assert parser.parse_args([*base, "--max-forgetting", "0.05"]).max_forgetting == 0.05
    for bad in ("nan", "-0.1", "lots"):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, "--max-forgetting", bad])


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"system": "Be brief.", "exmaples": []}, "unexpected field 'exmaples'"),
        ({"system": 5, "examples": []}, "system must be a string"),
        ({"system": "Be brief.", "examples": {"role": "user"}}, "examples must be a list"),
    ],
)
def test_publish_prompt_refuses_a_template_object_with_a_wrong_field(
    tmp_path: Path,
    tiny_spec: BaseModelSpec,
    capsys: pytest.CaptureFixture[str],
    document: dict[str, object],
    problem: str,
) -> None:
    """Found by an outside review: a misspelt field was dropped in silence and a template of no turns
    published (a non-string system likewise ignored)."""
    path = tmp_path / "template.json"
    path.write_text(json.dumps(document))
    store = AdapterStore(tmp_path / "store")
    args = _parser(add_publish_prompt_arguments).parse_args(["acme/faq", "--examples", str(path)])
    assert run_publish_prompt(args, store, tiny_spec) == 1
    assert problem in capsys.readouterr().err
    assert not (tmp_path / "store").exists() or store.list() == []


@pytest.mark.parametrize(
    ("out", "flags", "message"),
    [
        # `--out .` staged the output inside the directory; with --overwrite both were deleted
        (".", ["--overwrite"], "is the current directory or holds it"),
        # --overwrite replaced the whole adapter store, or a published version's files
        ("stores", ["--overwrite"], "holds the adapter store"),
        ("stores/adapters/acme/x/versions/1", ["--overwrite"], "is inside the adapter store"),
        # the held-out data wins; the share was ignored, yet written into the record
        ("o", ["--eval-data", "d.jsonl", "--val-fraction", "0.5"], "--eval-data and --val-fraction: give one"),
    ],
)
def test_train_refuses_an_output_it_would_destroy_before_training(
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_spec: BaseModelSpec,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    out: str,
    flags: list[str],
    message: str,
) -> None:
    """Found by an outside review: these ran the whole training, then lost data."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious.txt").write_text("keep me")
    store = AdapterStore(tmp_path / "stores" / "adapters")
    version = store.root / "acme" / "x" / "versions" / "1"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{}")
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(4))
    argv = ["--data", str(data), "--adapter", "acme/x", "--out", str(tmp_path / out) if out != "." else ".", *flags]
    args = _parser(add_train_arguments).parse_args([*argv, "--no-progress"])
    assert run_train(args, tiny_spec, tiny_model_dir, store) == 1
    assert message in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert (version / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "precious.txt", "stores"]


def test_an_output_path_through_dot_dot_is_placed_where_it_resolves(tmp_path: Path) -> None:
    """``--out other/sub/..`` staged beside ``other/sub/..`` inside ``other``, and ``--overwrite``
    deleted ``other`` with the staged output in it. Through a symbolic link (``d/l/..`` with ``d/l ->
    elsewhere/z``) the checks see ``elsewhere``, as the system does, and so does the placing: a lexical
    normalisation placed it over ``d``, the training data with it (the diff review)."""
    from lorafleet_training.publish import check_out_dir, place_output, staging_dir

    (tmp_path / "other" / "sub").mkdir(parents=True)
    (tmp_path / "other" / "old.txt").write_text("replaced")
    out = tmp_path / "other" / "sub" / ".."
    stage = staging_dir(out)
    assert stage.parent == tmp_path
    (stage / "adapter.txt").write_text("trained")
    place_output(stage, out, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["adapter.txt"]
    assert not stage.exists()

    (tmp_path / "d").mkdir()
    (tmp_path / "elsewhere" / "z").mkdir(parents=True)
    (tmp_path / "d" / "train.jsonl").write_text("data")
    (tmp_path / "d" / "l").symlink_to(tmp_path / "elsewhere" / "z")
    linked = tmp_path / "d" / "l" / ".."
    check_out_dir(linked, True, [tmp_path / "d" / "train.jsonl"])  # `elsewhere` holds no input
    stage = staging_dir(linked)
    (stage / "adapter.txt").write_text("trained")
    place_output(stage, linked, overwrite=True)
    assert (tmp_path / "d" / "train.jsonl").read_text() == "data"
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["adapter.txt"]
