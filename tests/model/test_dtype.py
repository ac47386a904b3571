"""Compute dtype choice, the bf16 quality check, bf16 / compiled LoRA against PEFT (model/loader.py, cpu.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from enginelib import tiny_service
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafleet.convert import model_info_from_proto
from lorafleet_adapters.ref import AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.app import make_slot_io
from lorafleet_server.grpc.convert import model_info_pb
from lorafleet_server.model.cpu import CpuFeatures, cpu_features, parse_cpuinfo
from lorafleet_server.model.loader import (
    QUALITY_CACHE_FILE,
    ModelLoadError,
    QualityCheck,
    cached_bf16_quality,
    choose_compute_dtype,
    load_base,
)
from lorafleet_server.model.packed import PackedLinear, packed_linear_supported
from lorafleet_server.model.runner import ModelRunner, RowStep

AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni sha_ni\n"
AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx fma avx2 sha_ni\n"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
CPU = torch.device("cpu")
PASS = QualityCheck(top1_agreement=1.0, max_logit_diff=0.01, positions=10)
FAIL = QualityCheck(top1_agreement=0.5, max_logit_diff=9.0, positions=10)


def test_cpuinfo_flags_decide_native_bf16() -> None:
    bf16 = parse_cpuinfo(AVX512_BF16)
    assert bf16.native_bf16 and bf16.summary() == "avx2,avx512f,avx512_bf16,avx512_vnni"
    avx2 = parse_cpuinfo(AVX2_ONLY)
    assert not avx2.native_bf16 and avx2.summary() == "avx2"
    assert parse_cpuinfo("processor : 0\nfeatures : fp asimd bf16\n") == CpuFeatures(frozenset())  # not x86
    assert parse_cpuinfo("").summary() == ""
    assert cpu_features(Path("/nonexistent/cpuinfo")) == CpuFeatures(frozenset())
    assert parse_cpuinfo("flags : avx2 amx_bf16 amx_tile\n").native_bf16


def _never() -> QualityCheck:
    raise AssertionError("the quality check must not run here")


def test_auto_is_fp32_without_native_bf16_and_bf16_only_when_the_check_passes() -> None:
    avx2, avx512 = parse_cpuinfo(AVX2_ONLY), parse_cpuinfo(AVX512_BF16)
    choice = choose_compute_dtype("auto", CPU, avx2, _never)
    assert choice.dtype == torch.float32 and "no native bf16" in choice.reason
    choice = choose_compute_dtype("auto", CPU, avx512, lambda: PASS)
    assert choice.dtype == torch.bfloat16 and "passed" in choice.reason
    choice = choose_compute_dtype("auto", CPU, avx512, lambda: FAIL)
    assert choice.dtype == torch.float32 and "check failed" in choice.reason and "0.500" in choice.reason
    assert choose_compute_dtype("auto", torch.device("cuda:0"), avx2, _never).dtype == torch.bfloat16
    assert choose_compute_dtype("float32", CPU, avx512, _never).dtype == torch.float32
    assert choose_compute_dtype("bfloat16", CPU, avx2, _never).dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp16'"):
        choose_compute_dtype("fp16", CPU, avx512, _never)


def test_quality_thresholds() -> None:
    assert PASS.passed and not FAIL.passed
    assert not QualityCheck(top1_agreement=0.89, max_logit_diff=0.1, positions=10).passed
    assert not QualityCheck(top1_agreement=1.0, max_logit_diff=2.5, positions=10).passed


def test_quality_check_runs_once_per_fingerprint(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in tiny_model_dir.iterdir():
        (model_dir / f.name).symlink_to(f)
    check = cached_bf16_quality(model_dir, "fp-1")
    assert check.positions > 20 and 0.0 <= check.top1_agreement <= 1.0
    assert check.max_logit_diff > 0  # bf16 does round: a check comparing fp32 with itself would read 0
    cache = model_dir / QUALITY_CACHE_FILE
    saved = json.loads(cache.read_text())
    assert saved["key"]["fingerprint"] == "fp-1"
    # The cached result is what a second start reads (edited here to tell it from a fresh run) ...
    saved["result"]["top1_agreement"] = 0.25
    cache.write_text(json.dumps(saved))
    assert cached_bf16_quality(model_dir, "fp-1").top1_agreement == 0.25
    # ... and new weights run the check again.
    assert cached_bf16_quality(model_dir, "fp-2") == check


@pytest.fixture(scope="module")
def qv_adapter(peft_adapter: Any) -> Path:
    return peft_adapter(seed=7, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])


def _served_logits(base: Any, adapter: Path, tmp: Path, prompts: list[list[int]]) -> torch.Tensor:
    """Last-token logits [P, vocab] of each prompt with the adapter in slot 1: all but the last token in
    one ragged prefill step, then the last tokens in one batched decode step (both attention paths)."""
    store = AdapterStore(tmp)
    store.import_peft(adapter, "acme", "a", base.spec)
    write, _ = make_slot_io(base.lora_layers)
    write(1, store.load(store.resolve(AdapterRef("acme", "a", None)), base.spec))
    runner = ModelRunner(base.model, base.context, rows=4, max_seq_len=64, dtype=base.dtype, device=CPU)
    runner.step([RowStep(i, 0, tuple(ids[:-1]), 1, False, False) for i, ids in enumerate(prompts)])
    out = runner.step([RowStep(i, len(ids) - 1, (ids[-1],), 1, True, False) for i, ids in enumerate(prompts)])
    return out.logits


def _peft_logits(model_dir: Path, adapter: Path, prompts: list[list[int]]) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter)
    with torch.no_grad():
        return torch.stack([model(torch.tensor([ids])).logits[0, -1].float() for ids in prompts])  # [P, vocab]


def test_bf16_lora_matches_peft_within_tolerance_and_fp32_exactly(
    tiny_model_dir: Path, qv_adapter: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    want = _peft_logits(tiny_model_dir, qv_adapter, prompts)  # [P, vocab]
    kw: dict[str, Any] = {"quantization": "none", "device": CPU, "num_slots": 2, "max_lora_rank": 16}
    # fp32 with F.linear and with oneDNN's prepacked Linears (what "auto" picks where it is timed faster)
    for kernel in ("torch", "onednn") if packed_linear_supported(torch.float32) else ("torch",):
        fp32 = load_base(tiny_model_dir, dtype="float32", linear_kernel=kernel, **kw)
        assert fp32.dtype == torch.float32 and fp32.dtype_reason == "asked for float32"
        assert fp32.linear_kernel == {"torch": "torch", "onednn": "onednn-packed"}[kernel]
        got32 = _served_logits(fp32, qv_adapter, tmp_path / f"s32-{kernel}", prompts)
        torch.testing.assert_close(got32, want, rtol=1e-4, atol=1e-4)
    bf16 = load_base(tiny_model_dir, dtype="bfloat16", **kw)
    assert bf16.dtype == torch.bfloat16
    # bf16 on CPU: the base Linears (and the LM head) compute from prepacked oneDNN weights.
    assert bf16.linear_kernel == ("onednn-packed" if packed_linear_supported(torch.bfloat16) else "torch")
    if bf16.linear_kernel == "onednn-packed":
        model: Any = bf16.model
        assert isinstance(model.lm_head, PackedLinear)
        assert all(isinstance(layer.base, PackedLinear) for layer in bf16.lora_layers.values())
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {layer.lora_a.dtype for layer in bf16.lora_layers.values()} == {torch.bfloat16}
    got = _served_logits(bf16, qv_adapter, tmp_path / "s16", prompts)
    # bf16 keeps 8 mantissa bits: logits within 2e-2 of PEFT fp32 (the adapter moves them by far more),
    # and the greedy token is PEFT's.
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = torch.stack([plain(torch.tensor([ids])).logits[0, -1] for ids in prompts])
    assert (want - base_logits).abs().max() > 0.5
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_load_base_defaults_keep_fp32_on_cpu(tiny_model_dir: Path) -> None:
    base = load_base(tiny_model_dir, quantization="none", device=CPU, num_slots=2, max_lora_rank=8)
    assert base.dtype == torch.float32 and not base.compiled
    assert base.cpu_features == cpu_features().summary()
    flag = load_base(tiny_model_dir, quantization="none", device=CPU, num_slots=2, max_lora_rank=8, dtype="device")
    assert flag.dtype == torch.float32 and flag.dtype_reason.startswith("the device's default")


@pytest.mark.slow
def test_compiled_base_keeps_lora_exact_against_peft(tiny_model_dir: Path, qv_adapter: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    want = _peft_logits(tiny_model_dir, qv_adapter, prompts)
    base = load_base(
        tiny_model_dir, quantization="none", device=CPU, num_slots=2, max_lora_rank=16, dtype="float32", compile=True
    )
    assert base.compiled
    model: Any = base.model
    assert type(model.model.layers[0].mlp).__name__ == "OptimizedModule"
    torch.testing.assert_close(_served_logits(base, qv_adapter, tmp_path / "s", prompts), want, rtol=1e-4, atol=1e-4)


def test_service_reports_the_choice_through_get_model_info(tiny_model_dir: Path, tmp_path: Path) -> None:
    service = tiny_service(tiny_model_dir, tmp_path / "store", dtype="auto", torch_threads=1)
    try:
        info = service.info
        features = cpu_features()
        passes = cached_bf16_quality(tiny_model_dir, service.base.spec.fingerprint).passed
        expected = "bfloat16" if features.native_bf16 and passes else "float32"
        assert info.dtype == expected == str(service.base.dtype).removeprefix("torch.")
        assert info.cpu_features == features.summary() and info.torch_threads == 1 and not info.compiled
        assert info.dtype_reason == service.base.dtype_reason != ""
        seen = model_info_from_proto(model_info_pb(info, 0))
        assert (seen.dtype, seen.dtype_reason, seen.compiled, seen.torch_threads, seen.cpu_features) == (
            info.dtype,
            info.dtype_reason,
            False,
            1,
            info.cpu_features,
        )
        pool = service.base.pool  # the native bf16 Linears' helper pool where they run (every CPU by default)
        assert seen.native_threads == info.native_threads == (pool.threads if pool is not None else 0)
        # decode steps' layers in one C call where every kernel of a layer is native (model/native_layers.py)
        native = info.linear_kernel.startswith("native") and info.attention_kernel == info.lora_kernel == "native"
        assert seen.layers_kernel == info.layers_kernel == ("native" if native else "python")
    finally:
        service.engine.shutdown(10)
