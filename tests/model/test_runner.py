"""Our ragged-batch forward with its own KV cache equals the HF model's forward."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafleet_server.model.lora import LoraContext
from lorafleet_server.model.native import (
    NativeAttention,
    choose_attention,
    find_compiler,
    load_native_attention,
    load_native_pool,
)
from lorafleet_server.model.runner import ModelRunner, RowStep

CPU = torch.device("cpu")


@pytest.fixture(params=["torch", "native"])
def attention(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> NativeAttention | None:
    """Both attention paths of the runner: torch's matmuls (None) and the native kernel."""
    if request.param == "torch":
        return None
    if find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    return load_native_attention(tmp_path_factory.getbasetemp() / "kernels")


def test_ragged_prefill_chunks_and_decode_match_hf(tiny_model_dir: Path, attention: NativeAttention | None) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(
        model,
        LoraContext(),
        rows=4,
        max_seq_len=64,
        dtype=torch.float32,
        device=torch.device("cpu"),
        native_attention=attention,
    )
    a = [5, 17, 33, 9, 100, 2, 7]
    b = [11, 12, 13]
    with torch.no_grad():
        ref_a = model(torch.tensor([a])).logits[0]
        ref_b = model(torch.tensor([[*b, 50]])).logits[0]
    # a's prompt in two chunks (the second attends to the cached first), b whole, then decode both.
    out = runner.step([RowStep(0, 0, tuple(a[:4]), 0, True, False), RowStep(2, 0, tuple(b), 0, True, False)])
    torch.testing.assert_close(out.logits[0], ref_a[3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits[1], ref_b[2], rtol=1e-4, atol=1e-4)
    out = runner.step([RowStep(0, 4, tuple(a[4:6]), 0, True, False)])
    torch.testing.assert_close(out.logits[0], ref_a[5], rtol=1e-4, atol=1e-4)
    out = runner.step([RowStep(0, 6, (a[6],), 0, True, False), RowStep(2, 3, (50,), 0, True, True)])
    torch.testing.assert_close(out.logits[0], ref_a[6], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits[1], ref_b[3], rtol=1e-4, atol=1e-4)
    assert out.pooled.shape == (1, model.config.hidden_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reused_logits_are_the_fresh_ones_in_one_buffer(tiny_model_dir: Path, dtype: torch.dtype) -> None:
    """``step(reuse_logits=True)``: the fresh fp32 logits in the LM head's dtype (bf16 widens to them
    exactly), written into one buffer the runner keeps (each step's a view of it: the engine samples
    them before its next step); ``greedy_tokens`` of them is the fresh logits' argmax."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    runners = [ModelRunner(model, LoraContext(), rows=3, max_seq_len=32, dtype=dtype, device=CPU) for _ in range(2)]
    a, b = (5, 17, 33, 9), (11, 12)
    steps = [
        [RowStep(0, 0, a, 0, True, False), RowStep(1, 0, b, 0, True, False)],
        [RowStep(0, len(a), (40,), 0, True, False)],
        [RowStep(0, len(a) + 1, (41,), 0, True, False), RowStep(1, len(b), (42,), 0, True, False)],
    ]
    storage = set()
    for rows in steps:
        fresh = runners[0].step(rows).logits
        reused = runners[1].step(rows, reuse_logits=True).logits
        assert reused.dtype == dtype and reused.shape == fresh.shape == (len(rows), model.config.vocab_size)
        assert torch.equal(reused.float(), fresh)
        assert runners[1].greedy_tokens(reused) == fresh.max(-1).indices.tolist()
        storage.add(reused.untyped_storage().data_ptr())
    assert len(storage) == 1, "each step allocated its own logits"


def test_pooled_hidden_state_is_the_final_norm_output(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(model, LoraContext(), rows=2, max_seq_len=32, dtype=torch.float32, device=torch.device("cpu"))
    ids = [3, 4, 5, 6]
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0]  # [4, hidden]
    out = runner.step([RowStep(1, 0, tuple(ids), 0, False, True)])
    torch.testing.assert_close(out.pooled[0], hidden.sum(0), rtol=1e-4, atol=1e-4)
    assert out.logits.numel() == 0


def test_garbage_in_unused_kv_positions_cannot_leak_into_batched_decode(
    tiny_model_dir: Path, attention: NativeAttention | None
) -> None:
    """Rows of different lengths share one batched decode; masked tail positions may hold NaN."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(
        model,
        LoraContext(),
        rows=3,
        max_seq_len=32,
        dtype=torch.float32,
        device=torch.device("cpu"),
        native_attention=attention,
    )
    for t in (*runner.kv.k, *runner.kv.v):
        t.fill_(float("nan"))
    short, long = [7, 8], [1, 2, 3, 4, 5, 6, 9]
    runner.step([RowStep(0, 0, tuple(short), 0, True, False), RowStep(2, 0, tuple(long), 0, True, False)])
    out = runner.step([RowStep(0, 2, (11,), 0, True, False), RowStep(2, 7, (12,), 0, True, False)])
    with torch.no_grad():
        ref_short = model(torch.tensor([[*short, 11]])).logits[0, -1]
        ref_long = model(torch.tensor([[*long, 12]])).logits[0, -1]
    torch.testing.assert_close(out.logits[0], ref_short, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits[1], ref_long, rtol=1e-4, atol=1e-4)


def test_a_failed_step_leaves_its_positions_unclean(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step marks its positions written before the forward; a forward that failed left them counted
    clean while they still held what torch.empty left (NaN here), and the next request in that KV row
    decoded NaN through the masked tail (0 x NaN)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(model, LoraContext(), rows=2, max_seq_len=64, dtype=torch.float32, device=torch.device("cpu"))
    for t in (*runner.kv.k, *runner.kv.v):
        t.fill_(float("nan"))
    forward = runner._forward

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runner, "_forward", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        runner.step([RowStep(1, 0, tuple(range(1, 21)), 0, True, False)])
    monkeypatch.setattr(runner, "_forward", forward)
    runner.step([RowStep(1, 0, (7, 8), 0, True, False)])  # the row's next request
    out = runner.step([RowStep(1, 2, (11,), 0, True, False)])
    with torch.no_grad():
        ref = model(torch.tensor([[7, 8, 11]])).logits[0, -1]
    torch.testing.assert_close(out.logits[0], ref, rtol=1e-4, atol=1e-4)


def test_kv_rows_are_cleaned_ahead_but_only_written_positions_can_be_read(tiny_model_dir: Path) -> None:
    """ensure_clean zeroes a block ahead (once per CLEAN_AHEAD positions, not once per decode step), and
    the prefix cache still cannot copy a zeroed, never written position as if it were the row's."""
    from lorafleet_server.model.runner import CLEAN_AHEAD

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(model, LoraContext(), rows=2, max_seq_len=96, dtype=torch.float32, device=torch.device("cpu"))
    for t in (*runner.kv.k, *runner.kv.v):
        t.fill_(float("nan"))
    runner.step([RowStep(0, 0, (7, 8), 0, True, False), RowStep(1, 0, (1, 2, 3, 4, 5), 0, True, False)])
    runner.step([RowStep(0, 2, (11,), 0, True, False), RowStep(1, 5, (12,), 0, True, False)])
    end = min(96, 3 + CLEAN_AHEAD)  # row 0 was cleaned from its written end (3) on, a block at once
    for t in (*runner.kv.k, *runner.kv.v):
        assert torch.isfinite(t[0, :, :end]).all()
        assert torch.isnan(t[0, :, end:]).all()
    k, _ = runner.kv.read(0, 0, 3)
    assert k.shape[2] == 3 and torch.isfinite(k).all()
    with pytest.raises(ValueError, match="not written"):
        runner.kv.read(0, 0, 4)
    # Row 1 held 6 positions of its last sequence; the next sequence to take it has written none yet.
    runner.kv.begin(1)
    with pytest.raises(ValueError, match="not written"):
        runner.kv.read(1, 0, 1)
    runner.step([RowStep(1, 0, (9, 10), 0, True, False)])
    assert runner.kv.read(1, 0, 2)[0].shape[2] == 2
    with pytest.raises(ValueError, match="not written"):
        runner.kv.read(1, 0, 3)  # written by the sequence before, not by this one


def test_the_kv_cache_copies_a_rows_positions_in_every_layer_and_nothing_else() -> None:
    """The slabs are views of one tensor, and a row's positions in all layers are copied in, copied out
    and zeroed in one op each (3cdb8d6): each layer gets its own part, no other row or position moves,
    a copy out is independent of the cache, and K/V of any other shape is refused (it would broadcast)."""
    from lorafleet_server.model.runner import CLEAN_AHEAD, KVCache

    layers, rows, kv_heads, length, head_dim = 3, 4, 2, 16, 8
    kv = KVCache(layers, rows, kv_heads, length, head_dim, torch.float32, torch.device("cpu"))
    assert all(t.is_contiguous() and t.shape == (rows, kv_heads, length, head_dim) for t in (*kv.k, *kv.v))
    for t in (*kv.k, *kv.v):
        t.fill_(float("nan"))
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(layers, kv_heads, 5, head_dim, generator=gen)  # [layers, KVH, n, D]
    v = torch.randn(layers, kv_heads, 5, head_dim, generator=gen)
    kv.write(2, 3, k, v)
    for i in range(layers):
        torch.testing.assert_close(kv.k[i][2, :, 3:8], k[i], rtol=0, atol=0)
        torch.testing.assert_close(kv.v[i][2, :, 3:8], v[i], rtol=0, atol=0)
        assert (kv.k[i][2, :, :3] == 0).all()  # below the write: cleaned, so finite
        assert torch.isnan(kv.k[i][[0, 1, 3]]).all()  # other rows untouched
    got_k, got_v = kv.read(2, 3, 8)
    torch.testing.assert_close(got_k, k, rtol=0, atol=0)
    kv.k[0][2].zero_()
    assert torch.equal(got_k, k) and torch.equal(got_v, v)  # a copy, not a view of the cache
    kv.ensure_clean(1, 4)
    for t in (*kv.k, *kv.v):
        assert (t[1, :, : min(length, CLEAN_AHEAD)] == 0).all()
    # one layer too few, one KV head (it would broadcast to both), a narrower head, an extra dimension
    for bad in (k[:2], k[:, :1], k[..., :4], k[..., None]):
        with pytest.raises(ValueError, match="do not fit"):
            kv.write(0, 0, bad, v)
        with pytest.raises(ValueError, match="do not fit"):
            kv.write(0, 0, k, bad)
    with pytest.raises(ValueError, match="do not fit"):  # both one KV head: it broadcast before (the review)
        kv.write(0, 0, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="do not fit"):
        kv.write(0, 14, k, v)  # past the end of the row
    assert torch.isnan(kv.k[0][0]).all()  # nothing written by a refused call


@pytest.mark.parametrize(
    ("kv_rows", "window_is_view"),
    [((3, 1, 2), True), ((2, 0, 3, 1), True), ((7, 0), False), ((6, 1, 3), True)],
    ids=["dense-unordered", "full", "sparse-gathered", "holes"],
)
def test_token_rows_in_any_kv_rows_and_order_match_hf(
    tiny_model_dir: Path, kv_rows: tuple[int, ...], window_is_view: bool, attention: NativeAttention | None
) -> None:
    """Decode rows read their K/V in place (a window of the slab) or gathered; either way, in any order
    and with unused rows of NaN inside the window, each row gets its own sequence's logits."""
    from lorafleet_server.model.runner import _AttentionPlan

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(
        model,
        LoraContext(),
        rows=8,
        max_seq_len=32,
        dtype=torch.float32,
        device=torch.device("cpu"),
        native_attention=attention,
    )
    for t in (*runner.kv.k, *runner.kv.v):
        t.fill_(float("nan"))
    prompts = [[5 + i, 9, 2 * i + 1, 40][: 2 + i % 3] for i in range(len(kv_rows))]
    runner.step([RowStep(row, 0, tuple(p), 0, False, False) for row, p in zip(kv_rows, prompts, strict=True)])
    steps = [
        RowStep(row, len(p), (60 + i,), 0, True, False) for i, (row, p) in enumerate(zip(kv_rows, prompts, strict=True))
    ]
    assert (_AttentionPlan.build(steps, torch.device("cpu"), 32).gather is None) == window_is_view
    out = runner.step(steps)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = model(torch.tensor([[*p, 60 + i]])).logits[0, -1]
            torch.testing.assert_close(out.logits[i], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_llama_family_architectures_match_hf(arch: str, attention: NativeAttention | None) -> None:
    """Any Llama-family base works: Qwen2 (q/k/v biases), Mistral, Llama; targets are discovered."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafleet_server.model.loader import discover_targets

    cfg = AutoConfig.for_model(
        arch,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    names = {n.rsplit(".", 1)[-1] for n in discover_targets(model)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    runner = ModelRunner(
        model,
        LoraContext(),
        rows=2,
        max_seq_len=32,
        dtype=torch.float32,
        device=torch.device("cpu"),
        native_attention=attention,
    )
    ids = [3, 9, 27, 81, 4]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    out = runner.step([RowStep(0, 0, tuple(ids[:4]), 0, True, False)])
    torch.testing.assert_close(out.logits[0], ref[3], rtol=1e-4, atol=1e-4)
    out = runner.step([RowStep(0, 4, (ids[4],), 0, True, False)])
    torch.testing.assert_close(out.logits[0], ref[4], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def server_attention(tmp_path_factory: pytest.TempPathFactory) -> NativeAttention | None:
    """The attention the server runs here by default (``--attention-kernel auto``): the native kernel
    where a C compiler is found, else None (torch's matmuls)."""
    kernels = tmp_path_factory.mktemp("kernels")
    return choose_attention(  # SmolLM2-135M's heads
        "auto", cache_dir=kernels, heads=9, kv_heads=3, head_dim=64, dtype=torch.bfloat16, device=CPU
    ).kernel


def _server_bf16_base(model_dir: Path, kernels_dir: Path) -> Any:
    """The default model in bf16 with the base Linears the server runs here (native AMX or AVX-512 BF16
    on such CPUs)."""
    from lorafleet_server.model.loader import load_base

    return load_base(
        model_dir,
        quantization="none",
        device=CPU,
        num_slots=1,
        max_lora_rank=8,
        dtype="bfloat16",
        kernels_dir=kernels_dir,
    )


def test_a_bf16_row_decodes_the_same_alone_and_beside_other_rows(
    default_model_dir: Path, server_attention: NativeAttention | None, tmp_path: Path
) -> None:
    """Batch invariance in bf16: a row's logits do not depend on which other rows share the step. A lone
    token runs as two identical rows because torch's one-row matmul (a GEMV) rounds differently. (fp32
    does not promise this: MKL's fp32 GEMM picks kernels by the row count.)"""
    base = _server_bf16_base(default_model_dir, tmp_path)
    runner = ModelRunner(
        base.model,
        base.context,
        rows=8,
        max_seq_len=64,
        dtype=torch.bfloat16,
        device=CPU,
        native_attention=server_attention,
    )
    prompts = [tuple(range(300 + 7 * i, 320 + 9 * i)) for i in range(4)]
    for copy in (0, 4):  # rows 0-3 decode alone, rows 4-7 the same sequences beside each other
        runner.step([RowStep(copy + i, 0, p, 0, False, False) for i, p in enumerate(prompts)])
    for t in range(3):
        together = runner.step(
            [RowStep(4 + i, len(p) + t, (40 + t,), 0, True, False) for i, p in enumerate(prompts)]
        ).logits
        for i, p in enumerate(prompts):
            alone = runner.step([RowStep(i, len(p) + t, (40 + t,), 0, True, False)]).logits[0]
            assert torch.equal(together[i], alone), (t, i)


def test_a_one_token_prompt_chunk_after_a_cached_prefix_equals_the_whole_prefill(
    default_model_dir: Path, server_attention: NativeAttention | None, tmp_path: Path
) -> None:
    """After a prefix-cache hit the rest of a prompt may be one token; it attends as a prompt chunk, so
    the first generated token's logits are bit for bit those of the prompt prefilled whole (bf16), with
    the attention and base Linears the server runs here. (torch's matmuls and oneDNN's Linears do not
    promise it on a CPU with AMX: oneDNN picks its bf16 kernel by the row count; the native kernels
    do; docs/architecture.md, "Measured facts" 11 and 13.)"""
    base = _server_bf16_base(default_model_dir, tmp_path)
    runner = ModelRunner(
        base.model,
        base.context,
        rows=2,
        max_seq_len=64,
        dtype=torch.bfloat16,
        device=CPU,
        native_attention=server_attention,
    )
    prompt = tuple(range(500, 533))  # 33 tokens: two 16-token blocks cached, one left
    whole = runner.step([RowStep(0, 0, prompt, 0, True, False, prompt=True)]).logits[0]
    k, v = runner.kv.read(0, 0, 32)  # what the prefix cache keeps
    runner.kv.write(1, 0, k, v)
    rest = runner.step([RowStep(1, 32, prompt[32:], 0, True, False, prompt=True)]).logits[0]
    assert torch.equal(rest, whole)


def test_decode_key_length_is_rounded_up_to_a_bucket_within_the_kv_rows() -> None:
    from lorafleet_server.model.runner import DECODE_LEN_BUCKET, decode_len

    assert DECODE_LEN_BUCKET == 16
    assert [decode_len(n, 40) for n in (0, 1, 16, 17, 32, 33, 40)] == [0, 16, 16, 32, 32, 40, 40]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_rope_and_norms_agree_with_torchs(
    dtype: torch.dtype, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the native kernel the runner also takes its RoPE + K/V write, its residual add + RMSNorm and
    its MLP's SiLU times up (``fused_glue``): prefill and decode logits stay within fp32 rounding of
    torch's ops in fp32; in bf16 the RoPE is torch's bit for bit and a norm's or SiLU's output moves by
    one bf16 step where its fp32 value rounds differently, so the logits agree to bf16's resolution.
    The same kernel on a helper pool gives the same logits bit for bit."""
    if find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    kernel = load_native_attention(tmp_path_factory.getbasetemp() / "kernels")
    calls: list[str] = []

    def counted(name: str) -> Callable[..., Any]:
        fn = getattr(kernel, name)

        def call(*args: Any) -> Any:
            calls.append(name)
            return fn(*args)

        return call

    for name in ("rope_kv_", "add_rmsnorm_", "silu_mul"):
        monkeypatch.setattr(kernel, name, counted(name))
    kernels = kernel.library.parent
    pooled = NativeAttention(kernel.library, load_native_pool(kernels, threads=2))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    runners = {}
    for on in (True, False):
        runner = ModelRunner(
            model, LoraContext(), rows=2, max_seq_len=64, dtype=dtype, device=CPU, native_attention=kernel
        )
        runner.fused_glue = on
        runners[on] = runner
    on_pool = ModelRunner(
        model, LoraContext(), rows=2, max_seq_len=64, dtype=dtype, device=CPU, native_attention=pooled
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    a, b = (5, 17, 33, 9, 100, 2, 7), (11, 12, 13)
    for rows in (
        [RowStep(0, 0, a, 0, True, False), RowStep(1, 0, b, 0, True, True)],
        [RowStep(0, len(a), (40,), 0, True, True), RowStep(1, len(b), (41,), 0, True, False)],
    ):
        calls.clear()
        fused = runners[True].step(rows)
        layers = model.config.num_hidden_layers
        assert calls.count("rope_kv_") == layers and calls.count("add_rmsnorm_") == 2 * layers + 1
        assert calls.count("silu_mul") == layers
        plain = runners[False].step(rows)
        assert len(calls) == 4 * layers + 1, "the torch glue called the kernel's"
        torch.testing.assert_close(fused.logits, plain.logits, rtol=tol, atol=tol)
        torch.testing.assert_close(fused.pooled, plain.pooled, rtol=tol, atol=tol)
        pool_out = on_pool.step(rows)
        assert torch.equal(pool_out.logits, fused.logits) and torch.equal(pool_out.pooled, fused.pooled)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rope", [None, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}]
)
def test_the_rope_table_holds_the_rotary_modules_own_numbers(dtype: torch.dtype, rope: dict[str, Any] | None) -> None:
    """A step looks its tokens' cos and sin up in a table made once (an outside profile: 0.06-0.17 ms a
    32-row step recomputed them): the same bits as the model's rotary module gives for those positions,
    in any order and batch; dynamic RoPE types, whose frequencies change with the sequence, keep the
    module's own call."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if rope is not None:
        cfg.rope_parameters = {**cfg.rope_parameters, **rope}
    model = AutoModelForCausalLM.from_config(cfg).eval()
    runner = ModelRunner(model, LoraContext(), rows=2, max_seq_len=300, dtype=dtype, device=CPU)
    if rope is not None and rope["rope_type"] == "dynamic":
        assert runner._rope is None
        return
    assert runner._rope is not None
    for positions in ([0], [299], [5, 17, 33, 9, 0, 1], list(range(300))[::-7]):
        pos = torch.tensor(positions)
        cos, sin = model.model.rotary_emb(torch.empty(0, dtype=dtype), pos.unsqueeze(0))
        assert torch.equal(runner._rope[0].index_select(0, pos), cos[0])
        assert torch.equal(runner._rope[1].index_select(0, pos), sin[0])
