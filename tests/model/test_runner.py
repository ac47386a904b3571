"""Our ragged-batch forward with its own KV cache equals the HF model's forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafleet_server.model.lora import LoraContext
from lorafleet_server.model.runner import ModelRunner, RowStep


def test_ragged_prefill_chunks_and_decode_match_hf(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(model, LoraContext(), rows=4, max_seq_len=64, dtype=torch.float32, device=torch.device("cpu"))
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


def test_pooled_hidden_state_is_the_final_norm_output(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(model, LoraContext(), rows=2, max_seq_len=32, dtype=torch.float32, device=torch.device("cpu"))
    ids = [3, 4, 5, 6]
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0]  # [4, hidden]
    out = runner.step([RowStep(1, 0, tuple(ids), 0, False, True)])
    torch.testing.assert_close(out.pooled[0], hidden.sum(0), rtol=1e-4, atol=1e-4)
    assert out.logits.numel() == 0


def test_garbage_in_unused_kv_positions_cannot_leak_into_batched_decode(tiny_model_dir: Path) -> None:
    """Rows of different lengths share one batched decode; masked tail positions may hold NaN."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(model, LoraContext(), rows=3, max_seq_len=32, dtype=torch.float32, device=torch.device("cpu"))
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


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_llama_family_architectures_match_hf(arch: str) -> None:
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
    runner = ModelRunner(model, LoraContext(), rows=2, max_seq_len=32, dtype=torch.float32, device=torch.device("cpu"))
    ids = [3, 9, 27, 81, 4]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    out = runner.step([RowStep(0, 0, tuple(ids[:4]), 0, True, False)])
    torch.testing.assert_close(out.logits[0], ref[3], rtol=1e-4, atol=1e-4)
    out = runner.step([RowStep(0, 4, (ids[4],), 0, True, False)])
    torch.testing.assert_close(out.logits[0], ref[4], rtol=1e-4, atol=1e-4)
