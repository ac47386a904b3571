"""The base-model loader's pieces that serving and training share (lorafleet_server.model.loader)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from lorafleet_server.model.loader import (
    ModelLoadError,
    attention_window,
    compute_dtype_for,
    discover_targets,
    load_hf_model,
    quantization_config,
    read_model_config,
    resolve_device,
)
from lorafleet_server.model.prepare import ModelPrepareError


def test_compute_dtype_is_fp32_on_cpu_and_bf16_on_cuda() -> None:
    assert compute_dtype_for(torch.device("cpu")) == torch.float32
    assert compute_dtype_for(torch.device("cuda:0")) == torch.bfloat16
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected


def test_quantization_config_nf4_int8_and_nothing_else() -> None:
    nf4 = quantization_config("nf4", torch.float32)
    assert nf4.load_in_4bit and not nf4.load_in_8bit
    assert nf4.bnb_4bit_quant_type == "nf4"
    assert nf4.bnb_4bit_compute_dtype == torch.float32
    assert nf4.bnb_4bit_use_double_quant is False
    assert quantization_config("nf4", torch.bfloat16).bnb_4bit_compute_dtype == torch.bfloat16
    int8 = quantization_config("int8", torch.float32)
    assert int8.load_in_8bit and not int8.load_in_4bit
    for name in ("none", "auto", "fp8"):
        with pytest.raises(ModelLoadError, match="no bitsandbytes config"):
            quantization_config(name, torch.float32)


def test_load_hf_model_frozen_in_the_compute_dtype_unless_told(tiny_model_dir: Path) -> None:
    cpu = torch.device("cpu")
    model = load_hf_model(tiny_model_dir, "none", cpu)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in model.parameters())
    assert len(discover_targets(model)) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    bf16 = load_hf_model(tiny_model_dir, "none", cpu, torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_load_hf_model_refuses_an_unresolved_quantization(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="no bitsandbytes config for quantization 'auto'"):
        load_hf_model(tiny_model_dir, "auto", torch.device("cpu"))


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
        {"rope_scaling": {"type": "dynamic", "factor": 2.0}},  # the older key
        {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
        {"rope_parameters": {"full_attention": {"rope_type": "dynamic", "rope_theta": 1e4}}},  # per layer type
    ],
)
def test_ropes_that_depend_on_the_batch_are_refused(tmp_path: Path, rope: dict[str, object]) -> None:
    """Dynamic NTK rescales the frequencies from the longest position of each forward: a short row's
    logits moved by 2e-4 beside a long one on a tiny model."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **rope}))
    with pytest.raises(ModelLoadError, match=r"RoPE scaling '(dynamic|longrope)' is not supported"):
        read_model_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_scaling": {"rope_type": "linear"}}))
    assert read_model_config(tmp_path)["model_type"] == "llama"


def test_attention_window() -> None:
    assert attention_window({"model_type": "llama"}) is None
    assert attention_window({"model_type": "mistral", "sliding_window": 4096}) == 4096
    assert attention_window({"model_type": "mistral", "sliding_window": None}) is None
    assert attention_window({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}) is None
    qwen = {"model_type": "qwen2", "sliding_window": 64, "use_sliding_window": True, "num_hidden_layers": 4}
    assert attention_window({**qwen, "max_window_layers": 2}) == 64
    assert attention_window({**qwen, "max_window_layers": 4}) is None  # HF windows no layer of it
    layers = ["full_attention", "sliding_attention"]
    assert attention_window({"model_type": "qwen2", "sliding_window": 64, "layer_types": layers}) == 64
    assert attention_window({"model_type": "qwen2", "sliding_window": 64, "layer_types": layers[:1]}) is None


def test_the_int8_cast_warning_is_said_once_not_per_call(caplog: pytest.LogCaptureFixture) -> None:
    from lorafleet_server.model.loader import quiet_int8_cast_warning

    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    before = list(bnb_log.filters)
    try:
        quiet_int8_cast_warning()
        quiet_int8_cast_warning()  # one filter, however many loads
        assert len(bnb_log.filters) == len(before) + 1
        with caplog.at_level(logging.WARNING, logger=bnb_log.name):
            for _ in range(3):  # what MatMul8bitLt logs on every call
                bnb_log.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "bf16")
            bnb_log.warning("something else")
        assert [r.getMessage() for r in caplog.records if r.name == bnb_log.name] == ["something else"]
    finally:
        bnb_log.filters[:] = before


def test_the_prompt_format_follows_the_tokenizer_and_chat_template_not_the_weights(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from lorafleet_server.model.loader import base_spec_from_files
    from lorafleet_server.model.prepare import prompt_format_fingerprint

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    spec = base_spec_from_files(model, "none", 16)
    assert spec.prompt_format == prompt_format_fingerprint(tiny_model_dir) != ""
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 7}))
    tok = json.loads((model / "tokenizer.json").read_text())
    (model / "tokenizer.json").write_text(json.dumps({**tok, "truncation": {"max_length": 9}}))
    assert prompt_format_fingerprint(model) == spec.prompt_format  # runtime settings: the same prompts
    # the template kept in tokenizer_config.json instead (the transformers 4 layout): the same format
    template = model / "chat_template.jinja"
    moved = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**moved, "chat_template": template.read_text()}))
    template.rename(tmp_path / "template.jinja")
    assert prompt_format_fingerprint(model) == spec.prompt_format
    (tmp_path / "template.jinja").rename(template)
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    changed = base_spec_from_files(model, "none", 16)
    assert changed.prompt_format != spec.prompt_format
    assert changed.fingerprint == spec.fingerprint  # the weights are the same
    (model / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelPrepareError, match=r"tokenizer\.json is not readable JSON"):
        prompt_format_fingerprint(model)
