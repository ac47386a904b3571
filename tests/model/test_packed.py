"""Prepacked oneDNN Linears (model/packed.py): F.linear's result for every row count and shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorafleet_server.model.packed import PACKED_MAX_ROWS, PackedLinear, pack_linears, packed_linear_supported

pytestmark = pytest.mark.skipif(
    not packed_linear_supported(torch.bfloat16), reason="this torch build has no prepacked oneDNN bf16 linear"
)


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_f_linear_below_and_above_the_row_limit(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(linear)
    assert packed.weight is linear.weight  # the plain weight is shared, not copied
    for rows in (1, 7, 32, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1, 300):
        x = torch.randn(rows, 96).to(torch.bfloat16)  # [rows, in]
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), rtol=0, atol=0)
    x3 = torch.randn(2, 5, 96).to(torch.bfloat16)  # [batch, seq, in]: HF-style leading dims
    assert packed(x3).shape == (2, 5, 160)
    torch.testing.assert_close(packed(x3), F.linear(x3, linear.weight, linear.bias), rtol=0, atol=0)


def test_pack_linears_replaces_wrapped_bases_and_the_head_only() -> None:
    class Wrapper(nn.Module):
        def __init__(self, base: nn.Module) -> None:
            super().__init__()
            self.base = base

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = Wrapper(nn.Linear(16, 16))
            self.other = Wrapper(nn.Identity())  # not a plain Linear (e.g. a quantized one): kept
            self.lm_head = nn.Linear(16, 40, bias=False)

    model = Model().to(torch.bfloat16)
    head_weight = model.lm_head.weight
    assert pack_linears(model, [model.layer, model.other]) == 2
    assert isinstance(model.layer.base, PackedLinear) and isinstance(model.other.base, nn.Identity)
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.weight is head_weight
