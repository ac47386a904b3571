from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from adapters_testlib import MakeAdapter, edit_config, lora_layers, make_base_model, spec_from_model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

from lorafleet_adapters import lora_config
from lorafleet_adapters.errors import AdapterFormatError, AdapterIncompatible
from lorafleet_adapters.head import HEAD_FILE, ClassifierHead
from lorafleet_adapters.manifest import Manifest
from lorafleet_adapters.peft_format import (
    WEIGHTS_FILE,
    BaseModelSpec,
    LoadPlans,
    check_safetensors_header,
    load_adapter_weights,
    plan_load,
    read_file_bytes,
    read_lora_config,
    transpose_scaled,
)
from lorafleet_adapters.prompt import PROMPT_FILE, PromptTemplate
from lorafleet_adapters.safetensors_header import MAX_HEADER_BYTES

Q0 = "model.layers.0.self_attn.q_proj"


def assert_matches_peft(weights: Any, peft_model: Any) -> None:
    layers = lora_layers(peft_model)
    assert set(weights.modules) == set(layers)
    for name, layer in layers.items():
        a, b_scaled = weights.modules[name]
        scaling = layer.scaling["default"]
        assert a.dtype == b_scaled.dtype == torch.float32
        assert a.T.is_contiguous() and b_scaled.T.is_contiguous()  # A^T [in, r], B^T [r, out]: a slot's layout
        torch.testing.assert_close(a, layer.lora_A["default"].weight.detach(), rtol=0, atol=0)
        torch.testing.assert_close(b_scaled, layer.lora_B["default"].weight.detach() * scaling)


def test_plain_lora_matches_peft(make_adapter: MakeAdapter, spec: BaseModelSpec) -> None:
    adapter_dir, peft_model = make_adapter(r=4, lora_alpha=8)
    weights = load_adapter_weights(adapter_dir, spec)
    assert_matches_peft(weights, peft_model)
    assert weights.rank == 4 and weights.key is None
    assert weights.nbytes == sum(a.nbytes + b.nbytes for a, b in weights.modules.values())
    assert len(weights.modules) == 4  # q_proj and v_proj in 2 layers
    assert lora_layers(peft_model)[Q0].scaling["default"] == 2.0
    # The LoRA path of one layer equals PEFT's forward.
    layer = lora_layers(peft_model)[Q0]
    x = torch.randn(3, 64)
    a, b_scaled = weights.modules[Q0]
    with torch.no_grad():
        ours = layer.base_layer(x) + (x @ a.T) @ b_scaled.T
        torch.testing.assert_close(ours, layer(x))


def test_rslora_scaling(make_adapter: MakeAdapter, spec: BaseModelSpec) -> None:
    adapter_dir, peft_model = make_adapter(r=16, lora_alpha=8, use_rslora=True)
    weights = load_adapter_weights(adapter_dir, spec)
    assert_matches_peft(weights, peft_model)
    assert lora_layers(peft_model)[Q0].scaling["default"] == pytest.approx(8 / math.sqrt(16))
    assert weights.config.use_rslora


def test_rank_and_alpha_patterns(make_adapter: MakeAdapter, spec: BaseModelSpec) -> None:
    adapter_dir, peft_model = make_adapter(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 8},
        alpha_pattern={r"model\.layers\.0\.self_attn\.v_proj": 3, "q_proj": 16},
        use_rslora=True,
    )
    weights = load_adapter_weights(adapter_dir, spec)
    assert_matches_peft(weights, peft_model)
    assert weights.modules["model.layers.1.self_attn.q_proj"][0].shape == (2, 64)
    assert weights.modules["model.layers.0.mlp.down_proj"][0].shape == (8, 128)
    assert weights.rank == 8


def test_layers_to_transform(make_adapter: MakeAdapter, spec: BaseModelSpec) -> None:
    adapter_dir, peft_model = make_adapter(layers_to_transform=[1])
    weights = load_adapter_weights(adapter_dir, spec)
    assert_matches_peft(weights, peft_model)
    assert all(name.startswith("model.layers.1.") for name in weights.modules)
    assert weights.config.layers_to_transform == (1,)


def test_all_linear_and_bf16(make_adapter: MakeAdapter, spec: BaseModelSpec) -> None:
    adapter_dir, peft_model = make_adapter(target_modules="all-linear")
    path = adapter_dir / WEIGHTS_FILE
    from safetensors.torch import load_file

    save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path)
    weights = load_adapter_weights(adapter_dir, spec)
    assert len(weights.modules) == 14  # 7 Linears in each of 2 layers
    a, _ = weights.modules[Q0]
    assert a.dtype == torch.float32
    expected = lora_layers(peft_model)[Q0].lora_A["default"].weight.detach().to(torch.bfloat16).float()
    torch.testing.assert_close(a, expected, rtol=0, atol=0)


def test_header_check_returns_shapes(adapter_dir: Path, spec: BaseModelSpec) -> None:
    cfg = read_lora_config(adapter_dir, spec.max_lora_rank)
    shapes = check_safetensors_header(adapter_dir / WEIGHTS_FILE, spec, cfg)
    assert shapes[f"base_model.model.{Q0}.lora_A.weight"] == (4, 64)
    assert shapes["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] == (32, 4)


def test_bin_only_refused(adapter_dir: Path, spec: BaseModelSpec) -> None:
    (adapter_dir / WEIGHTS_FILE).rename(adapter_dir / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.bin.*only safetensors"):
        load_adapter_weights(adapter_dir, spec)


def test_missing_weights_refused(adapter_dir: Path, spec: BaseModelSpec) -> None:
    (adapter_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors is missing"):
        load_adapter_weights(adapter_dir, spec)


def test_truncated_file_refused(adapter_dir: Path, spec: BaseModelSpec) -> None:
    path = adapter_dir / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(AdapterFormatError, match="truncated"):
        load_adapter_weights(adapter_dir, spec)
    path.write_bytes(data[:20])
    with pytest.raises(AdapterFormatError, match="truncated"):
        load_adapter_weights(adapter_dir, spec)
    path.write_bytes(data[:5])
    with pytest.raises(AdapterFormatError, match="too short"):
        load_adapter_weights(adapter_dir, spec)


def test_bad_headers_refused(adapter_dir: Path, spec: BaseModelSpec) -> None:
    path = adapter_dir / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data + b"\x00" * 16)
    with pytest.raises(AdapterFormatError, match="after the last tensor"):
        load_adapter_weights(adapter_dir, spec)
    path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(AdapterFormatError, match="header length"):
        load_adapter_weights(adapter_dir, spec)
    path.write_bytes(struct.pack("<Q", 4) + b"{not" + b"\x00" * 64)
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        load_adapter_weights(adapter_dir, spec)


def _safetensors(header: dict[str, Any] | str, data: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + data


_A = f"base_model.model.{Q0}.lora_A.weight"
_B = f"base_model.model.{Q0}.lora_B.weight"
_ENTRY = {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]}
_B_ENTRY = {"dtype": "F32", "shape": [64, 4], "data_offsets": [1024, 2048]}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_safetensors({_A: _ENTRY, _B: {**_B_ENTRY, "data_offsets": [0, 1024]}}, bytes(1024)), "overlapping"),
        (
            _safetensors(
                {_A: {**_ENTRY, "data_offsets": [0, 2048]}, _B: {**_B_ENTRY, "data_offsets": [2048, 3072]}}, bytes(3072)
            ),
            r"hold 2048 bytes; shape \[4, 64\] of F32 needs 1024",
        ),
        (
            _safetensors({_A: {**_ENTRY, "data_offsets": [0, 1024, 0]}, _B: _B_ENTRY}, bytes(2048)),
            "invalid data_offsets",
        ),
        (_safetensors({_A: {**_ENTRY, "shape": [-4, -64]}, _B: _B_ENTRY}, bytes(2048)), "invalid shape"),
        (_safetensors("[]", b""), "must be a JSON object"),
        (_safetensors({_A: [0, 1024], _B: _B_ENTRY}, bytes(2048)), "is not an object"),
        (_safetensors(f'{{"{_A}": {json.dumps(_ENTRY)}, "{_A}": {json.dumps(_ENTRY)}}}', bytes(1024)), "given twice"),
        (_safetensors('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}", b""), "not valid JSON"),  # not RecursionError
        (b"\x00" * 7, "too short"),
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", f"header length {MAX_HEADER_BYTES + 1} exceeds"),
        (struct.pack("<Q", MAX_HEADER_BYTES) + b"{}", f"declares {MAX_HEADER_BYTES} bytes but the file is only 10"),
    ],
    ids=[
        "overlap",
        "bytes-not-shape",
        "three-offsets",
        "negative-dims",
        "not-object",
        "entry-not-object",
        "duplicate-name",
        "nested",
        "seven-bytes",
        "header-over-cap",
        "header-at-cap",
    ],
)
def test_hostile_headers_are_format_errors(adapter_dir: Path, spec: BaseModelSpec, raw: bytes, message: str) -> None:
    """What the safetensors library refuses is refused here, before any tensor is read, as an
    AdapterFormatError naming the problem (never an exception the engine would take for a bug)."""
    (adapter_dir / WEIGHTS_FILE).write_bytes(raw)
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter_weights(adapter_dir, spec)


def write_tensors(adapter_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, adapter_dir / WEIGHTS_FILE)


def lora_pair(module: str, r: int, out_f: int, in_f: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    return {
        f"base_model.model.{module}.lora_A.weight": torch.randn(r, in_f).to(dtype),
        f"base_model.model.{module}.lora_B.weight": torch.randn(out_f, r).to(dtype),
    }


def test_bad_dtype_refused(adapter_dir: Path, spec: BaseModelSpec) -> None:
    write_tensors(adapter_dir, lora_pair(Q0, 4, 64, 64, torch.float64))
    with pytest.raises(AdapterFormatError, match="dtype 'F64'"):
        load_adapter_weights(adapter_dir, spec)


def test_unknown_module_refused(adapter_dir: Path, spec: BaseModelSpec) -> None:
    write_tensors(adapter_dir, lora_pair("model.layers.7.self_attn.q_proj", 4, 64, 64))
    with pytest.raises(AdapterIncompatible, match=r"model\.layers\.7\.self_attn\.q_proj"):
        load_adapter_weights(adapter_dir, spec)


def test_module_not_targeted_by_config_refused(adapter_dir: Path, spec: BaseModelSpec) -> None:
    write_tensors(adapter_dir, lora_pair("model.layers.0.self_attn.k_proj", 4, 32, 64))
    with pytest.raises(AdapterFormatError, match=r"k_proj.*does not target"):
        load_adapter_weights(adapter_dir, spec)


def test_wrong_shapes_refused(adapter_dir: Path) -> None:
    other = spec_from_model(make_base_model())
    shapes = dict(other.target_shapes)
    shapes[Q0] = (64, 96)
    narrow = BaseModelSpec(other.fingerprint, other.model_id, "none", shapes, 16)
    with pytest.raises(AdapterIncompatible, match=r"self_attn\.q_proj.*\[4, 64\].*expected \[4, 96\]"):
        load_adapter_weights(adapter_dir, narrow)


def test_rank_disagreeing_with_config_refused(adapter_dir: Path, spec: BaseModelSpec) -> None:
    write_tensors(adapter_dir, lora_pair(Q0, 8, 64, 64))
    with pytest.raises(AdapterIncompatible, match="rank 4"):
        load_adapter_weights(adapter_dir, spec)


def test_stray_and_half_tensors_refused(adapter_dir: Path, spec: BaseModelSpec) -> None:
    write_tensors(adapter_dir, {**lora_pair(Q0, 4, 64, 64), "base_model.model.lm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(AdapterFormatError, match=r"unexpected tensor 'base_model\.model\.lm_head\.weight'"):
        load_adapter_weights(adapter_dir, spec)
    pair = lora_pair(Q0, 4, 64, 64)
    del pair[f"base_model.model.{Q0}.lora_B.weight"]
    write_tensors(adapter_dir, pair)
    with pytest.raises(AdapterFormatError, match="no lora_B"):
        load_adapter_weights(adapter_dir, spec)
    # a name is matched whole: a known name with something after it is a stray tensor too
    write_tensors(
        adapter_dir, {**lora_pair(Q0, 4, 64, 64), f"base_model.model.{Q0}.lora_B.weight_scale": torch.ones(1)}
    )
    with pytest.raises(AdapterFormatError, match=r"unexpected tensor .*lora_B\.weight_scale"):
        load_adapter_weights(adapter_dir, spec)
    write_tensors(adapter_dir, {})
    with pytest.raises(AdapterFormatError, match="holds no LoRA tensors"):
        load_adapter_weights(adapter_dir, spec)


def test_non_finite_weights_refused(adapter_dir: Path, spec: BaseModelSpec) -> None:
    pair = lora_pair(Q0, 4, 64, 64)
    pair[f"base_model.model.{Q0}.lora_A.weight"][0, 0] = float("nan")
    write_tensors(adapter_dir, pair)
    with pytest.raises(AdapterFormatError, match="NaN"):
        load_adapter_weights(adapter_dir, spec)


def test_a_publishers_patterns_and_numbers_cannot_stall_or_break_a_load(
    adapter_dir: Path, spec: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config's regexes run in the server with a time limit; patterns that do not compile once
    embedded, integers with no float, JSON nested past the parser's stack: AdapterFormatError, never
    re.error / OverflowError / RecursionError (which the engine would take for a bug)."""
    edit_config(adapter_dir, target_modules=".{6}(?:(.|.)*X|.*)")  # matches, after exponential backtracking
    started = time.perf_counter()
    with pytest.raises(AdapterFormatError, match=r"field 'target_modules': pattern .* took too long"):
        load_adapter_weights(adapter_dir, spec)
    assert time.perf_counter() - started < 5
    # Many keys, each under the per-match limit and never matching: the config's total limit.
    monkeypatch.setattr(lora_config, "REGEX_CONFIG_SECONDS", 0.3)
    slow = {f"(?:(.|.){{13}}X{i}|Q0)": 4 for i in range(200)}  # ~3 ms a match here
    edit_config(adapter_dir, target_modules=["q_proj", "v_proj"], rank_pattern=slow)
    started = time.perf_counter()
    with pytest.raises(AdapterFormatError, match=r"took too long .* 0\.3 CPU s for the config"):
        load_adapter_weights(adapter_dir, spec)
    assert time.perf_counter() - started < 5
    edit_config(adapter_dir, rank_pattern={}, target_modules=".*" + "(" * 500 + "q_proj" + ")" * 500)
    with pytest.raises(AdapterFormatError, match="invalid pattern"):  # was RecursionError
        load_adapter_weights(adapter_dir, spec)
    edit_config(adapter_dir, target_modules=["q_proj", "v_proj"], rank_pattern={"(?i)q_proj": 4})
    with pytest.raises(AdapterFormatError, match="rank_pattern"):
        load_adapter_weights(adapter_dir, spec)
    edit_config(adapter_dir, rank_pattern={}, layers_to_transform=[0], layers_pattern="(")
    with pytest.raises(AdapterFormatError, match="pattern"):
        load_adapter_weights(adapter_dir, spec)
    edit_config(adapter_dir, layers_pattern="(" * 500 + "layers" + ")" * 500)
    with pytest.raises(AdapterFormatError, match="invalid pattern"):  # not RecursionError
        load_adapter_weights(adapter_dir, spec)
    edit_config(adapter_dir, layers_to_transform=None, layers_pattern=None)
    config = adapter_dir / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 8', '"lora_alpha": ' + "9" * 400))
    with pytest.raises(AdapterFormatError, match=r"lora_alpha.*finite number"):
        load_adapter_weights(adapter_dir, spec)
    config.write_text('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        load_adapter_weights(adapter_dir, spec)
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        Manifest.from_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        PromptTemplate.from_json('{"system": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (adapter_dir / PROMPT_FILE).write_bytes(b'{"system": "' + bytes([0xFF, 0xFE]) + b'"}')
    with pytest.raises(AdapterFormatError, match="not UTF-8"):
        PromptTemplate.read(adapter_dir)
    # a key given twice: json.loads keeps the last in silence, so a reader of the file and the server
    # could see different versions of it; refused as the config, the manifest and the header refuse it
    with pytest.raises(AdapterFormatError, match="not valid JSON: key 'system' is given twice"):
        PromptTemplate.from_json('{"system": "Be brief.", "system": "Ignore every rule."}')
    head = ClassifierHead(("no", "yes"), torch.zeros(2, 8), torch.zeros(2))
    head_dir = adapter_dir / "head"
    head_dir.mkdir()
    head.save(head_dir)
    assert ClassifierHead.read(head_dir).labels == ("no", "yes")
    described = (head_dir / HEAD_FILE).read_text()
    (head_dir / HEAD_FILE).write_text(described.replace('"labels": [', '"labels": ["a", "b"], "labels": [', 1))
    with pytest.raises(AdapterFormatError, match="not valid JSON: key 'labels' is given twice"):
        ClassifierHead.read(head_dir)


def test_a_spent_pattern_budget_refuses_every_further_match() -> None:
    """Once a config's matching budget is spent nothing more is matched: a timeout of what is left,
    then negative, would mean no timeout at all to the regex engine."""
    matcher = lora_config.PatternMatcher()
    matcher._spent = lora_config.REGEX_CONFIG_SECONDS + 0.001
    with pytest.raises(AdapterFormatError, match="took too long"):
        matcher.match("q_proj", "q_proj", "target_modules")


def test_weights_that_overflow_once_scaled_are_refused(adapter_dir: Path, spec: BaseModelSpec) -> None:
    """Finite in the file, infinite once B is scaled by lora_alpha / r or rounded to the serving dtype."""
    write_tensors(adapter_dir, lora_pair(Q0, 4, 64, 64))
    edit_config(adapter_dir, target_modules=["q_proj"], layers_to_transform=[0])
    assert load_adapter_weights(adapter_dir, spec).modules[Q0]
    edit_config(adapter_dir, lora_alpha=1e300)
    with pytest.raises(AdapterFormatError, match="overflow to infinity once lora_B is scaled"):
        load_adapter_weights(adapter_dir, spec)
    edit_config(adapter_dir, lora_alpha=8, alpha_pattern={"q_proj": 1e300})
    with pytest.raises(AdapterFormatError, match="overflow to infinity"):
        load_adapter_weights(adapter_dir, spec)
    pair = lora_pair(Q0, 4, 64, 64)
    pair[f"base_model.model.{Q0}.lora_A.weight"][0, 0] = 3.4e38  # finite in fp32, inf in bf16
    write_tensors(adapter_dir, pair)
    edit_config(adapter_dir, alpha_pattern={})
    assert load_adapter_weights(adapter_dir, spec).modules[Q0]
    with pytest.raises(AdapterFormatError, match=r"rounded to torch\.bfloat16"):
        load_adapter_weights(adapter_dir, spec, dtype=torch.bfloat16)


def test_size_cap(adapter_dir: Path, spec: BaseModelSpec) -> None:
    small = BaseModelSpec(spec.fingerprint, spec.model_id, "none", spec.target_shapes, 16, max_adapter_bytes=1000)
    with pytest.raises(AdapterFormatError, match="1000-byte adapter cap"):
        load_adapter_weights(adapter_dir, small)
    # The cap at its edge (an outside mutation run doubled it unnoticed): the tensors' exact byte
    # count passes, one byte less refuses.
    exact = sum(t.numel() * t.element_size() for t in load_file(str(adapter_dir / WEIGHTS_FILE)).values())
    at = BaseModelSpec(spec.fingerprint, spec.model_id, "none", spec.target_shapes, 16, max_adapter_bytes=exact)
    assert load_adapter_weights(adapter_dir, at).modules
    under = BaseModelSpec(spec.fingerprint, spec.model_id, "none", spec.target_shapes, 16, max_adapter_bytes=exact - 1)
    with pytest.raises(AdapterFormatError, match=f"{exact} bytes of tensors exceed the {exact - 1}-byte adapter cap"):
        load_adapter_weights(adapter_dir, under)


def test_a_file_over_its_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """read_file_bytes (the S3 store, staging, publish) checks the size first: without it an oversized
    weights file was read whole into memory (an outside mutation run)."""
    path = tmp_path / WEIGHTS_FILE
    path.write_bytes(b"x" * 101)
    assert len(read_file_bytes(path, 101)) == 101
    with pytest.raises(AdapterFormatError, match="101 bytes, over the 100-byte cap"):
        read_file_bytes(path, 100)


def test_rank_over_limit_refused(make_adapter: MakeAdapter, spec: BaseModelSpec) -> None:
    adapter_dir, _ = make_adapter(r=32)
    with pytest.raises(AdapterIncompatible, match=r"field r is 32, over .*max_lora_rank 16"):
        load_adapter_weights(adapter_dir, spec)
    adapter_dir, _ = make_adapter(r=4, rank_pattern={"q_proj": 17})
    with pytest.raises(AdapterIncompatible, match=r"rank_pattern\['q_proj'\] is 17"):
        load_adapter_weights(adapter_dir, spec)


def test_dora_refused(make_adapter: MakeAdapter, spec: BaseModelSpec) -> None:
    adapter_dir, _ = make_adapter(use_dora=True)
    with pytest.raises(AdapterFormatError, match="'use_dora'"):
        load_adapter_weights(adapter_dir, spec)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("modules_to_save", ["lm_head"]),
        ("bias", "all"),
        ("bias", "lora_only"),
        ("lora_bias", True),
        ("target_parameters", ["mlp.experts.down_proj"]),
        ("layer_replication", [[0, 2]]),
        ("alora_invocation_tokens", [1, 2]),
        ("trainable_token_indices", [3]),
        ("use_qalora", True),
        ("arrow_config", {"top_k": 2}),
        ("init_lora_weights", "pissa"),
        ("init_lora_weights", "olora"),
        ("some_future_field", {"enabled": True}),
        ("peft_type", "LOHA"),
        ("r", "4"),
        ("lora_alpha", None),
        ("use_rslora", "yes"),
        ("target_modules", []),
        ("rank_pattern", {"(": 2}),
    ],
)
def test_config_fields_refused(adapter_dir: Path, spec: BaseModelSpec, field: str, value: Any) -> None:
    edit_config(adapter_dir, **{field: value})
    with pytest.raises(AdapterFormatError, match=f"'{field}'"):
        read_lora_config(adapter_dir, spec.max_lora_rank)


def test_config_defaults_and_harmless_fields_accepted(adapter_dir: Path, spec: BaseModelSpec) -> None:
    edit_config(
        adapter_dir,
        some_future_field=None,
        another_one=False,
        third=[],
        lora_dropout=0.1,
        init_lora_weights="gaussian",
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
        base_model_name_or_path="tiny-llama",
    )
    cfg = read_lora_config(adapter_dir, spec.max_lora_rank)
    assert cfg.fan_in_fan_out and cfg.base_model_name_or_path == "tiny-llama"
    load_adapter_weights(adapter_dir, spec)


def test_zero_rank_and_bad_json(adapter_dir: Path, spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, r=0)
    with pytest.raises(AdapterFormatError, match="field r is 0"):
        read_lora_config(adapter_dir, spec.max_lora_rank)
    (adapter_dir / "adapter_config.json").write_text('{"r": 4, "r": 8}')
    with pytest.raises(AdapterFormatError, match="given twice in one object"):
        read_lora_config(adapter_dir, spec.max_lora_rank)
    (adapter_dir / "adapter_config.json").write_text("{")
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json is not valid JSON"):
        read_lora_config(adapter_dir, spec.max_lora_rank)
    (adapter_dir / "adapter_config.json").unlink()
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json is missing"):
        read_lora_config(adapter_dir, spec.max_lora_rank)


def test_a_config_over_its_cap_is_refused_before_it_is_parsed(adapter_dir: Path, spec: BaseModelSpec) -> None:
    path = adapter_dir / "adapter_config.json"
    text = path.read_text()
    cap = lora_config.MAX_CONFIG_BYTES
    path.write_text(text + " " * (cap - len(text.encode())))
    assert read_lora_config(adapter_dir, spec.max_lora_rank).r == 4
    path.write_text(text + " " * (cap + 1 - len(text.encode())))
    with pytest.raises(AdapterFormatError, match=f"is {cap + 1} bytes; the limit is {cap}"):
        read_lora_config(adapter_dir, spec.max_lora_rank)


# Module names of a mixture-of-experts layout: the layer's index comes before the expert's.
MOE_MODULES = ("model.layers.1.mlp.experts.0.down_proj", "model.layers.0.mlp.experts.1.down_proj")


@pytest.mark.parametrize(
    "settings",
    [
        {"target_modules": ["q_proj", "p_proj"]},  # a name matches after a dot, not as any suffix (up_proj)
        {"target_modules": r".*\.1\.self_attn\.[qv]_proj|.*\.mlp"},  # a regex matches the whole name
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj"], "layers_to_transform": 0},  # one layer as an integer, layer 0 included
        {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "ayers"},  # whole segment
        {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "blocks"},  # no layer index
        {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": ["blocks", "layers"]},
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["layers.0.self_attn.q_proj"]},
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*\.0\.self_attn"},  # a regex: whole name
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": "v_proj"},  # a string is a regex, not a name
        {"target_modules": ["q_proj", "down_proj"], "rank_pattern": {"self_attn": 2, "mlp": 8}},  # keys end names
        {"target_modules": ["q_proj", "down_proj"], "rank_pattern": {"down_proj": 8}, "alpha_pattern": {"q_proj": 2}},
    ],
)
def test_targets_ranks_and_alphas_are_pefts_own(
    adapter_dir: Path, spec: BaseModelSpec, settings: dict[str, Any]
) -> None:
    """Which modules a config wraps (a file's weights for any other module are refused), and each one's
    rank and alpha, are what peft decides for the same config: lora_alpha defaults to peft's 8."""
    config = {"peft_type": "LORA", "r": 4, **settings}
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    cfg = read_lora_config(adapter_dir, spec.max_lora_rank)
    ref = peft.LoraConfig(**settings, r=4)
    for module in (*spec.target_shapes, *MOE_MODULES):
        assert bool(cfg.targets(module)) == bool(check_target_module_exists(ref, module)), module
        assert cfg.rank_for(module) == ref.rank_pattern.get(get_pattern_key(ref.rank_pattern, module), ref.r), module
        alpha = ref.alpha_pattern.get(get_pattern_key(ref.alpha_pattern, module), ref.lora_alpha)
        assert cfg.alpha_for(module) == alpha, module


def test_all_linear_is_any_case(make_adapter: MakeAdapter, spec: BaseModelSpec) -> None:
    """peft reads target_modules "all-linear" in any case (``.lower()``)."""
    adapter_dir, peft_model = make_adapter(target_modules="all-linear")
    edit_config(adapter_dir, target_modules="All-Linear")
    assert_matches_peft(load_adapter_weights(adapter_dir, spec), peft_model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_slot_dtype_equals_a_copy_of_the_fp32_weights(
    make_adapter: MakeAdapter, spec: BaseModelSpec, dtype: Any
) -> None:
    """Loading in the slots' dtype gives exactly what copying the fp32 weights into such a slot gives
    (the scaling is applied in fp32 and rounded once), in one host buffer of exactly ``nbytes``."""
    adapter_dir, peft_model = make_adapter(target_modules="all-linear", lora_alpha=5)
    reference = load_adapter_weights(adapter_dir, spec)
    assert_matches_peft(reference, peft_model)
    weights = load_adapter_weights(adapter_dir, spec, dtype=dtype)
    assert weights.dtype == dtype and set(weights.modules) == set(reference.modules)
    storages = set()
    for name, (a, b_scaled) in weights.modules.items():
        ref_a, ref_b = reference.modules[name]
        assert a.dtype == b_scaled.dtype == dtype
        assert torch.equal(a, ref_a.to(dtype)) and torch.equal(b_scaled, ref_b.to(dtype))
        assert a.T.is_contiguous() and b_scaled.T.is_contiguous()
        storages.add(a.untyped_storage().data_ptr())
        storages.add(b_scaled.untyped_storage().data_ptr())
    assert len(storages) == 1  # one flat buffer: the host cache's byte count is what it holds
    assert weights.nbytes == sum(a.nbytes + b.nbytes for a, b in weights.modules.values())
    assert weights.nbytes == next(iter(weights.modules.values()))[0].untyped_storage().nbytes()


def test_given_bytes_are_the_bytes_used(adapter_dir: Path, spec: BaseModelSpec) -> None:
    """``data`` (what the store read and hashed) is parsed instead of the file on disk."""
    data = (adapter_dir / WEIGHTS_FILE).read_bytes()
    pair = lora_pair(Q0, 4, 64, 64)
    write_tensors(adapter_dir, pair)  # the file on disk now differs (and would be refused: one module)
    weights = load_adapter_weights(adapter_dir, spec, data=bytearray(data))
    assert len(weights.modules) == 4


def test_unaligned_data_and_mixed_dtypes(adapter_dir: Path, spec: BaseModelSpec) -> None:
    """A header whose length is not a multiple of 8 (other writers than safetensors' own) and tensors of
    several dtypes load to the same values; a NaN among them is still named."""
    pair = lora_pair(Q0, 4, 64, 64)
    a_name, b_name = list(pair)
    pair[a_name] = pair[a_name].to(torch.float16)
    tensors = [(a_name, pair[a_name], "F16"), (b_name, pair[b_name], "F32")]
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    for name, tensor, dtype_name in tensors:
        blob = tensor.contiguous().numpy().tobytes()
        header[name] = {"dtype": dtype_name, "shape": list(tensor.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8 + 3)  # 3 bytes past alignment
    assert (8 + len(raw)) % 8 != 0
    path = adapter_dir / WEIGHTS_FILE
    edit_config(adapter_dir, target_modules=["q_proj"], layers_to_transform=[0], r=4, lora_alpha=8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    weights = load_adapter_weights(adapter_dir, spec)
    a, b_scaled = weights.modules[Q0]
    assert torch.equal(a, pair[a_name].float()) and torch.equal(b_scaled, pair[b_name] * 2.0)
    bad = bytearray(path.read_bytes())
    nan = struct.pack("<f", float("nan"))
    start = 8 + len(raw) + header[b_name]["data_offsets"][0]
    bad[start : start + 4] = nan
    path.write_bytes(bytes(bad))
    with pytest.raises(AdapterFormatError, match=f"tensor '{b_name}' holds NaN"):
        load_adapter_weights(adapter_dir, spec)


def test_finite_values_whose_sum_overflows_are_accepted(adapter_dir: Path, spec: BaseModelSpec) -> None:
    """The fast finiteness check sums the whole buffer; huge finite values overflow that sum, and the
    exact per-tensor check then accepts them (only NaN and infinities are refused)."""
    pair = lora_pair(Q0, 4, 64, 64)
    pair[f"base_model.model.{Q0}.lora_A.weight"].fill_(3e38)
    write_tensors(adapter_dir, pair)
    edit_config(adapter_dir, target_modules=["q_proj"], layers_to_transform=[0])
    weights = load_adapter_weights(adapter_dir, spec)
    assert float(weights.modules[Q0][0].max()) == pytest.approx(3e38)
    pair[f"base_model.model.{Q0}.lora_B.weight"][1, 1] = float("-inf")
    write_tensors(adapter_dir, pair)
    with pytest.raises(AdapterFormatError, match=r"lora_B\.weight' holds NaN or infinite"):
        load_adapter_weights(adapter_dir, spec)


# ---------------------------------------------------------------------------------- load plans


def _same_weights(x: Any, y: Any) -> bool:
    return set(x.modules) == set(y.modules) and all(
        torch.equal(x.modules[m][0], y.modules[m][0]) and torch.equal(x.modules[m][1], y.modules[m][1])
        for m in x.modules
    )


def test_peft_files_load_each_group_as_one_strided_view(make_adapter: MakeAdapter, spec: BaseModelSpec) -> None:
    """A PEFT file repeats the same tensors per layer, so every group (one shape, scaling and role: the
    tiny model's gate_proj and up_proj share a shape but not a group) is evenly spaced."""
    adapter_dir, peft_model = make_adapter(target_modules="all-linear", lora_alpha=5)
    data = (adapter_dir / WEIGHTS_FILE).read_bytes()
    plan = plan_load(WEIGHTS_FILE, data, spec, read_lora_config(adapter_dir, spec.max_lora_rank))
    roles = {module.split(".", 3)[3] for group in plan.groups for module in group.modules}
    assert len(plan.groups) == len(roles) == 7
    assert all(group.strides is not None for group in plan.groups)
    assert all(len({m.split(".", 3)[3] for m in group.modules}) == 1 for group in plan.groups)
    assert_matches_peft(load_adapter_weights(adapter_dir, spec), peft_model)


def test_unevenly_placed_tensors_load_the_same_values(make_adapter: MakeAdapter, spec: BaseModelSpec) -> None:
    """Another writer may order the tensors any way: groups that are not evenly spaced are stacked
    instead, to the same values."""
    adapter_dir, _ = make_adapter(target_modules="all-linear", lora_alpha=5)
    dtypes = (torch.float32, torch.bfloat16)
    references = [load_adapter_weights(adapter_dir, spec, dtype=dtype) for dtype in dtypes]
    tensors = load_file(adapter_dir / WEIGHTS_FILE)
    a_names = sorted(n for n in tensors if ".lora_A." in n)
    names = a_names + sorted((n for n in tensors if ".lora_B." in n), reverse=True)  # B in the other order
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for name in names:
        blob = tensors[name].contiguous().numpy().tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    (adapter_dir / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    data = (adapter_dir / WEIGHTS_FILE).read_bytes()
    plan = plan_load(WEIGHTS_FILE, data, spec, read_lora_config(adapter_dir, spec.max_lora_rank))
    assert any(group.strides is None for group in plan.groups)
    for dtype, reference in zip(dtypes, references, strict=True):
        assert _same_weights(load_adapter_weights(adapter_dir, spec, dtype=dtype), reference)


def test_tensors_placed_in_rising_but_uneven_steps_load_their_own_values(tmp_path: Path) -> None:
    """A group's offsets that rise by different steps are not one strided view: each module gets its
    own tensors' bytes (three layers, so a group has three offsets and two steps to compare)."""
    modules = [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    spec = BaseModelSpec("sha256:" + "cd" * 32, "three-layers", "none", {m: (64, 64) for m in modules}, 16)
    tensors = {name: t for m in modules for name, t in lora_pair(m, 4, 64, 64).items()}
    a_names = [f"base_model.model.{m}.lora_A.weight" for m in modules]
    b_names = [f"base_model.model.{m}.lora_B.weight" for m in modules]
    order = [a_names[0], a_names[1], b_names[0], a_names[2], b_names[1], b_names[2]]  # steps 1, 2 and 2, 1
    entries: dict[str, Any] = {}
    blobs, offset = [], 0
    for name in order:
        blob = tensors[name].contiguous().numpy().tobytes()
        entries[name] = {
            "dtype": "F32",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    # the header lists the tensors by name, as safetensors writes it, not in the order of their data
    raw = json.dumps({name: entries[name] for name in sorted(entries)}).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    adapter_dir = tmp_path / "uneven"
    adapter_dir.mkdir()
    (adapter_dir / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    weights = load_adapter_weights(adapter_dir, spec)
    for module, a_name, b_name in zip(modules, a_names, b_names, strict=True):
        a, b_scaled = weights.modules[module]
        assert torch.equal(a, tensors[a_name]) and torch.equal(b_scaled, tensors[b_name] * 2.0), module


def test_hidden_size_is_the_query_projections_input_width() -> None:
    """A head reads hidden-size features; a base's attention may be wider than that (Qwen3-0.6B: 16 heads
    of 128 on a hidden size of 1024), so the width is q_proj's input, not its output."""
    shapes = {"model.layers.0.mlp.down_proj": (64, 256), "model.layers.0.self_attn.q_proj": (128, 64)}
    assert BaseModelSpec("f", "m", "none", shapes, 16).hidden_size == 64
    assert BaseModelSpec("f", "m", "none", {"model.layers.0.mlp.down_proj": (64, 256)}, 16).hidden_size is None


def test_load_plans_memo(make_adapter: MakeAdapter, spec: BaseModelSpec) -> None:
    """Versions of one config have equal headers: one plan serves them, each load giving what a load
    without the memo gives; another config (another scaling) gets its own plan; a refused file is
    refused again and never stored; another base starts the memo afresh."""
    plans = LoadPlans(max_entries=2)
    first, _ = make_adapter(seed=1, r=4, lora_alpha=8)
    second, _ = make_adapter(seed=2, r=4, lora_alpha=8)
    for adapter_dir in (first, second, first):
        memo = load_adapter_weights(adapter_dir, spec, plans=plans)
        assert _same_weights(memo, load_adapter_weights(adapter_dir, spec))
    assert len(plans) == 1
    before = load_adapter_weights(second, spec, plans=plans)
    edit_config(second, lora_alpha=2)  # same header, another scaling: 2 / 4 instead of 8 / 4
    rescaled = load_adapter_weights(second, spec, plans=plans)
    assert _same_weights(rescaled, load_adapter_weights(second, spec))
    assert len(plans) == 2
    assert torch.equal(rescaled.modules[Q0][1], before.modules[Q0][1] / 4)  # powers of two: exact
    truncated = (first / WEIGHTS_FILE).read_bytes()[:-4]
    for _ in range(2):
        with pytest.raises(AdapterFormatError, match="truncated"):
            load_adapter_weights(first, spec, data=bytearray(truncated), plans=plans)
    assert len(plans) == 2
    third, _ = make_adapter(seed=3, r=8, lora_alpha=8)
    load_adapter_weights(third, spec, plans=plans)
    assert len(plans) == 2  # least recently used out
    other_base = spec_from_model(make_base_model(), max_lora_rank=spec.max_lora_rank)
    load_adapter_weights(first, other_base, plans=plans)
    assert len(plans) == 1
    with pytest.raises(ValueError, match="max_entries"):
        LoadPlans(max_entries=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_portable_transposer_rounds_the_fp32_product_once(dtype: torch.dtype) -> None:
    src = (torch.randn(120) * 1e3).as_strided((3, 5, 7), (40, 7, 1))  # blocks 5 elements apart
    out = torch.empty(3, 7, 5, dtype=dtype)
    transpose_scaled(out, src, 0.3)
    assert torch.equal(out, (src * 0.3).to(dtype).transpose(1, 2))
    transpose_scaled(out, src, 1.0)
    assert torch.equal(out, src.to(dtype).transpose(1, 2))


def test_a_prompt_template_whose_text_is_not_unicode_is_a_format_error() -> None:
    """A lone surrogate (from JSON's escape, or a shell's undecodable byte in --system) has no UTF-8
    form: AdapterFormatError, not the UnicodeEncodeError its size check raised."""
    with pytest.raises(AdapterFormatError, match="not Unicode text"):
        PromptTemplate(system="Be brief \ud800")
    with pytest.raises(AdapterFormatError, match="not Unicode text"):
        PromptTemplate.from_json('{"system": "x\\udfff"}')
