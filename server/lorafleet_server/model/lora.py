"""Multi-adapter LoRA on top of any base Linear (docs/architecture.md, "Multi-LoRA math and kernels").

For a step's flattened tokens ``x[n, d_in]`` routed to adapter slots ``s[n]`` (slot 0 = no adapter,
all zeros)::

    y[n] = base(x)[n] + (x[n] @ A[s[n]].T) @ B[s[n]].T

``B`` is stored transposed (``Bt: [slots, r_cap, d_out]``, so the rows of one adapter are contiguous
and gathering them needs no transpose copy) and already multiplied by the adapter's per-module
scaling (alpha / r, or alpha / sqrt(r) with rsLoRA), so the kernels need no scale.

Storage follows what is loaded: each module's rank capacity ``r_cap`` is the largest rank a loaded
adapter has on *that* module (0, no storage at all, when none targets it), on CPU rounded up to the
next of ``BLOCK_RANKS`` (the capacities the native kernel takes a run of tokens at a time), and ranks
below ``r_cap`` are zero-padded. ``--max-lora-rank`` only bounds what is accepted; padding every slot of every
module to it held 74.5 MiB per slot (2.4 GiB for 32 slots) on SmolLM2-135M in fp32, whatever the
adapters' size (docs/architecture.md, "Measured facts").

Four implementations live behind :func:`lora_delta`:

* ``gather`` — the readable reference: copy ``A[s[n]]`` per token and ``bmm``. Moves the most bytes.
* ``dense`` — gather each *distinct* active adapter once, one matmul into ``[n, U*r]``, zero the
  blocks of other adapters with a per-step 0/1 mask, one matmul out. Reads each adapter once; the
  extra FLOPs (U×) are cheap while the step has few tokens (decode).
* ``token`` — the gather without the copy: each token's adapter read in place by two
  ``embedding_bag`` gather-weighted sums (``A`` is stored transposed for it, ``[slots, d_in, r_cap]``).
  Costs ~tokens whatever the adapters: many distinct adapters in a short step (decode), where
  ``dense``'s U× FLOPs cost more.
* ``grouped`` — loop over distinct adapters with their tokens (Punica's SGMV in Python). Best for
  long prefills where U× FLOPs would cost real time.
Beside them, not behind :func:`lora_delta` because it adds into the base output in place
(``MultiLoRALinear._add_lora``):

* ``native`` — a C kernel built for this CPU (``csrc/lora.c``, model/native.py): per token, its
  adapter's A and B read in place with fp32 sums, each token's the same whatever else the step holds.
  ``auto`` takes it for every call it takes (``NativeLora.takes``): a token's LoRA must not depend on
  the step it lands in. Choosing per step (it for decode, a torch kernel for the longer prompt chunks
  of ranks it had no token blocks for) changed a request's greedy text with its neighbours, and a
  preempted request's on resume (an outside review: r=4 q/v in bf16, 4 of 6 prompts differed).

Tests prove all five agree; :func:`lora_delta` picks among the four by the step's shape (``auto``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorafleet_server.model.native import NativeLora
from lorafleet_server.model.options import LoraImpl as Impl

# The rank capacities csrc/lora.c runs a prompt chunk's tokens of one slot a block at a time
# (``lf_lora_blocks``: bf16 with d_out % 16 == 0 at these, fp32 at any multiple of 8). On CPU a module's
# r_cap is rounded up to the next of them: at r_cap 12 its token-by-token path took 7-25x the base
# Linear's time on 4 x 128 bf16 tokens, at 16 0.5-1.2x (bench.lora_kernels, AMX Xeon, one thread).
# The padding is zeros: it costs slot memory (r=4 -> 8 doubles it), never a different number.
BLOCK_RANKS = (8, 16, 32, 48, 64)


def aligned_rank(r: int) -> int:
    """The rank capacity that holds rank ``r`` on CPU: the next of ``BLOCK_RANKS`` (``r`` past them)."""
    return next((c for c in BLOCK_RANKS if r <= c), r) if r > 0 else 0


# Cost model of ``choose_impl`` in microseconds per call (docs/architecture.md, "Measured facts" 4),
# fitted to a grid of steps (32-2,048 tokens x 2-32 adapters; r=8 576->576 and 576->192, r=16 576->1536
# and 1536->576) timed on a 2-core AMD EPYC with avx512_bf16, bf16, 1 thread:
# - ``token`` (two embedding_bags): per token, ~d_in x r rows r wide plus r rows d_out wide;
# - ``dense``: a fixed cost (the gathers and the mask) plus tokens x adapters x r x (d_in + d_out) MACs;
# - ``grouped``: two matmuls per adapter (~50 us of fixed cost each pair) on its own tokens only.
# At 256 tokens of 8 adapters (r=8 576->576) they cost 263 / 281 / 424 us; at 2,048 tokens of 8
# adapters 1,960 / 1,585 / 930 us; at 32 decode tokens of 32 adapters 76 / 325 / 2,711 us.
TOKEN_US_PER_IN_ELEMENT = 1.4e-4  # x tokens x d_in x r
TOKEN_US_PER_OUT_ELEMENT = 0.49e-4  # x tokens x d_out x r
DENSE_US_FIXED = 100.0
DENSE_US_PER_MAC = 1.2e-5  # x tokens x adapters x r x (d_in + d_out)
GROUPED_US_PER_ADAPTER = 50.0
GROUPED_US_PER_MAC = 3e-5  # x tokens x r x (d_in + d_out)


class ModuleRouting:
    """A step's routing restricted to the adapters that target one module.

    What the kernels need beyond the slot list (the dense mask, the embedding_bag indices) is built
    on first use and kept: every layer of one kind shares it within the step.
    """

    def __init__(self, slots: torch.Tensor, active_list: tuple[int, ...], onehot: torch.Tensor, rank: int) -> None:
        self.slots = slots  # [N] long, the step's slot per token
        self.active = torch.tensor(active_list, dtype=torch.long, device=slots.device)  # [U]
        self.active_list = active_list  # distinct slots in this step whose adapter targets the module
        self.rank = rank  # max rank of those adapters on this module; kernels read A[:, :rank] only
        self._onehot = onehot  # [N, U] compute dtype, 1 where token n uses active_list[u]
        self._mask: torch.Tensor | None = None
        self._off: torch.Tensor | None = None
        self._bags: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._tokens: torch.Tensor | None = None
        self._all_tokens: bool | None = None
        self._groups: tuple[tuple[int, slice | torch.Tensor], ...] | None = None

    @property
    def mask(self) -> torch.Tensor:
        """[N, U*rank] compute dtype: 1 where token n belongs to active slot u (``dense``)."""
        if self._mask is None:
            self._mask = self._onehot.repeat_interleave(self.rank, dim=1)
        return self._mask

    @property
    def off(self) -> torch.Tensor:
        """[N, U*rank] bool: True where token n does not belong to active slot u (``dense`` zeroes
        those entries by selection, not by a 0 multiply: 0 x inf would be NaN, and one adapter's
        overflow would reach every other row of the step)."""
        if self._off is None:
            self._off = self.mask == 0
        return self._off

    @property
    def tokens(self) -> torch.Tensor:
        """[M] long: the positions of the tokens whose adapter targets this module, in order."""
        if self._tokens is None:
            self._tokens = (self._onehot.sum(1) > 0).nonzero().squeeze(1)
            self._all_tokens = int(self._tokens.numel()) == int(self.slots.numel())
        return self._tokens

    @property
    def all_tokens(self) -> bool:
        """Whether every token of the step uses an adapter that targets this module."""
        _ = self.tokens
        return bool(self._all_tokens)

    @property
    def groups(self) -> tuple[tuple[int, slice | torch.Tensor], ...]:
        """(slot, its tokens) per active slot (``grouped``): a slice where the slot's tokens are one
        contiguous run (a prompt chunk), else their [n_s] long positions."""
        if self._groups is None:
            positions: dict[int, list[int]] = {slot: [] for slot in self.active_list}
            for i, slot in enumerate(self.slots.tolist()):
                if slot in positions:
                    positions[slot].append(i)
            groups: list[tuple[int, slice | torch.Tensor]] = []
            for slot, pos in positions.items():
                if pos[-1] - pos[0] + 1 == len(pos):
                    groups.append((slot, slice(pos[0], pos[-1] + 1)))
                else:
                    groups.append((slot, torch.tensor(pos, dtype=torch.long, device=self.slots.device)))
            self._groups = tuple(groups)
        return self._groups

    def bag(self, rows_per_slot: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """embedding_bag (indices [M*width], offsets [N]) int32 over a table of ``rows_per_slot`` rows per
        slot: token m's bag is rows ``slot*rows_per_slot + j`` for ``j < width``; other tokens get empty bags."""
        key = (rows_per_slot, width)
        cached = self._bags.get(key)
        if cached is not None:
            return cached
        tok = self.tokens
        n = int(self.slots.numel())
        start = self.slots.index_select(0, tok) * rows_per_slot  # [M]
        steps = torch.arange(width, dtype=torch.long, device=self.slots.device)  # [width]
        indices = (start[:, None] + steps[None, :]).reshape(-1).to(torch.int32)  # [M*width]
        if self.all_tokens:
            offsets = torch.arange(0, n * width, width, dtype=torch.int32, device=self.slots.device)  # [N]
        else:
            counts = torch.zeros(n, dtype=torch.int32, device=self.slots.device)
            counts[tok] = width
            offsets = (torch.cumsum(counts, 0) - counts).to(torch.int32)  # [N], empty bags for others
        self._bags[key] = (indices, offsets)
        return indices, offsets


@dataclass(frozen=True)
class LoraBatch:
    """Per-step routing of tokens to adapter slots, shared by every MultiLoRALinear of the model."""

    slots: torch.Tensor  # [N] long, slot of each flattened token (0 = base only)
    active_list: tuple[int, ...]  # distinct non-zero slots in this step, sorted
    dtype: torch.dtype  # the compute dtype (of ``onehot``)
    impl: Impl
    native: NativeLora | None = None  # the C kernel (impl "native", or "auto" where it applies)
    # Routings per (slots targeting the module, rank): layers of one kind share theirs in a step.
    _routings: dict[tuple[tuple[int, ...], int], ModuleRouting] = field(default_factory=dict, compare=False)

    @staticmethod
    def build(
        slots: torch.Tensor,
        dtype: torch.dtype,
        impl: Impl = "auto",
        native: NativeLora | None = None,
        slot_list: Sequence[int] | None = None,
    ) -> LoraBatch | None:
        """Routing for ``slots`` [N] (``slot_list``: the same slots as a list, where the caller has
        them: their distinct ones without a torch call); None when no token uses an adapter (the base
        path alone)."""
        if impl == "native" and native is None:
            raise ValueError("lora impl 'native' needs the native kernel (model/native.py load_native_lora)")
        if slot_list is not None:
            active_list = tuple(sorted(set(slot_list) - {0}))
        else:
            active = torch.unique(slots)  # sorted
            active_list = tuple(active[active != 0].tolist())
        if not active_list:
            return None
        return LoraBatch(
            slots=slots,
            active_list=active_list,
            dtype=dtype,
            impl=impl,
            native=native if impl in ("auto", "native") else None,
        )

    @functools.cached_property
    def onehot(self) -> torch.Tensor:
        """[N, U] compute dtype, 1 where token n uses ``active_list[u]``: made when a torch kernel first
        routes a module (the native kernels never need it; made every step, it cost a few tens of us)."""
        active = torch.tensor(self.active_list, dtype=torch.long, device=self.slots.device)  # [U]
        return (self.slots[:, None] == active[None, :]).to(self.dtype)

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
        routing = ModuleRouting(self.slots, active_list, onehot, rank)
        self._routings[(cols, rank)] = routing
        return routing


class LoraContext:
    """Holder of the current step's routing; one per model, set by the runner around a forward."""

    def __init__(self) -> None:
        self.batch: LoraBatch | None = None
        # bumped whenever a MultiLoRALinear reallocates its slot tables (a new rank capacity): what
        # holds their addresses (model/native_layers.py) reads them again
        self.generation = 0


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
        return (x @ a[slot, :r].T).masked_fill_(route.off, 0) @ bt[slot, :r]  # [N, out]
    # index_select on the rank-sliced view copies ~4x faster than advanced indexing a[active, :r].
    a_u = a[:, :r].index_select(0, route.active).reshape(n_active * r, -1)  # [U*r, in]
    bt_u = bt[:, :r].index_select(0, route.active).reshape(n_active * r, -1)  # [U*r, out]
    h = x @ a_u.T  # [N, U*r]
    h.masked_fill_(route.off, 0)
    return h @ bt_u  # [N, out]


def lora_delta_token(x: torch.Tensor, route: ModuleRouting, a: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """x [N, in] -> [N, out]: each token's own adapter, read in place (no per-token copy).

    Both products are gather-weighted sums, which ``embedding_bag`` computes straight from the slot
    tables with an fp32 accumulator: with ``At = A.transpose`` stored contiguous ([S, in, r_cap], the
    layout of ``MultiLoRALinear``), ``h[n] = sum_i x[n, i] * At[s[n], i]`` (a bag of ``in`` rows, r_cap wide)
    and ``delta[n] = sum_j h[n, j] * Bt[s[n], j]`` (a bag of ``rank`` rows, out wide). Tokens whose
    adapter does not target the module get empty bags (zeros). Measured against the former
    ``index_select`` copy + ``bmm`` kernel: 2-4x faster in bf16 (whose tiny ``bmm`` is slow) and
    1.2-3x in fp32 (docs/architecture.md, "Measured facts" 3). Each token's sums run alone in a fixed
    order, so a row's delta does not depend on the rest of the step; in bf16 it can differ from the
    matmul kernels' (``dense``, ``grouped``, ``gather``, bit-equal to each other) by one rounding.
    """
    n_slots, r_cap, d_in = a.shape
    at = a.transpose(1, 2)  # [S, in, r_cap]
    if not at.is_contiguous():  # a caller's own [S, r_cap, in] tensor; the module's storage already is
        at = at.contiguous()
    idx, off = route.bag(d_in, d_in)
    x_in = x if route.all_tokens else x.index_select(0, route.tokens)  # [M, in]
    h = F.embedding_bag(
        idx, at.view(n_slots * d_in, r_cap), off, mode="sum", per_sample_weights=x_in.reshape(-1)
    )  # [N, r_cap]
    rank = route.rank
    idx, off = route.bag(r_cap, rank)
    h_in = h if route.all_tokens else h.index_select(0, route.tokens)  # [M, r_cap]
    if rank < r_cap:
        h_in = h_in[:, :rank]
    return F.embedding_bag(
        idx, bt.reshape(n_slots * r_cap, -1), off, mode="sum", per_sample_weights=h_in.reshape(-1)
    )  # [N, out]


def lora_delta_grouped(x: torch.Tensor, route: ModuleRouting, a: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """x [N, in] -> [N, out]: two plain matmuls per active adapter on its own tokens, a view of ``x``
    where they are one run (a prompt chunk), gathered otherwise. The token lists are found once per
    step (``ModuleRouting.groups``), not per layer."""
    r = route.rank
    out = x.new_zeros(x.shape[0], bt.shape[2])  # [N, out]
    for slot, tokens in route.groups:
        if isinstance(tokens, slice):
            out[tokens] = (x[tokens] @ a[slot, :r].T) @ bt[slot, :r]  # [n_s, out]
        else:
            h = x.index_select(0, tokens) @ a[slot, :r].T  # [n_s, r]
            out.index_copy_(0, tokens, h @ bt[slot, :r])  # [n_s, out]
    return out


def choose_impl(n_tokens: int, n_adapters: int, d_in: int, d_out: int, rank: int) -> Impl:
    """The kernel the cost model above expects to be fastest for a module's share of a step."""
    if n_adapters == 1:
        return "dense"  # two plain matmuls
    macs = n_tokens * rank * (d_in + d_out)  # one adapter's product for every token
    costs: dict[Impl, float] = {
        "token": n_tokens * rank * (d_in * TOKEN_US_PER_IN_ELEMENT + d_out * TOKEN_US_PER_OUT_ELEMENT),
        "dense": DENSE_US_FIXED + n_adapters * macs * DENSE_US_PER_MAC,
        "grouped": n_adapters * GROUPED_US_PER_ADAPTER + macs * GROUPED_US_PER_MAC,
    }
    return min(costs, key=lambda impl: costs[impl])


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
    if impl in ("auto", "native"):  # "native": a call the C kernel does not take
        impl = choose_impl(x.shape[0], len(route.active_list), x.shape[1], bt.shape[2], route.rank)
    if impl == "grouped":
        return lora_delta_grouped(x, route, a, bt)
    if impl == "token":
        return lora_delta_token(x, route, a, bt)
    return lora_delta_dense(x, route, a, bt)


@dataclass
class SlotWrites:
    """Copies and zeroings staged by :meth:`MultiLoRALinear.stage_write` over many modules, run as two
    fused calls: one adapter's 420 copies on SmolLM2 cost ~2,000 torch calls issued one by one, each
    giving up and taking back the GIL, which the server's other threads then hold for a while.

    Each module is staged at most once per run (a second staging could resize its buffers under the
    views staged first). What was staged must run even when a later module's staging fails: the
    ranks are recorded already, and a slot recorded as empty must hold zeros."""

    dst: list[torch.Tensor] = field(default_factory=list)
    src: list[torch.Tensor] = field(default_factory=list)
    zeros: list[torch.Tensor] = field(default_factory=list)

    def run(self) -> None:
        if self.dst and self.dst[0].device == self.src[0].device:  # the CPU server: weights and slots
            torch._foreach_copy_(self.dst, self.src)
        else:  # host weights into GPU slots: one copy each, as before (no fused cross-device copy)
            for dst, src in zip(self.dst, self.src, strict=True):
                dst.copy_(src)
        if self.zeros:
            torch._foreach_zero_(self.zeros)
        self.dst, self.src, self.zeros = [], [], []


class MultiLoRALinear(nn.Module):
    """A base Linear (plain, bitsandbytes 4/8-bit, ...) plus stacked per-slot LoRA weights.

    ``lora_a`` [slots, r_cap, in] and ``lora_bt`` [slots, r_cap, out] (B transposed, pre-scaled) are in the
    compute dtype. ``lora_a`` is a view of the buffer ``lora_at`` [slots, in, r_cap] (contiguous): the
    ``token`` kernel reads ``At`` rows in place, the others take ``lora_a`` as any strided tensor.
    ``r_cap`` is the largest rank any slot's adapter has on this module (on CPU rounded up by
    ``aligned_rank``, unless ``align_ranks`` says otherwise), so a module no loaded adapter targets holds
    no storage, and one big adapter costs its rank on the modules it targets only. Rows past a slot's
    own rank, every row of a free slot and all of slot 0 stay zero: the ``gather`` reference reads them.
    Writing a slot is the slot manager's job (:meth:`write_slot`, :meth:`clear_slot`), always on the
    engine thread between steps, so a resize never races a forward.
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
        align_ranks: bool | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        # r_cap rounded up to the native kernel's token-block ranks (default: on CPU, where it runs)
        self.align_ranks = device.type == "cpu" if align_ranks is None else align_ranks
        self.in_features = in_features
        self.out_features = out_features
        self.context = context
        self.r_max = r_max  # the largest rank write_slot accepts (--max-lora-rank); nothing is allocated for it
        self.slot_ranks = [0] * num_slots  # rank of each slot's adapter on this module (0: none)
        # [slots] the same as a tensor, for the native kernel; written through a numpy view of its memory,
        # since a torch element write costs ~5 us and a load writes one per wrapped Linear
        self._slot_rank_np = np.zeros(num_slots, dtype=np.int64)
        self.slot_rank_t = torch.from_numpy(self._slot_rank_np)
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> its rows in both buffers
        self._r_cap = 0  # the buffers' rank capacity (their last dim), set where they are allocated
        # Rank capacity 0: no adapter is loaded yet, so no storage (slot 0 is zeros by having no rows).
        self.register_buffer(
            "lora_at", torch.zeros(num_slots, in_features, 0, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer(
            "lora_bt", torch.zeros(num_slots, 0, out_features, dtype=dtype, device=device), persistent=False
        )

    lora_at: torch.Tensor
    lora_bt: torch.Tensor

    @property
    def lora_a(self) -> torch.Tensor:
        """A [slots, r_cap, in]: a transposed view of ``lora_at`` (writes go through to it)."""
        return self.lora_at.transpose(1, 2)

    @property
    def rank_capacity(self) -> int:
        """r_cap: the rank every slot is padded to on this module (the largest loaded rank, aligned, or 0)."""
        return self._r_cap

    def slot_memory_bytes(self) -> int:
        """Bytes held by this module's slot buffers. Safe from any thread: it reads two tensors' sizes."""
        at, bt = self.lora_at, self.lora_bt
        return int(at.nbytes) + int(bt.nbytes)

    def clear_slot(self, slot: int) -> None:
        """Free ``slot`` on this module; shrink the buffers if its adapter was the one that set r_cap."""
        writes = SlotWrites()
        self.stage_clear(slot, writes)
        writes.run()

    def write_slot(self, slot: int, a: torch.Tensor | None, b_scaled: torch.Tensor | None) -> None:
        """a [r, in], b_scaled [out, r]; None clears the slot (adapter does not target this module).

        Grows the buffers first when ``r`` exceeds r_cap, and shrinks them when this slot held the
        largest rank and the new adapter's is smaller; either way the whole slot is rewritten, so no
        rows of the previous adapter survive.
        """
        writes = SlotWrites()
        self.stage_write(slot, a, b_scaled, writes)
        writes.run()

    def stage_clear(self, slot: int, writes: SlotWrites) -> None:
        """:meth:`clear_slot`, its zeroing added to ``writes`` (run later, with other modules')."""
        if self.slot_ranks[slot] == 0:  # a slot of rank 0 holds zeros already (nothing else writes them)
            return
        self._set_rank(slot, 0)
        at, bt = self._slot_views(slot)
        writes.zeros += (at, bt)

    def stage_write(self, slot: int, a: torch.Tensor | None, b_scaled: torch.Tensor | None, writes: SlotWrites) -> None:
        """:meth:`write_slot`, its copies added to ``writes``: the bookkeeping (ranks, a resize) is done
        now, the bytes move when ``writes`` runs. ``a`` and ``b_scaled`` must live until then."""
        if a is None or b_scaled is None or a.shape[0] == 0:
            self.stage_clear(slot, writes)
            return
        r = int(a.shape[0])
        if r > self.r_max:
            raise ValueError(f"rank {r} exceeds max_lora_rank {self.r_max}")
        if a.shape != (r, self.in_features) or b_scaled.shape != (self.out_features, r):
            raise ValueError(
                f"LoRA shapes {tuple(a.shape)} / {tuple(b_scaled.shape)} do not fit a "
                f"{self.in_features}->{self.out_features} Linear"
            )
        self._set_rank(slot, r)
        at, bt = self._slot_views(slot)  # [in, r_cap], [r_cap, out]
        if r == at.shape[1]:
            writes.dst += (at, bt)
        else:  # rows past this rank: zeros (the slot's last adapter may have had more)
            writes.dst += (at[:, :r], bt[:r])
            writes.zeros += (at[:, r:], bt[r:])
        writes.src += (a.T, b_scaled.T)

    def _slot_views(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(At [in, r_cap], Bt [r_cap, out]) of ``slot``, made once per buffer (a view costs ~1 us)."""
        views = self._views.get(slot)
        if views is None:
            views = self._views[slot] = (self.lora_at[slot], self.lora_bt[slot])
        return views

    def _apply(self, fn: Any, recurse: bool = True) -> MultiLoRALinear:
        """``.to()``, ``.cuda()``, ... replace the buffers: the slot views cached over the old ones go."""
        self._views.clear()
        return super()._apply(fn, recurse)

    def _set_rank(self, slot: int, r: int) -> None:
        """Record ``slot``'s rank here and resize the buffers when r_cap = max(ranks) changes with it."""
        old = self.slot_ranks[slot]
        self.slot_ranks[slot] = r
        self._slot_rank_np[slot] = r
        if r > self._r_cap or r < old:  # else r_cap is what it was
            try:
                self._fit()
            except BaseException:  # no room for the new capacity (out of memory): the rank stays as it was
                self.slot_ranks[slot] = old
                self._slot_rank_np[slot] = old
                raise

    def _fit(self) -> None:
        """Reallocate both buffers at r_cap = max(slot_ranks) (aligned) when that differs from what they hold.

        Every slot keeps its rows below min(old, new) r_cap; all other rows are zero. Between steps the
        old buffers have no other reader, so they are freed as soon as they are replaced.
        """
        r_cap = max(self.slot_ranks)
        if self.align_ranks:
            r_cap = aligned_rank(r_cap)
        if r_cap == self._r_cap:
            return
        keep = min(r_cap, self._r_cap)
        old_at, old_bt = self.lora_at, self.lora_bt
        at = old_at.new_zeros(old_at.shape[0], self.in_features, r_cap)  # [slots, in, r_cap]
        bt = old_bt.new_zeros(old_bt.shape[0], r_cap, self.out_features)  # [slots, r_cap, out]
        at[:, :, :keep].copy_(old_at[:, :, :keep])
        bt[:, :keep].copy_(old_bt[:, :keep])
        self.lora_at = at
        self.lora_bt = bt
        self._r_cap = r_cap
        self._views.clear()
        self.context.generation += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, in] (any leading dims)
        y = self.base(x)
        if torch.compiler.is_compiling():  # traced by torch.compile: the LoRA runs outside the graph
            return self._add_lora_outside_graph(x, y)
        return self._add_lora(x, y)  # eager: without the wrapper's ~3 us a call (210 calls a decode step)

    # Outside any torch.compile graph (``compile_base`` in model/loader.py): the routing is per-step
    # Python state, and the LoRA math stays the eager, PEFT-exact kernels.
    @torch.compiler.disable
    def _add_lora_outside_graph(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._add_lora(x, y)

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = self.context.batch
        if batch is None:  # base-only step
            return y
        at = self.lora_at  # [slots, in, r_cap]; read once (a buffer: each read is nn.Module's __getattr__)
        r_cap = int(at.shape[2])
        if r_cap == 0:  # no loaded adapter targets us
            return y
        flat = x.reshape(-1, self.in_features).to(at.dtype)  # [N, in]
        native = batch.native
        if native is not None and y.is_contiguous():
            y_flat = y.view(-1, self.out_features)  # [N, out]
            if NativeLora.takes(y_flat, flat, at):  # every call it takes, whatever the step (module doc)
                native.add_(y_flat, flat, at, self.lora_bt, batch.slots, self.slot_rank_t)
                return y
        delta = lora_delta(flat, batch, self.slot_ranks, self.lora_a, self.lora_bt)  # [N, out]
        if delta is None:
            return y
        return y + delta.view(y.shape).to(y.dtype)


def slot_memory_bytes(layers: Iterable[MultiLoRALinear]) -> int:
    """Bytes held by the slot buffers of ``layers`` (all of a model's: what the slot-memory gauge reports)."""
    return sum(layer.slot_memory_bytes() for layer in layers)
