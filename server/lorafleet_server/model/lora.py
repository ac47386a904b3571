"""Multi-adapter LoRA on top of any base Linear (docs/architecture.md, "Multi-LoRA math and kernels").

For a step's flattened tokens ``x[n, d_in]`` routed to adapter slots ``s[n]`` (slot 0 = no adapter,
all zeros)::

    y[n] = base(x)[n] + (x[n] @ A[s[n]].T) @ B[s[n]].T

``B`` is stored transposed (``Bt: [slots, r_cap, d_out]``, so the rows of one adapter are contiguous
and gathering them needs no transpose copy) and already multiplied by the adapter's per-module
scaling (alpha / r, or alpha / sqrt(r) with rsLoRA), so the kernels need no scale.

Storage follows what is loaded: each module's rank capacity ``r_cap`` is the largest rank a loaded
adapter has on *that* module (0, no storage at all, when none targets it), and ranks below ``r_cap``
are zero-padded. ``--max-lora-rank`` only bounds what is accepted; padding every slot of every
module to it held 74.5 MiB per slot (2.4 GiB for 32 slots) on SmolLM2-135M in fp32, whatever the
adapters' size (docs/architecture.md, "Measured facts").

Four implementations live behind :func:`lora_delta`:

* ``gather`` — the readable reference: copy ``A[s[n]]`` per token and ``bmm``. Moves the most bytes.
* ``dense`` — gather each *distinct* active adapter once, one matmul into ``[n, U*r]``, zero the
  blocks of other adapters with a per-step 0/1 mask, one matmul out. Reads each adapter once; the
  extra FLOPs (U×) are cheap while the step has few tokens (decode).
* ``token`` — the gather done fast: copy each token's adapter (rank-sliced, ``index_select``) and
  ``bmm`` in the row-vector form. Reads each adapter once when most tokens have their own adapter
  (many distinct adapters in a decode step), where ``dense``'s U× FLOPs cost more than the copy.
* ``grouped`` — loop over distinct adapters with their tokens (Punica's SGMV in Python). Best for
  long prefills where U× FLOPs would cost real time.

Tests prove all four agree; :func:`lora_delta` picks by the step's shape (``auto``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from lorafleet_server.model.options import LoraImpl as Impl

# Measured on a 2-core AVX2 CPU, 1 thread, rank 8/16, SmolLM2 shapes (576/1536 wide). ``dense`` costs
# ~tokens x adapters, ``token`` ~tokens (a copy per token), ``grouped`` ~adapters (a loop):
# - up to 128 tokens, ``token`` wins from ~8 distinct adapters (32 decode tokens x 32 adapters, r=8,
#   576->576: dense 408 us, token 162 us), ``dense`` below;
# - above 128 tokens (prefill), ``token``'s copies dominate: ``dense`` up to 4 adapters, then ``grouped``.
TOKEN_MIN_ADAPTERS = 8
TOKEN_MAX_TOKENS = 128
DENSE_MAX_ADAPTERS_LONG = 4


@dataclass(frozen=True)
class ModuleRouting:
    """A step's routing restricted to the adapters that target one module."""

    active: torch.Tensor  # [U] long, distinct slots in this step whose adapter targets the module
    active_list: tuple[int, ...]
    rank: int  # max rank of those adapters on this module; kernels read A[:, :rank] only
    mask: torch.Tensor  # [N, U*rank] compute dtype, 1 where token n belongs to active slot u


@dataclass(frozen=True)
class LoraBatch:
    """Per-step routing of tokens to adapter slots, shared by every MultiLoRALinear of the model."""

    slots: torch.Tensor  # [N] long, slot of each flattened token (0 = base only)
    active_list: tuple[int, ...]  # distinct non-zero slots in this step, sorted
    onehot: torch.Tensor  # [N, U] compute dtype, 1 where token n uses active_list[u]
    impl: Impl
    # Routings per (slots targeting the module, rank): layers of one kind share theirs in a step.
    _routings: dict[tuple[tuple[int, ...], int], ModuleRouting] = field(default_factory=dict, compare=False)

    @staticmethod
    def build(slots: torch.Tensor, dtype: torch.dtype, impl: Impl = "auto") -> LoraBatch | None:
        """Routing for ``slots`` [N]; None when no token uses an adapter (the base path alone)."""
        active = torch.unique(slots)  # sorted
        active = active[active != 0]
        if active.numel() == 0:
            return None
        onehot = (slots[:, None] == active[None, :]).to(dtype)  # [N, U]
        return LoraBatch(slots=slots, active_list=tuple(active.tolist()), onehot=onehot, impl=impl)

    def routing(self, module_ranks: list[int]) -> ModuleRouting | None:
        """The routing for a module whose per-slot ranks are ``module_ranks`` (0 = not targeted)."""
        cols = tuple(i for i, s in enumerate(self.active_list) if module_ranks[s] > 0)
        if not cols:
            return None
        rank = max(module_ranks[self.active_list[i]] for i in cols)
        cached = self._routings.get((cols, rank))
        if cached is not None:
            return cached
        active_list = tuple(self.active_list[i] for i in cols)
        onehot = self.onehot if len(cols) == len(self.active_list) else self.onehot[:, list(cols)]  # [N, U']
        routing = ModuleRouting(
            active=torch.tensor(active_list, dtype=torch.long, device=self.slots.device),
            active_list=active_list,
            rank=rank,
            mask=onehot.repeat_interleave(rank, dim=1),  # [N, U'*rank]
        )
        self._routings[(cols, rank)] = routing
        return routing


class LoraContext:
    """Holder of the current step's routing; one per model, set by the runner around a forward."""

    def __init__(self) -> None:
        self.batch: LoraBatch | None = None


def lora_delta_gather(x: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """Reference: x [N, in], slots [N], a [S, r_cap, in], bt [S, r_cap, out] -> [N, out].

    Reads every slot at the full capacity: rows past a slot's own rank are zero, so they add exact zeros.
    """
    a_n = a[slots]  # [N, r, in]
    bt_n = bt[slots]  # [N, r, out]
    h = torch.bmm(a_n, x.unsqueeze(-1))  # [N, r, 1]
    return torch.bmm(h.transpose(1, 2), bt_n).squeeze(1)  # [N, out]


def lora_delta_dense(x: torch.Tensor, route: ModuleRouting, a: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    r = route.rank
    n_active = len(route.active_list)
    if n_active == 1:  # every adapter token uses one slot: plain matmuls, the mask zeroes the others
        slot = route.active_list[0]
        return ((x @ a[slot, :r].T) * route.mask) @ bt[slot, :r]  # [N, out]
    # index_select on the rank-sliced view copies ~4x faster than advanced indexing a[active, :r].
    a_u = a[:, :r].index_select(0, route.active).reshape(n_active * r, -1)  # [U*r, in]
    bt_u = bt[:, :r].index_select(0, route.active).reshape(n_active * r, -1)  # [U*r, out]
    h = x @ a_u.T  # [N, U*r]
    h.mul_(route.mask)
    return h @ bt_u  # [N, out]


def lora_delta_token(
    x: torch.Tensor, slots: torch.Tensor, rank: int, a: torch.Tensor, bt: torch.Tensor
) -> torch.Tensor:
    """x [N, in] -> [N, out]: each token's own adapter, copied at the step's rank."""
    a_n = a[:, :rank].index_select(0, slots)  # [N, r, in]
    bt_n = bt[:, :rank].index_select(0, slots)  # [N, r, out]
    # [N, 1, in] @ [N, in, r]: the row-vector form. bmm(a_n, x[..., None]) computes the same numbers
    # but takes a ~7x slower batched-GEMV path on CPU (measured: 211 vs 31 us, N=32, r=8, 576 wide).
    h = torch.bmm(x.unsqueeze(1), a_n.transpose(1, 2))  # [N, 1, r]
    return torch.bmm(h, bt_n).squeeze(1)  # [N, out]


def lora_delta_grouped(
    x: torch.Tensor, slots: torch.Tensor, route: ModuleRouting, a: torch.Tensor, bt: torch.Tensor
) -> torch.Tensor:
    r = route.rank
    out = x.new_zeros(x.shape[0], bt.shape[2])  # [N, out]
    for slot in route.active_list:
        idx = (slots == slot).nonzero().squeeze(1)  # [n_s]
        x_s = x.index_select(0, idx)  # [n_s, in]
        h = x_s @ a[slot, :r].T  # [n_s, r]
        out.index_copy_(0, idx, h @ bt[slot, :r])  # [n_s, out]
    return out


def choose_impl(n_tokens: int, n_adapters: int) -> Impl:
    """The fastest kernel for a module's share of a step (see the measurements above)."""
    if n_adapters == 1:
        return "dense"  # two plain matmuls
    if n_tokens <= TOKEN_MAX_TOKENS:
        return "token" if n_adapters >= TOKEN_MIN_ADAPTERS else "dense"
    return "dense" if n_adapters <= DENSE_MAX_ADAPTERS_LONG else "grouped"


def lora_delta(
    x: torch.Tensor, batch: LoraBatch, module_ranks: list[int], a: torch.Tensor, bt: torch.Tensor
) -> torch.Tensor | None:
    """The one entry point: x [N, in] -> LoRA contribution [N, out], or None if no adapter applies.

    ``a`` [S, r_cap, in] and ``bt`` [S, r_cap, out] may have ``r_cap == 0`` (no loaded adapter targets
    the module, so it holds no storage): every kernel then has nothing to add.
    """
    if a.shape[1] == 0:
        return None
    if batch.impl == "gather":
        return lora_delta_gather(x, batch.slots, a, bt)
    route = batch.routing(module_ranks)
    if route is None:
        return None
    impl: Impl = batch.impl
    if impl == "auto":
        impl = choose_impl(x.shape[0], len(route.active_list))
    if impl == "grouped":
        return lora_delta_grouped(x, batch.slots, route, a, bt)
    if impl == "token":
        return lora_delta_token(x, batch.slots, route.rank, a, bt)
    return lora_delta_dense(x, route, a, bt)


class MultiLoRALinear(nn.Module):
    """A base Linear (plain, bitsandbytes 4/8-bit, ...) plus stacked per-slot LoRA weights.

    ``lora_a`` [slots, r_cap, in] and ``lora_bt`` [slots, r_cap, out] (B transposed, pre-scaled) are buffers in
    the compute dtype. ``r_cap`` is the largest rank any slot's adapter has on this module, so a module
    no loaded adapter targets holds no storage, and one big adapter costs its rank on the modules it
    targets only. Rows past a slot's own rank, every row of a free slot and all of slot 0 stay zero:
    the ``gather`` reference reads them. Writing a slot is the slot manager's job (:meth:`write_slot`,
    :meth:`clear_slot`), always on the engine thread between steps, so a resize never races a forward.
    """

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        num_slots: int,
        r_max: int,
        context: LoraContext,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features = in_features
        self.out_features = out_features
        self.context = context
        self.r_max = r_max  # the largest rank write_slot accepts (--max-lora-rank); nothing is allocated for it
        self.slot_ranks = [0] * num_slots  # rank of each slot's adapter on this module (0: none)
        # Rank capacity 0: no adapter is loaded yet, so no storage (slot 0 is zeros by having no rows).
        self.register_buffer(
            "lora_a", torch.zeros(num_slots, 0, in_features, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer(
            "lora_bt", torch.zeros(num_slots, 0, out_features, dtype=dtype, device=device), persistent=False
        )

    lora_a: torch.Tensor
    lora_bt: torch.Tensor

    @property
    def rank_capacity(self) -> int:
        """r_cap: the rank every slot is padded to on this module (the largest loaded rank, or 0)."""
        return int(self.lora_a.shape[1])

    def slot_memory_bytes(self) -> int:
        """Bytes held by this module's slot buffers. Safe from any thread: it reads two tensors' sizes."""
        a, bt = self.lora_a, self.lora_bt
        return int(a.nbytes) + int(bt.nbytes)

    def clear_slot(self, slot: int) -> None:
        """Free ``slot`` on this module; shrink the buffers if its adapter was the one that set r_cap."""
        self.slot_ranks[slot] = 0
        self._fit()
        self.lora_a[slot].zero_()
        self.lora_bt[slot].zero_()

    def write_slot(self, slot: int, a: torch.Tensor | None, b_scaled: torch.Tensor | None) -> None:
        """a [r, in], b_scaled [out, r]; None clears the slot (adapter does not target this module).

        Grows the buffers first when ``r`` exceeds r_cap, and shrinks them when this slot held the
        largest rank and the new adapter's is smaller; either way the whole slot is rewritten, so no
        rows of the previous adapter survive.
        """
        if a is None or b_scaled is None or a.shape[0] == 0:
            self.clear_slot(slot)
            return
        r = int(a.shape[0])
        if r > self.r_max:
            raise ValueError(f"rank {r} exceeds max_lora_rank {self.r_max}")
        if a.shape != (r, self.in_features) or b_scaled.shape != (self.out_features, r):
            raise ValueError(
                f"LoRA shapes {tuple(a.shape)} / {tuple(b_scaled.shape)} do not fit a "
                f"{self.in_features}->{self.out_features} Linear"
            )
        self.slot_ranks[slot] = r
        self._fit()
        self.lora_a[slot].zero_()
        self.lora_bt[slot].zero_()
        self.lora_a[slot, :r].copy_(a)
        self.lora_bt[slot, :r].copy_(b_scaled.T)

    def _fit(self) -> None:
        """Reallocate both buffers at r_cap = max(slot_ranks) when that differs from what they hold.

        Every slot keeps its rows below min(old, new) r_cap; all other rows are zero. Between steps the
        old buffers have no other reader, so they are freed as soon as they are replaced.
        """
        r_cap = max(self.slot_ranks)
        if r_cap == self.rank_capacity:
            return
        keep = min(r_cap, self.rank_capacity)
        old_a, old_bt = self.lora_a, self.lora_bt
        a = old_a.new_zeros(old_a.shape[0], r_cap, self.in_features)  # [slots, r_cap, in]
        bt = old_bt.new_zeros(old_bt.shape[0], r_cap, self.out_features)  # [slots, r_cap, out]
        a[:, :keep].copy_(old_a[:, :keep])
        bt[:, :keep].copy_(old_bt[:, :keep])
        self.lora_a = a
        self.lora_bt = bt

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, in] (any leading dims)
        y = self.base(x)
        return self._add_lora(x, y)

    # Outside any torch.compile graph (``compile_base`` in model/loader.py): the routing is per-step
    # Python state, and the LoRA math stays the eager, PEFT-exact kernels.
    @torch.compiler.disable
    def _add_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = self.context.batch
        if batch is None or self.rank_capacity == 0:  # base-only step, or no loaded adapter targets us
            return y
        flat = x.reshape(-1, self.in_features).to(self.lora_a.dtype)  # [N, in]
        delta = lora_delta(flat, batch, self.slot_ranks, self.lora_a, self.lora_bt)  # [N, out]
        if delta is None:
            return y
        return y + delta.view(y.shape).to(y.dtype)


def slot_memory_bytes(layers: Iterable[MultiLoRALinear]) -> int:
    """Bytes held by the slot buffers of ``layers`` (all of a model's: what the slot-memory gauge reports)."""
    return sum(layer.slot_memory_bytes() for layer in layers)
