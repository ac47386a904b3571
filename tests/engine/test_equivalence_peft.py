"""Correctness anchor: each row of a mixed batch equals PEFT with that adapter alone.

See docs/architecture.md, "Multi-LoRA math and kernels".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from enginelib import generate, request, submit, tiny_service
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafleet_adapters.ref import AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.app import make_slot_io
from lorafleet_server.model.loader import load_base
from lorafleet_server.model.runner import ModelRunner, RowStep

# Different ranks, alphas, target subsets, rsLoRA, per-module patterns and a layer subset.
ADAPTERS: dict[str, dict[str, Any]] = {
    "peft-default": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "all-linear-r16": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["o_proj", "down_proj"]},
    "patterns": {
        "r": 8,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj"],
        "rank_pattern": {"q_proj": 2, "up_proj": 12},
        "alpha_pattern": {"v_proj": 32},
        "layers_to_transform": [1],
    },
}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
MAX_NEW = 10


@pytest.fixture(scope="module")
def adapter_dirs(peft_adapter: Any) -> dict[str, Path]:
    return {name: peft_adapter(seed=i + 1, **cfg) for i, (name, cfg) in enumerate(ADAPTERS.items())}


def _store_with(tmp: Path, spec: Any, dirs: dict[str, Path]) -> AdapterStore:
    store = AdapterStore(tmp)
    for name, d in dirs.items():
        store.import_peft(d, "acme", name, spec)
    return store


def _peft_reference(base_dir: Path, adapter_dir: Path | None, quantization: str = "none") -> Any:
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        kwargs["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def _reference_tokens(model: Any, tokenizer: Any, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2, pad_token_id=2)
    return [int(t) for t in out[0, ids.shape[1] :]]


@pytest.mark.parametrize("impl", ["gather", "dense", "token", "grouped"])
@pytest.mark.parametrize("quantization", ["none", pytest.param("nf4", marks=pytest.mark.slow)])
def test_mixed_batch_logits_match_peft(
    impl: str, quantization: str, tiny_model_dir: Path, tiny_spec: Any, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    base = load_base(
        tiny_model_dir, quantization=quantization, device=torch.device("cpu"), num_slots=6, max_lora_rank=32
    )
    store = _store_with(tmp_path / "store", base.spec, adapter_dirs)
    write, _ = make_slot_io(base.lora_layers)
    names = list(adapter_dirs)
    for slot, name in enumerate(names, start=1):
        weights = store.load(store.resolve(AdapterRef("acme", name, None)), base.spec)
        write(slot, weights)
    runner = ModelRunner(
        base.model,
        base.context,
        rows=8,
        max_seq_len=64,
        dtype=torch.float32,
        device=torch.device("cpu"),
        lora_impl=impl,
    )  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # Row i: prompt i % 4 with adapter slot i (0 = base); all in one ragged forward.
    rows, expected = [], []
    for i in range(len(names) + 1):
        ids = tokenizer(PROMPTS[i % len(PROMPTS)], add_special_tokens=False).input_ids
        rows.append(RowStep(i, 0, tuple(ids), i, True, False))
        ref = _peft_reference(tiny_model_dir, adapter_dirs[names[i - 1]] if i else None, quantization)
        with torch.no_grad():
            expected.append(ref(torch.tensor([ids])).logits[0, -1].float())
    out = runner.step(rows)
    for i, want in enumerate(expected):
        torch.testing.assert_close(out.logits[i], want, rtol=1e-4, atol=1e-4 if quantization == "none" else 2e-3)
        assert int(out.logits[i].argmax()) == int(want.argmax())


@pytest.mark.parametrize(
    ("impl", "quantization"),
    [("gather", "none"), ("auto", "none"), pytest.param("auto", "nf4", marks=pytest.mark.slow)],
)
def test_engine_mixed_batch_greedy_tokens_match_peft_alone(
    impl: str, quantization: str, tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    service = tiny_service(tiny_model_dir, tmp_path / "store", lora_impl=impl, quantization=quantization)
    try:
        for name, d in adapter_dirs.items():
            service.store.import_peft(d, "acme", name, service.base.spec)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        jobs = []
        for i, prompt in enumerate(PROMPTS):
            for name in [None, *adapter_dirs]:
                ref = f"acme/{name}" if name else None
                req = request(prompt, adapter=ref, max_new_tokens=MAX_NEW, rid=f"{i}-{name}")
                jobs.append((prompt, name, submit(service.engine, req)[0]))
        references: dict[str | None, Any] = {}
        for prompt, name, sink in jobs:
            sink.wait()
            if name not in references:
                references[name] = _peft_reference(tiny_model_dir, adapter_dirs[name] if name else None, quantization)
            want = _reference_tokens(references[name], tokenizer, prompt)
            got = sink.token_ids
            if sink.summary.finish_reason.value == "end_of_sequence":
                got = [*got, 2]
            assert got == want, f"{name} on {prompt!r}"
            assert sink.summary.adapter == (f"acme/{name}@1" if name else "")
    finally:
        service.engine.shutdown(10)


def test_base_rows_are_unchanged_by_adapters_in_the_batch(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    service = tiny_service(tiny_model_dir, tmp_path / "store")
    try:
        service.store.import_peft(adapter_dirs["all-linear-r16"], "acme", "big", service.base.spec)
        alone = generate(service.engine, request(PROMPTS[0], max_new_tokens=MAX_NEW)).token_ids
        mixed = [
            submit(service.engine, request(PROMPTS[0], adapter="acme/big", max_new_tokens=MAX_NEW))[0] for _ in range(3)
        ]
        base = submit(service.engine, request(PROMPTS[0], max_new_tokens=MAX_NEW))[0]
        assert base.wait().token_ids == alone
        assert all(m.wait().token_ids != alone for m in mixed)
    finally:
        service.engine.shutdown(10)
