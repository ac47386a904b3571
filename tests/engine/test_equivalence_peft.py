"""Correctness anchor: each row of a mixed batch equals PEFT with that adapter alone.

See docs/architecture.md, "Multi-LoRA math and kernels".
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from enginelib import Collected, engine_held, generate, request, submit, tiny_service
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.app import make_slot_io
from lorafleet_server.engine.types import TokenEvent
from lorafleet_server.model.cpu import cpu_flags_line
from lorafleet_server.model.loader import load_base
from lorafleet_server.model.native import NativeKernelError, load_native_attention, load_native_linear
from lorafleet_server.model.options import LinearKernel
from lorafleet_server.model.packed import packed_linear_supported
from lorafleet_server.model.runner import ModelRunner, RowStep

ONEDNN_BF16 = packed_linear_supported(torch.bfloat16)
ONEDNN_FP32 = packed_linear_supported(torch.float32)
# csrc/linear_f32.c's kernel runs on a CPU with AVX2 and FMA (its library says so; built at load)
NATIVE_FP32 = {"avx2", "fma"} <= set(cpu_flags_line().split())

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


@pytest.fixture(scope="module")
def small_qv(peft_adapter: Any) -> Path:
    """r=4 on q_proj and v_proj only: a smaller adapter than "all-linear-r16" in every way."""
    return peft_adapter(seed=41, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


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


def _reference_tokens(model: Any, tokenizer: Any, prompt: str, max_new: int = MAX_NEW) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=2, pad_token_id=2)
    return [int(t) for t in out[0, ids.shape[1] :]]


def _served_tokens(sink: Collected) -> list[int]:
    """The engine's tokens as transformers reports them: with the EOS the engine does not emit."""
    got = sink.token_ids
    return [*got, 2] if sink.summary.finish_reason.value == "end_of_sequence" else got


def _last_logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def _tolerance(quantization: str) -> float:
    return 1e-4 if quantization == "none" else 2e-3


def _assert_nf4(model: Any, expected: int) -> None:
    """``model`` really runs a bitsandbytes NF4 base: ``expected`` Linear4bit layers holding NF4 weights."""
    import bitsandbytes as bnb

    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == expected
    assert {cast(Any, m.weight).quant_state.quant_type for m in quantized} == {"nf4"}


@pytest.fixture(scope="module")
def peft_logits(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path]
) -> Callable[[str], tuple[list[list[int]], list[torch.Tensor], list[torch.Tensor]]]:
    """For a quantization: row i's prompt ids (prompt i % 4), the last-token logits [vocab] of PEFT with
    adapter i (row 0: the base alone), and the base's own; computed once per module."""
    memo: dict[str, tuple[list[list[int]], list[torch.Tensor], list[torch.Tensor]]] = {}
    names = list(adapter_dirs)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def get(quantization: str) -> tuple[list[list[int]], list[torch.Tensor], list[torch.Tensor]]:
        if quantization in memo:
            return memo[quantization]
        plain = _peft_reference(tiny_model_dir, None, quantization)
        if quantization == "nf4":
            _assert_nf4(plain, len(_targets(plain)))
        rows = [tokenizer(PROMPTS[i % len(PROMPTS)], add_special_tokens=False).input_ids for i in range(len(names) + 1)]
        base_logits = [_last_logits(plain, ids) for ids in rows]
        expected = [base_logits[0]]
        for i, name in enumerate(names, start=1):
            ref = _peft_reference(tiny_model_dir, adapter_dirs[name], quantization)
            if quantization == "nf4":
                _assert_nf4(ref, len(_targets(plain)))
            expected.append(_last_logits(ref, rows[i]))
        memo[quantization] = rows, expected, base_logits
        return memo[quantization]

    return get


def _targets(model: Any) -> list[Any]:
    from lorafleet_server.model.loader import discover_targets

    return list(discover_targets(model).values())


def _linear_kernel(quantization: str, dtype: str, impl: str) -> LinearKernel:
    """A fixed base Linear per case where it can be (fp32's "auto" is timed at load, so it could take
    either path; so is bf16's native one on a CPU without AMX): bf16
    with a torch LoRA runs oneDNN's prepacked Linears where this torch build has them (not on AVX2-only
    CPUs), with the native LoRA the first that runs (the native AMX Linear where the CPU has AMX; without
    AMX the native AVX-512 BF16 one or oneDNN's, as timed); fp32
    runs the native fp32 Linear with the native LoRA (both skip on a machine without a C compiler;
    F.linear on a CPU without AVX2 and FMA), oneDNN's prepacked Linears with the token LoRA and F.linear
    with the other torch ones; NF4 keeps bitsandbytes' Linears."""
    if quantization != "none":
        return "auto"
    if dtype == "bfloat16":
        return "onednn" if impl != "native" and ONEDNN_BF16 else "auto"
    if impl == "native":
        return "native" if NATIVE_FP32 else "torch"
    return "onednn" if impl == "token" and ONEDNN_FP32 else "torch"


@pytest.mark.parametrize("impl", ["gather", "dense", "token", "grouped", "native", "native+avx512"])
@pytest.mark.parametrize(
    ("quantization", "dtype"),
    [("none", "float32"), ("none", "bfloat16"), pytest.param("nf4", "float32", marks=pytest.mark.slow)],
)
def test_mixed_batch_logits_match_peft(
    impl: str,
    quantization: str,
    dtype: str,
    tiny_model_dir: Path,
    tiny_spec: Any,
    adapter_dirs: dict[str, Path],
    peft_logits: Callable[[str], tuple[list[list[int]], list[torch.Tensor], list[torch.Tensor]]],
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    native_lora: Any,
) -> None:
    """All rows prefill all but their last token in one ragged step, then decode it in one batched step
    (both attention paths, and the base Linears of ``_linear_kernel``; ``native``: the native LoRA,
    attention and layer glue too); each row's logits are PEFT's (fp32) with its own adapter alone:
    exactly in fp32 and NF4, within bf16's rounding in bf16. ``native+avx512``: the native path with the
    AVX-512 BF16 Linear (bf16 on a CPU with avx512_bf16, AMX or not)."""
    if impl == "native+avx512":
        if (quantization, dtype) != ("none", "bfloat16"):
            pytest.skip("the AVX-512 BF16 Linear computes in bf16")
        try:
            load_native_linear(tmp_path_factory.getbasetemp() / "kernels", isa="avx512")
        except NativeKernelError as exc:
            pytest.skip(f"no AVX-512 BF16 Linear here: {exc}")
        impl = "native"
        linear_kernel: LinearKernel = "avx512"
    else:
        linear_kernel = _linear_kernel(quantization, dtype, impl)
    if impl == "native" and native_lora is None:
        pytest.skip("no C compiler on this machine")
    kernels = tmp_path_factory.getbasetemp() / "kernels"
    base = load_base(
        tiny_model_dir,
        quantization=quantization,
        device=torch.device("cpu"),
        num_slots=6,
        max_lora_rank=32,
        dtype=dtype,
        linear_kernel=linear_kernel,
        kernels_dir=tmp_path / "kernels",
    )
    if quantization == "nf4":
        _assert_nf4(base.model, len(base.lora_layers))
        assert all(type(layer.base).__name__ == "Linear4bit" for layer in base.lora_layers.values())
    assert linear_kernel != "avx512" or base.linear_kernel == "native-avx512"
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
        dtype=base.dtype,
        device=torch.device("cpu"),
        lora_impl=impl,
        native_lora=native_lora if impl == "native" else None,
        native_attention=load_native_attention(kernels) if impl == "native" else None,
    )  # type: ignore[arg-type]
    tol = _tolerance(quantization) if dtype == "float32" else 3e-2
    rows, expected, base_logits = peft_logits(quantization)
    for i, want in enumerate(expected[1:], start=1):
        # The adapter moves the logits far beyond the tolerance: a row that lost its LoRA delta
        # (or a reference that did) cannot pass for the adapter's.
        assert (want - base_logits[i]).abs().max() > (100 if dtype == "float32" else 10) * tol, names[i - 1]
    runner.step([RowStep(i, 0, tuple(ids[:-1]), i, False, False) for i, ids in enumerate(rows)])
    out = runner.step([RowStep(i, len(ids) - 1, (ids[-1],), i, True, False) for i, ids in enumerate(rows)])
    for i, want in enumerate(expected):
        torch.testing.assert_close(out.logits[i], want, rtol=1e-4, atol=tol)
        if dtype == "float32":
            assert int(out.logits[i].argmax()) == int(want.argmax())
        # bf16 rounding may swap near-tied tokens; routing shows anyway: the row is nearest its own adapter.
        distances = [float((out.logits[i] - other).abs().max()) for other in expected]
        assert min(range(len(expected)), key=distances.__getitem__) == i


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
            assert _served_tokens(sink) == want, f"{name} on {prompt!r}"
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


# A filler that makes every prompt longer than one 16-token step, so prompts prefill in chunks.
FILLER = " and then the next item on the long list of things to say before the answer"


@pytest.mark.parametrize("impl", ["token", "grouped"])
def test_decode_steps_match_peft_with_one_adapter_in_non_adjacent_rows_and_chunked_prefill(
    impl: str, tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decode_steps = 16
    service = tiny_service(tiny_model_dir, tmp_path / "store", lora_impl=impl, max_step_tokens=16)
    try:
        for adapter in ("peft-default", "all-linear-r16"):
            service.store.import_peft(adapter_dirs[adapter], "acme", adapter, service.base.spec)
        # Rows in admission order: the same adapter in rows 0, 2 and 4, others between them.
        jobs = [
            ("peft-default", PROMPTS[0] + FILLER),
            (None, PROMPTS[1] + FILLER),
            ("peft-default", PROMPTS[2] + FILLER),
            ("all-linear-r16", PROMPTS[3] + FILLER),
            ("peft-default", PROMPTS[3] + FILLER),
        ]
        assert all(len(service.engine.encode_prompt(prompt, ())) > 16 for _, prompt in jobs)
        steps: list[list[RowStep]] = []
        original = service.engine.runner.step

        def step(rows: list[RowStep], **options: Any) -> Any:
            steps.append(list(rows))
            return original(rows, **options)

        monkeypatch.setattr(service.engine.runner, "step", step)
        with engine_held(service.engine):  # all five are admitted together
            sinks = [
                submit(
                    service.engine,
                    request(prompt, adapter=f"acme/{name}" if name else None, max_new_tokens=decode_steps, rid=str(i)),
                )[0]
                for i, (name, prompt) in enumerate(jobs)
            ]
        for sink in sinks:
            sink.wait()
        # The shapes this test is about really happened: prefill chunks beside decode tokens, and
        # decode steps where the adapter's tokens are not next to each other.
        slot_a = service.engine.run(service.engine.adapters.slot_snapshot)[AdapterKey("acme", "peft-default", 1)].slot
        assert any(len(r.token_ids) > 1 for r in steps[0]) and len(steps[0]) == 1  # a 16-token chunk alone
        assert any(
            any(len(r.token_ids) == 1 for r in rows) and any(len(r.token_ids) > 1 for r in rows) for rows in steps
        )
        split = [
            rows
            for rows in steps
            if [r.slot for r in rows if len(r.token_ids) == 1].count(slot_a) >= 2
            and len({r.slot for r in rows if len(r.token_ids) == 1}) >= 3
        ]
        assert split, "no decode step held the adapter in non-adjacent rows"
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        references = {name: _peft_reference(tiny_model_dir, adapter_dirs[name] if name else None) for name, _ in jobs}
        for (name, prompt), sink in zip(jobs, sinks, strict=True):
            want = _reference_tokens(references[name], tokenizer, prompt, decode_steps)
            assert len(want) > 1
            assert _served_tokens(sink) == want, f"{impl}: {name} on {prompt!r}"
            assert sink.summary.adapter == (f"acme/{name}@1" if name else "")
    finally:
        service.engine.shutdown(10)


@pytest.mark.parametrize("impl", ["gather", "auto"])
def test_a_slot_reused_by_a_smaller_adapter_keeps_no_stale_weights(
    impl: str, tiny_model_dir: Path, adapter_dirs: dict[str, Path], small_qv: Path, tmp_path: Path
) -> None:
    """One device slot: r=16 on every Linear, then r=4 on q/v only in the same slot."""
    service = tiny_service(tiny_model_dir, tmp_path / "store", max_loaded_adapters=1, lora_impl=impl)
    engine = service.engine
    try:
        service.store.import_peft(adapter_dirs["all-linear-r16"], "acme", "big", service.base.spec)
        service.store.import_peft(small_qv, "acme", "small", service.base.spec)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        prompt = PROMPTS[1]
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        big = generate(engine, request(prompt, adapter="acme/big", max_new_tokens=MAX_NEW))
        assert {str(k): v.slot for k, v in engine.run(engine.adapters.slot_snapshot).items()} == {"acme/big@1": 1}
        small = generate(engine, request(prompt, adapter="acme/small", max_new_tokens=MAX_NEW))
        assert {str(k): v.slot for k, v in engine.run(engine.adapters.slot_snapshot).items()} == {"acme/small@1": 1}
        # The slot's logits now, read on the engine thread between steps (nothing else runs).
        got = engine.run(lambda: engine.runner.step([RowStep(0, 0, tuple(ids), 1, True, False)]).logits[0])
        ref_small = _peft_reference(tiny_model_dir, small_qv)
        ref_big = _peft_reference(tiny_model_dir, adapter_dirs["all-linear-r16"])
        want = _last_logits(ref_small, ids)
        for other in (_last_logits(ref_big, ids), _last_logits(_peft_reference(tiny_model_dir, None), ids)):
            assert (want - other).abs().max() > 100 * 1e-4  # stale or missing weights cannot pass
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert _served_tokens(small) == _reference_tokens(ref_small, tokenizer, prompt)
        assert _served_tokens(big) == _reference_tokens(ref_big, tokenizer, prompt)
    finally:
        engine.shutdown(10)


def test_unload_while_leased_keeps_running_outputs_and_frees_the_slot_after_the_last_release(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    service = tiny_service(tiny_model_dir, tmp_path / "store", max_loaded_adapters=1)
    engine = service.engine
    try:
        service.store.import_peft(adapter_dirs["peft-default"], "acme", "bot", service.base.spec)
        service.store.import_peft(adapter_dirs["rslora"], "acme", "other", service.base.spec)
        key = AdapterKey("acme", "bot", 1)
        prompt = PROMPTS[0]
        alone = generate(engine, request(prompt, adapter="acme/bot", max_new_tokens=30)).token_ids
        assert len(alone) == 30 and alone != generate(engine, request(prompt, max_new_tokens=30)).token_ids
        views: dict[str, Future[Any]] = {}

        def on_short(event: TokenEvent) -> None:  # engine thread; calls posted here run before the next step
            if event.token_ids and "unload" not in views:
                views["unload"] = engine.call(lambda: engine.adapters.unload(key))
                views["while_leased"] = engine.call(engine.adapters.slot_snapshot)
            if event.final:
                views["after_first_release"] = engine.call(engine.adapters.slot_snapshot)

        with engine_held(engine):  # both start in the same step, so both hold a lease on the slot
            short, _ = submit(
                engine, request(prompt, adapter="acme/bot", max_new_tokens=10, rid="short"), on_event=on_short
            )
            long, _ = submit(engine, request(prompt, adapter="acme/bot", max_new_tokens=30, rid="long"))
        assert short.wait(60).token_ids == alone[:10]
        assert long.wait(60).token_ids == alone  # the unload did not touch the weights it ran on
        assert views["unload"].result(30) is False  # leased: not freed at once
        assert views["while_leased"].result(30)[key].leases == 2
        assert views["after_first_release"].result(30)[key].leases == 1  # one lease left: still resident
        assert engine.run(engine.adapters.slot_snapshot) == {}  # freed when the last lease ended
        assert service.metrics.registry.get_sample_value("lorafleet_adapter_evictions_total", {"tier": "device"}) == 1
        other = generate(engine, request(prompt, adapter="acme/other", max_new_tokens=3))
        assert other.summary.adapter == "acme/other@1"
        assert {str(k) for k in engine.run(engine.adapters.slot_snapshot)} == {"acme/other@1"}
    finally:
        engine.shutdown(10)
