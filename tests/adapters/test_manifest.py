from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorafleet_adapters.errors import AdapterFormatError, AdapterIncompatible
from lorafleet_adapters.manifest import Manifest, built_for, check_servable, sha256_file
from lorafleet_adapters.peft_format import BaseModelSpec


def sample(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "schema_version": 1,
        "tenant": "acme",
        "name": "support",
        "version": 3,
        "kind": "lora",
        "method": "qlora",
        "base_fingerprint": "sha256:" + "0" * 64,
        "base_model": "tiny-llama",
        "base_quantization": "nf4",
        "rank": 8,
        "lora_alpha": 16,
        "use_rslora": False,
        "target_modules": ["v_proj", "q_proj"],
        "files": {"adapter_config.json": "a" * 64, "adapter_model.safetensors": "b" * 64},
        "created_at": "2026-11-29T01:54:00Z",
        "producer": "lorafleet 0.1.0",
        "training_data_fingerprint": "sha256:" + "1" * 64,
        "eval_metrics": {"loss": 1.25, "base_loss": 2},
        "pii_scan": {"findings": 0, "scanner": "regex-v1"},
    }
    fields.update(changes)
    return fields


def test_round_trip() -> None:
    manifest = Manifest.from_json(json.dumps(sample()))
    assert manifest.target_modules == ("q_proj", "v_proj")
    assert manifest.lora_alpha == 16.0 and isinstance(manifest.lora_alpha, float)
    assert manifest.eval_metrics["base_loss"] == 2.0
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert json.loads(manifest.to_json())["files"]["adapter_model.safetensors"] == "b" * 64


def test_optional_fields_default() -> None:
    data = sample()
    for key in ("training_data_fingerprint", "eval_metrics", "pii_scan"):
        del data[key]
    manifest = Manifest.from_json(json.dumps(data))
    assert manifest.training_data_fingerprint is None and manifest.pii_scan is None
    assert dict(manifest.eval_metrics) == {}


def test_mappings_are_read_only() -> None:
    manifest = Manifest.from_json(json.dumps(sample()))
    with pytest.raises(TypeError):
        manifest.files["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"schema_version": 2}, "schema_version"),
        ({"version": 0}, "version"),
        ({"tenant": "../x"}, "tenant"),
        ({"kind": "prefix"}, "kind"),
        ({"method": "dora"}, "method"),
        ({"rank": "8"}, "rank"),
        ({"rank": 0}, "rank"),
        ({"use_rslora": 1}, "use_rslora"),
        ({"files": {"../etc/passwd": "a" * 64}}, "files"),
        ({"files": {"sub/x": "a" * 64}}, "files"),
        ({"files": {"x": "not-hex"}}, "files"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"eval_metrics": {"loss": "low"}}, "eval_metrics"),
        ({"pii_scan": "clean"}, "pii_scan"),
        ({"base_fingerprint": ""}, "base_fingerprint"),
        # survivors of an outside mutation run: a digest with trailing junk, alpha inf or 400 digits
        # (to_json then failed INTERNAL), a prompt manifest with a rank
        ({"files": {"x": "a" * 64 + "x"}}, "files"),
        ({"files": {"x": "a" * 65}}, "files"),
        ({"lora_alpha": float("inf")}, "lora_alpha"),
        ({"lora_alpha": 10**400}, "lora_alpha"),
        ({"kind": "prompt", "method": "prompt", "rank": 8}, "kind 'prompt' has method 'prompt' and rank 0"),
        ({"kind": "head", "method": "logreg", "rank": 8}, "kind 'head'"),
        ({"files": {".": "a" * 64}}, "files"),  # the version directory itself
        ({"files": {"-x": "a" * 64}}, "files"),
        ({"schema_version": 0}, "schema_version"),
        ({"target_modules": ["q_proj", 1]}, "target_modules"),
        ({"lora_alpha": True}, "lora_alpha"),
        ({"producer": ""}, "producer"),
    ],
)
def test_bad_fields_refused(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(AdapterFormatError, match=field):
        Manifest.from_json(json.dumps(sample(**changes)))


def test_missing_unknown_and_bad_json() -> None:
    data = sample()
    del data["rank"]
    with pytest.raises(AdapterFormatError, match=r"lacks required fields \['rank'\]"):
        Manifest.from_json(json.dumps(data))
    with pytest.raises(AdapterFormatError, match="unknown fields"):
        Manifest.from_json(json.dumps(sample(extra_thing=1)))
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        Manifest.from_json("{")
    with pytest.raises(AdapterFormatError, match="JSON object"):
        Manifest.from_json("[]")
    # a key given twice: json.loads keeps the last in silence, so a reader of the file and the server
    # could see different versions of it (the adapter config and the weights' header refuse it too)
    text = json.dumps(sample())
    twice = text.replace('"rank": ', '"rank": 64, "rank": ', 1)
    with pytest.raises(AdapterFormatError, match="not valid JSON: key 'rank' is given twice"):
        Manifest.from_json(twice)
    nested = text.replace('"files": {', '"files": {"adapter_config.json": "' + "c" * 64 + '", ', 1)
    with pytest.raises(AdapterFormatError, match=r"key 'adapter_config\.json' is given twice"):
        Manifest.from_json(nested)


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


BASE = "sha256:" + "0" * 64
OTHER_BASE = "sha256:" + "9" * 64


def base_spec(**changes: Any) -> BaseModelSpec:
    fields: dict[str, Any] = {
        "fingerprint": BASE,
        "model_id": "tiny-llama",
        "quantization": "nf4",
        "target_shapes": {},
        "max_lora_rank": 16,
        "prompt_format": "sha256:" + "5" * 64,
    }
    fields.update(changes)
    return BaseModelSpec(**fields)


HEAD = {"kind": "head", "method": "logreg", "rank": 0}
PROMPT = {"kind": "prompt", "method": "prompt", "rank": 0}


def test_built_for_is_the_same_weights_and_prompt_format_and_for_a_head_the_same_quantization() -> None:
    spec = base_spec()
    lora = Manifest.from_json(json.dumps(sample(base_prompt_format=spec.prompt_format)))
    assert built_for(lora, spec)
    assert built_for(lora, base_spec(quantization="none"))  # a LoRA is served on any quantization of its base
    assert not built_for(lora, base_spec(fingerprint=OTHER_BASE))
    assert not built_for(lora, base_spec(prompt_format="sha256:" + "6" * 64))
    assert built_for(lora, base_spec(prompt_format=""))  # a side that does not know its format passes
    head = Manifest.from_json(json.dumps(sample(**HEAD)))
    assert built_for(head, spec)
    assert not built_for(head, base_spec(quantization="none"))


def test_servable_refuses_heads_of_other_bases_and_any_kind_of_another_prompt_format() -> None:
    spec = base_spec()
    head = Manifest.from_json(json.dumps(sample(**HEAD)))
    check_servable("acme/support@3", head, spec)
    with pytest.raises(AdapterIncompatible, match="was built for base"):
        check_servable("acme/support@3", head, base_spec(fingerprint=OTHER_BASE))
    with pytest.raises(AdapterIncompatible, match="fitted on the features of the nf4 base"):
        check_servable("acme/support@3", head, base_spec(quantization="none"))
    lora = Manifest.from_json(json.dumps(sample()))
    check_servable("acme/support@3", lora, base_spec(quantization="none"))
    # a prompt version has no weights: any base with its prompt format serves it
    prompt = Manifest.from_json(json.dumps(sample(**PROMPT, base_prompt_format="sha256:" + "6" * 64)))
    check_servable("acme/support@3", prompt, base_spec(fingerprint=OTHER_BASE, prompt_format="sha256:" + "6" * 64))
    for manifest in (prompt, Manifest.from_json(json.dumps(sample(**HEAD, base_prompt_format="sha256:" + "6" * 64)))):
        with pytest.raises(AdapterIncompatible, match="another tokenizer or chat template"):
            check_servable("acme/support@3", manifest, spec)
