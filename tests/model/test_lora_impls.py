"""The multi-LoRA kernels agree with each other and with a per-token loop, in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from lorafleet_server.model.lora import LoraBatch, lora_delta


def _weights(slots: int, r_max: int, d_in: int, d_out: int, ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.zeros(slots, r_max, d_in)
    b = torch.zeros(slots, d_out, r_max)
    for s in range(1, slots):
        r = ranks[s]
        a[s, :r] = torch.randn(r, d_in, generator=g)
        b[s, :, :r] = torch.randn(d_out, r, generator=g)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["gather", "dense", "token", "grouped", "auto"])
@pytest.mark.parametrize("n_tokens", [1, 7, 300])
@pytest.mark.parametrize("ranks", [[0, 4, 8, 16, 2], [0, 0, 8, 0, 2], [0, 4, 4, 4, 4]])
def test_impls_match_per_token_loop(impl: str, n_tokens: int, ranks: list[int], dtype: torch.dtype) -> None:
    a, b = _weights(5, 16, 24, 40, ranks)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_tokens, 24, generator=g)
    slots = torch.randint(0, 5, (n_tokens,), generator=g)
    a, b, x = a.to(dtype), b.to(dtype), x.to(dtype)
    # The loop in float64 on the same (possibly bf16-rounded) inputs.
    a64, b64, x64 = a.double(), b.double(), x.double()
    expected = torch.stack([(x64[i] @ a64[slots[i]].T) @ b64[slots[i]].T for i in range(n_tokens)])
    batch = LoraBatch.build(slots, dtype, impl)  # type: ignore[arg-type]
    if batch is None:
        assert bool((slots == 0).all())
        return
    got = lora_delta(x, batch, ranks, a, b.transpose(1, 2).contiguous())  # kernels take B transposed
    if got is None:  # no active slot targets this module
        assert expected.abs().max() == 0
        return
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    else:  # bf16: the rank-wide intermediate and the output are rounded to 8 mantissa bits
        scale = float(expected.abs().max())
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=2**-6 * scale)
        gather = LoraBatch.build(slots, dtype, "gather")
        assert gather is not None
        ref = lora_delta(x, gather, ranks, a, b.transpose(1, 2).contiguous())
        assert ref is not None
        torch.testing.assert_close(got.double(), ref.double(), rtol=0, atol=2**-6 * scale)


def test_grouped_reads_prompt_chunks_in_place_and_gathers_scattered_rows() -> None:
    """A prefill step: prompt chunks (each slot's tokens one run: a slice) beside decode rows whose
    slots also appear elsewhere (gathered); both agree with the per-token reference."""
    ranks = [0, 4, 8, 8, 2]
    a, b = _weights(5, 8, 24, 40, ranks)
    slots = torch.tensor([1] * 9 + [2] * 5 + [0] * 3 + [3, 4, 3] + [4] * 6)
    x = torch.randn(len(slots), 24, generator=torch.Generator().manual_seed(2))
    batch = LoraBatch.build(slots, torch.float32, "grouped")
    assert batch is not None
    route = batch.routing(ranks)
    assert route is not None
    kinds = {slot: isinstance(tokens, slice) for slot, tokens in route.groups}
    assert kinds == {1: True, 2: True, 3: False, 4: False}
    bt = b.transpose(1, 2).contiguous()
    got = lora_delta(x, batch, ranks, a, bt)
    gather = LoraBatch.build(slots, torch.float32, "gather")
    assert gather is not None and got is not None
    torch.testing.assert_close(got, lora_delta(x, gather, ranks, a, bt), rtol=1e-5, atol=1e-5)


def test_single_adapter_batch_with_base_rows() -> None:
    ranks = [0, 8]
    a, b = _weights(2, 8, 16, 12, ranks)
    x = torch.randn(6, 16)
    slots = torch.tensor([0, 1, 1, 0, 1, 0])
    batch = LoraBatch.build(slots, torch.float32, "dense")
    assert batch is not None
    got = lora_delta(x, batch, ranks, a, b.transpose(1, 2).contiguous())
    assert got is not None
    expected = torch.stack([(x[i] @ a[slots[i]].T) @ b[slots[i]].T for i in range(6)])
    torch.testing.assert_close(got, expected)


def test_base_only_step_has_no_routing() -> None:
    assert LoraBatch.build(torch.zeros(5, dtype=torch.long), torch.float32) is None


def test_module_routing_keeps_only_adapters_that_target_it() -> None:
    batch = LoraBatch.build(torch.tensor([1, 2, 3, 0, 2]), torch.float32, "dense")
    assert batch is not None
    assert batch.routing([0, 0, 0, 0]) is None
    route = batch.routing([0, 0, 8, 4])
    assert route is not None and route.active_list == (2, 3) and route.rank == 8
    assert route.mask.shape == (5, 16)
    assert batch.routing([0, 0, 8, 4]) is route  # shared by every layer of that kind in the step


def test_auto_choice_by_step_shape() -> None:
    """The cost model picks what the grid behind it measured fastest (model/lora.py), SmolLM2 shapes."""
    from lorafleet_server.model.lora import choose_impl

    assert choose_impl(32, 1, 576, 576, 8) == "dense"  # one adapter: two plain matmuls
    assert choose_impl(32, 32, 576, 576, 8) == "token"  # decode, an adapter per row
    assert choose_impl(32, 8, 576, 1536, 16) == "token"  # decode, 8 adapters, r=16
    assert choose_impl(256, 2, 576, 576, 8) == "dense"  # a prefill step of two adapters
    assert choose_impl(256, 13, 576, 576, 8) == "token"  # a burst's prefill step: chunks of 13 adapters
    assert choose_impl(2048, 8, 576, 576, 8) == "grouped"  # long prompts of 8 adapters
    assert choose_impl(1024, 8, 1536, 576, 16) == "grouped"
    assert choose_impl(2048, 32, 576, 576, 8) == "token"  # 32 adapters: a matmul pair each costs more


def test_auto_dispatches_to_the_chosen_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    import lorafleet_server.model.lora as lora

    chosen: list[str] = []
    for name in ("dense", "token", "grouped"):
        real = getattr(lora, f"lora_delta_{name}")
        monkeypatch.setattr(lora, f"lora_delta_{name}", lambda *a, _n=name, _f=real: chosen.append(_n) or _f(*a))
    a, b = _weights(41, 8, 16, 12, [0] + [8] * 40)
    bt = b.transpose(1, 2).contiguous()
    ranks = [0] + [8] * 40
    for slots in ([1, 1, 0, 1], [1, 2, 0, 1], list(range(1, 33)), [s for s in range(1, 7) for _ in range(300)]):
        batch = LoraBatch.build(torch.tensor(slots), torch.float32)
        assert batch is not None
        lora.lora_delta(torch.randn(len(slots), 16), batch, ranks, a, bt)
        adapters = len(set(slots) - {0})
        assert chosen.pop() == lora.choose_impl(len(slots), adapters, 16, 12, 8)


def test_a_batch_from_the_runners_slot_list_routes_as_one_from_the_tensor() -> None:
    """The runner hands its slots as a list too: their distinct ones without torch.unique, and the
    one-hot routing made only when a torch kernel asks for it (the native kernels never do)."""
    for slots in ([0, 3, 3, 1, 0, 7], [5], [2, 2], [0, 0, 0]):
        t = torch.tensor(slots)
        from_tensor = LoraBatch.build(t, torch.bfloat16, "auto")
        from_list = LoraBatch.build(t, torch.bfloat16, "auto", slot_list=slots)
        if from_tensor is None:
            assert from_list is None and not any(slots)
            continue
        assert from_list is not None and from_list.active_list == from_tensor.active_list == tuple(
            sorted(set(slots) - {0})
        )
        assert "onehot" not in vars(from_list)  # not made until asked for
        want = (t[:, None] == torch.tensor(from_list.active_list)[None, :]).to(torch.bfloat16)  # [N, U]
        assert torch.equal(from_list.onehot, want) and from_list.onehot.dtype == torch.bfloat16
