"""Base Linears with their weight also prepacked in oneDNN's blocked layout, for bf16 on CPU.

``F.linear`` in bf16 on a CPU reorders the weight into oneDNN's blocked layout on every call; for the
few rows of a decode step that reorder is a large share of the call. Prepacking it once
(``torch.ops.mkldnn._reorder_linear_weight``, what inductor's freezing does for ``torch.compile``)
and calling ``torch.ops.mkldnn._linear_pointwise`` skips it: measured here (docs/architecture.md,
"Compute dtype") ~1.3-1.9x on SmolLM2's layer shapes at 32 rows and ~1.3-2.4x on its 49,152-wide LM
head, the same outputs bit for bit, but slower than ``F.linear`` for long prefills (512 rows: 0.6-0.7x).
So the layer keeps both: the packed weight for steps of up to ``PACKED_MAX_ROWS`` rows, the plain
one (shared with the model, no copy) above.

The ops are private torch API; :func:`packed_linear_supported` checks once at load that they exist
and give ``F.linear``'s result, and the loader keeps plain Linears otherwise.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

PACKED_MAX_ROWS = 64  # rows (tokens) up to which the packed weight is used: decode and short chunks
PACK_BATCH_HINT = 32  # the row count oneDNN tunes the packed layout for: a full decode batch


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)  # opaque blocked layout


def _packed_linear(x2: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")


def packed_linear_supported(dtype: torch.dtype) -> bool:
    """Whether this torch build has the prepacked oneDNN linear for ``dtype`` and it matches F.linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=gen).to(dtype)  # [out, in]
    bias = torch.randn(48, generator=gen).to(dtype)
    try:
        packed = _pack(weight)
        for rows in (1, 5, 32, 70):
            x = torch.randn(rows, 40, generator=gen).to(dtype)  # [rows, in]
            got = _packed_linear(x, packed, bias)
            if not torch.allclose(got.float(), F.linear(x, weight, bias).float(), rtol=1e-2, atol=1e-2):
                log.warning("prepacked oneDNN linear differs from F.linear in %s: plain Linears kept", dtype)
                return False
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        log.info("no prepacked oneDNN linear in this torch build (%s): plain Linears kept", exc)
        return False
    return True


class PackedLinear(nn.Module):
    """``linear`` computed from a prepacked copy of its weight for small steps, from the weight itself
    for long ones. The plain weight stays the model's parameter (tied weights stay tied)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight  # [out, in], shared
        self.bias = linear.bias
        with torch.no_grad():
            self.packed: torch.Tensor = _pack(linear.weight.detach())  # opaque oneDNN layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        x2 = x.reshape(-1, self.in_features)  # [rows, in]
        if x2.shape[0] > PACKED_MAX_ROWS or x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return _packed_linear(x2, self.packed, self.bias).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed (oneDNN)"


def pack_linears(model: nn.Module, bases: list[nn.Module]) -> list[PackedLinear]:
    """Replace each plain ``nn.Linear`` in ``bases`` (the LoRA wrappers' ``base``) and the LM head by
    a :class:`PackedLinear`; returns them. Callers check :func:`packed_linear_supported` first."""
    packed: list[PackedLinear] = []
    for wrapper in bases:
        base = getattr(wrapper, "base", None)
        if type(base) is nn.Linear:
            wrapper.base = PackedLinear(base)
            packed.append(wrapper.base)
    head = getattr(model, "lm_head", None)
    if type(head) is nn.Linear:
        model.lm_head = PackedLinear(head)
        packed.append(model.lm_head)
    return packed
