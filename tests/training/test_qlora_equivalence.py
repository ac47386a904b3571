"""QLoRA on the CPU is LoRA on the NF4-rounded base: same loss, same LoRA gradients.

The QLoRA-vs-LoRA gap measured on the demo (README, "QLoRA vs LoRA") comes from the base, not from the
training path: this pins that the trainer's NF4 load (``prepare_model_for_kbit_training`` included)
and bitsandbytes' 4-bit forward/backward give exactly what fp32 LoRA gives on the dequantized weights.
A wrong 4-bit backward, a frozen or recast LoRA weight, or a different LoRA init would break it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from training_testlib import qa_rows, write_jsonl

from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_training import data as data_mod
from lorafleet_training import trainer as trainer_mod
from lorafleet_training.encoding import collate, completion_loss_sum, encode, keep_last, pad_id_of
from lorafleet_training.trainer import TrainConfig


def _loss_and_grads(model: Any, batch: dict[str, torch.Tensor], last: Any) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    loss_sum, tokens = completion_loss_sum(model, batch, last)
    loss = loss_sum / tokens
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return float(loss.detach()), grads


def test_qlora_step_equals_lora_on_the_dequantized_base(
    tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec
) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoTokenizer

    config = TrainConfig(
        data=write_jsonl(tmp_path / "train.jsonl", qa_rows(4)),
        adapter="acme/nf4",
        out_dir=tmp_path / "out",
        base_model_dir=tiny_model_dir,
        rank=4,
        alpha=8,
        targets=("all-linear",),
        dropout=0.0,
    )
    cpu = torch.device("cpu")
    quiet = lambda _: None  # noqa: E731
    qlora, backend = trainer_mod.load_peft_model(
        config, tiny_spec, trainer_mod.Backend("qlora", cpu, "nf4", torch.float32, "nf4"), quiet
    )
    assert backend.quantization == "nf4"
    lora, _ = trainer_mod.load_peft_model(
        config, tiny_spec, trainer_mod.Backend("lora", cpu, "none", torch.float32, "fp32"), quiet
    )
    # the fp32 base gets the NF4 base's rounded weights: the only difference left is the code path
    quantized = {n: m for n, m in qlora.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == len(tiny_spec.target_shapes)
    plain = dict(lora.named_modules())
    for name, module in quantized.items():
        target = plain[name]
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        with torch.no_grad():
            target.weight.copy_(weight.to(torch.float32).reshape(target.weight.shape))  # [out, in]
    # non-zero B so that every A gets a gradient too (B starts at zero)
    gen = torch.Generator().manual_seed(7)
    q_params, l_params = dict(qlora.named_parameters()), dict(lora.named_parameters())
    assert {n for n, p in q_params.items() if p.requires_grad} == {n for n, p in l_params.items() if p.requires_grad}
    with torch.no_grad():
        for name, param in q_params.items():
            if "lora_" in name:
                assert param.dtype == l_params[name].dtype == torch.float32, name
            if "lora_B" in name:
                value = torch.randn(param.shape, generator=gen) * 0.05
                param.copy_(value)
                l_params[name].copy_(value)
            elif "lora_A" in name:
                assert torch.equal(param, l_params[name]), name  # same seeded init

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = encode(tokenizer, data_mod.load_jsonl(config.data), None, source="train")
    batch = collate(rows, pad_id_of(tokenizer))
    q_loss, q_grads = _loss_and_grads(qlora, batch, keep_last(rows))
    l_loss, l_grads = _loss_and_grads(lora, batch, keep_last(rows))

    assert q_loss == pytest.approx(l_loss, rel=1e-5, abs=1e-6)
    assert set(q_grads) == set(l_grads) and len(q_grads) == 2 * len(quantized)
    for name, grad in l_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(q_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
