"""One forward over a ragged batch: prefill chunks and decode tokens of many rows at once.

The Linears (and their LoRA) run on all the step's tokens flattened together. Attention, on a CPU
with the native kernel (model/native.py, the default where a C compiler is found), takes every token
of the step on its own, decoding or prompt, over its KV row as it lies; with torch's matmuls it runs
per group: every decoding row (one new token) in one batched attention over the KV cache, each
prompt chunk on its own. Both are q . K, an fp32 softmax and . V, so that a row's numbers depend
neither on its batch neighbours nor on where its prefix was computed (torch's matmuls keep that only
where oneDNN's bf16 kernel does not change with the row count: not on CPUs with AMX). The KV cache is
one preallocated slab per layer, a row per running request.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from lorafleet_server.model.lora import Impl, LoraBatch, LoraContext
from lorafleet_server.model.native import GLUE_DTYPES, AttentionRows, NativeAttention, NativeLora
from lorafleet_server.model.native_layers import DriverLayer, DriverShape, LayerDriver, NativeLayers
from lorafleet_server.model.packed import NativeLinearModule
from lorafleet_server.model.sampler import torch_argmax
from lorafleet_server.model.threads import CALIBRATION_TOKENS, StepThreads


@dataclass(frozen=True)
class RowStep:
    """One request's share of a step."""

    kv_row: int  # row of the KV slab this request owns
    start: int  # tokens of this request already in its KV row
    token_ids: tuple[int, ...]  # the new tokens (a prefill chunk, or one decode token)
    slot: int  # adapter slot (0 = base only)
    want_logits: bool  # return the logits of the last new token
    want_pooled: bool  # return the sum of the final hidden states of the new tokens
    # The tokens are prompt tokens (a prefill chunk). A one-token prompt chunk (what is left after a
    # prefix-cache hit) attends like every prompt chunk, not like a decode token, so a prompt's last
    # position gets the same numbers whether its prefix came from the cache or not.
    prompt: bool = False

    @property
    def decodes(self) -> bool:
        """One new token that attends with the batched decode rows."""
        return len(self.token_ids) == 1 and not self.prompt


@dataclass(frozen=True)
class StepOutput:
    # [rows wanting logits, vocab] in row order: float32, or with step(reuse_logits=True) the LM head's
    # own dtype (the compute dtype)
    logits: torch.Tensor
    pooled: torch.Tensor  # [rows wanting pooled, hidden] float32, sums over the new tokens


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# Norm modules whose forward is transformers' Llama RMSNorm (fp32: weight * x / sqrt(mean(x^2) + eps)),
# which the native kernel's fused residual add + RMSNorm computes; any other norm runs its own forward.
FUSED_NORMS = frozenset({"LlamaRMSNorm"})
# MLP modules whose forward is transformers' Llama MLP (down_proj(act_fn(gate_proj(x)) * up_proj(x))) and
# activations that are SiLU: the native kernel's act_fn(gate) * up replaces those two ops.
FUSED_MLPS = frozenset({"LlamaMLP"})
SILU_ACTIVATIONS = frozenset({"SiLU", "SiLUActivation"})

CLEAN_AHEAD = 64  # KV positions KVCache.ensure_clean zeroes at least at a time


@dataclass(frozen=True)
class _Norm:
    """A norm module, and what the native glue needs of it: its weight and epsilon where its forward is
    transformers' Llama RMSNorm (``FUSED_NORMS``), else None."""

    module: nn.Module
    weight: torch.Tensor | None  # [hidden]
    eps: float

    @staticmethod
    def of(norm: nn.Module) -> _Norm:
        weight = getattr(norm, "weight", None)
        if type(norm).__name__ in FUSED_NORMS and isinstance(weight, torch.Tensor):
            return _Norm(norm, weight, float(cast(float, norm.variance_epsilon)))
        return _Norm(norm, None, 0.0)


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's modules, looked up once: through nn.Module's ``__getattr__`` each lookup cost
    ~0.5 us, ~1,100 of them a decode step."""

    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    scaling: float
    post_norm: _Norm  # before the MLP
    mlp: nn.Module
    silu_mlp: tuple[nn.Module, nn.Module, nn.Module] | None  # (gate, up, down) of a Llama MLP with SiLU
    next_norm: _Norm  # the next layer's input norm, or the model's final norm

    @staticmethod
    def all_of(layers: list[Any], final_norm: nn.Module) -> list[_Layer]:
        norms = [_Norm.of(layer.input_layernorm) for layer in layers] + [_Norm.of(final_norm)]
        out = []
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            silu = type(mlp).__name__ in FUSED_MLPS and type(mlp.act_fn).__name__ in SILU_ACTIVATIONS
            out.append(
                _Layer(
                    q=attn.q_proj,
                    k=attn.k_proj,
                    v=attn.v_proj,
                    o=attn.o_proj,
                    scaling=float(attn.scaling),
                    post_norm=_Norm.of(layer.post_attention_layernorm),
                    mlp=mlp,
                    silu_mlp=(mlp.gate_proj, mlp.up_proj, mlp.down_proj) if silu else None,
                    next_norm=norms[i + 1],
                )
            )
        return out


class KVCache:
    """K and V slabs per layer: [rows, kv_heads, max_seq_len, head_dim] in the compute dtype."""

    def __init__(
        self,
        layers: int,
        rows: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (layers, rows, kv_heads, max_seq_len, head_dim)
        # torch.empty: pages are touched (and cost memory) only as rows fill up. One tensor for every
        # layer, so a row's positions in all layers are one op to copy or zero (a prefix cache hit
        # took 60 tensor ops of Python on the engine thread, each a chance to lose the GIL to the
        # serving threads); ``k[i]``, ``v[i]``: layer i's slab [R, KVH, L, D], contiguous.
        self._k_all = torch.empty(shape, dtype=dtype, device=device)  # [layers, R, KVH, L, D]
        self._v_all = torch.empty(shape, dtype=dtype, device=device)
        self.k = list(self._k_all.unbind(0))
        self.v = list(self._v_all.unbind(0))
        self.rows = rows
        self.max_seq_len = max_seq_len
        # Positions below clean[row] hold finite values. Batched decode reads every row up to the
        # longest row's length; masked-out garbage (uninitialised memory can be NaN) would still
        # poison the output through 0 * NaN, so a row's tail is zeroed before it is first read.
        self._clean = [0] * rows
        # Positions below written[row] hold keys and values of the row's sequence (what `read` may copy).
        self._written = [0] * rows

    def begin(self, row: int) -> None:
        """A new sequence takes ``row``: none of its positions hold that sequence's keys and values yet
        (``read`` refuses them until they are written again); what was written stays finite."""
        self._written[row] = 0

    def mark_written(self, row: int, end: int) -> None:
        """Positions below ``end`` of ``row`` are (or are being) written by real keys and values."""
        self._written[row] = max(self._written[row], end)
        self._clean[row] = max(self._clean[row], end)

    def marks(self, rows: Iterable[int]) -> list[tuple[int, int, int]]:
        """(row, written, clean) of ``rows``, for ``restore_marks`` should the step writing them fail."""
        return [(row, self._written[row], self._clean[row]) for row in rows]

    def restore_marks(self, marks: list[tuple[int, int, int]]) -> None:
        """Undo ``mark_written`` after a failed forward: the positions it covered may hold what
        ``torch.empty`` left (NaN), and were counted clean; ``ensure_clean`` zeroes them again."""
        for row, written, clean in marks:
            self._written[row], self._clean[row] = written, clean

    def read(self, row: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of ``row``'s keys and values at positions [start, end): [layers, kv_heads, end - start,
        head_dim] each (the prefix cache keeps it while the row is reused)."""
        if not 0 <= start <= end <= self._written[row]:
            raise ValueError(f"positions [{start}, {end}) of KV row {row} are not written")
        k = self._k_all[:, row, :, start:end].clone()  # [layers, KVH, n, D]
        v = self._v_all[:, row, :, start:end].clone()
        return k, v

    def write(self, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put keys and values computed before (``read``) at positions [start, start + n) of ``row``;
        k and v are [layers, kv_heads, n, head_dim]."""
        n = k.shape[2] if k.dim() == 4 else 0
        layers, _, kv_heads, _, head_dim = self._k_all.shape
        want = (layers, kv_heads, n, head_dim)  # exactly: the one-op copy below would broadcast others
        if k.shape != want or v.shape != want or not 0 <= start <= start + n <= self.max_seq_len:
            raise ValueError(f"K/V of shape {tuple(k.shape)} do not fit KV row {row} at {start}")
        self.ensure_clean(row, start)  # what lies below stays finite
        self._k_all[:, row, :, start : start + n] = k  # [layers, KVH, n, D]
        self._v_all[:, row, :, start : start + n] = v
        self.mark_written(row, start + n)

    def ensure_clean(self, row: int, length: int) -> None:
        """Positions below ``length`` of ``row`` hold finite values: what is not written yet is zeroed,
        ``CLEAN_AHEAD`` positions at a time. A row shorter than the longest in a decode batch needs one
        more clean position every step; zeroing them one by one took 2 ops per layer and row (~1,900
        tiny ops per 32-row decode step of prompts of unequal length; the serving forward's p50 went
        from ~104 to ~95 ms without them), zeroing ahead takes them once per CLEAN_AHEAD steps.
        Unwritten positions are never read but through a -inf mask."""
        start = self._clean[row]
        if start >= length:
            return
        end = min(self.max_seq_len, max(length, start + CLEAN_AHEAD))
        self._k_all[:, row, :, start:end].zero_()  # every layer's [KVH, n, D] at once
        self._v_all[:, row, :, start:end].zero_()
        self._clean[row] = end


@dataclass(frozen=True)
class AttentionShape:
    """A Llama-family model's attention heads, read from its HF config."""

    heads: int
    kv_heads: int
    head_dim: int

    @staticmethod
    def of(cfg: Any) -> AttentionShape:
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        return AttentionShape(heads, kv_heads, int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads))


# RoPE types whose frequencies are fixed when the model loads (no rescaling by sequence length)
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


def _rope_table(
    rotary: Any, max_seq_len: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos and sin of every position below ``max_seq_len`` ([L, head_dim] each, in ``dtype``), computed by
    the model's own rotary module once; a step looks its tokens' rows up instead of computing them again
    (0.06-0.17 ms of a 32-row decode step, an outside profile). Each entry is one multiply and a cos or
    sin of it, so a row is the same number whether computed alone or in the table. None where the
    frequencies can change with the sequence (dynamic RoPE types) or the module is not Hugging Face's."""
    if getattr(rotary, "rope_type", None) not in STATIC_ROPE_TYPES:
        return None
    positions = torch.arange(max_seq_len, device=device).unsqueeze(0)  # [1, L]
    with torch.no_grad():
        cos, sin = rotary(torch.empty(0, dtype=dtype, device=device), positions)  # [1, L, head_dim] each
    return cos[0].to(dtype).contiguous(), sin[0].to(dtype).contiguous()


class ModelRunner:
    """Runs Llama-family decoder layers of a (LoRA-wrapped) HF causal LM with our own KV cache."""

    def __init__(
        self,
        model: Any,  # a transformers causal LM (dynamically typed)
        context: LoraContext,
        *,
        rows: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
        lora_impl: Impl = "auto",
        threads: StepThreads | None = None,
        native_attention: NativeAttention | None = None,
        native_lora: NativeLora | None = None,
        native_layers: NativeLayers | None = None,
    ) -> None:
        cfg = model.config
        self.model = model
        self.decoder: Any = model.model
        self.layers = list(self.decoder.layers)
        self.context = context
        shape = AttentionShape.of(cfg)
        self.num_heads = shape.heads
        self.num_kv_heads = shape.kv_heads
        self.head_dim = shape.head_dim
        self.hidden_size = int(cfg.hidden_size)
        self.dtype = dtype
        self.device = device
        self.lora_impl: Impl = lora_impl
        if lora_impl == "native" and native_lora is None:
            raise ValueError("lora_impl 'native' needs native_lora (model/native.py load_native_lora)")
        self.native_lora = native_lora  # the C multi-LoRA (model/lora.py "native"), or None
        self.threads = threads  # torch threads per step (model/threads.py); None: torch's setting as it is
        if native_attention is not None:
            native_attention.check_shape(self.num_heads, self.num_kv_heads, self.head_dim, dtype, device)
        # every token's attention in the native kernel (model/native.py), or None: torch's matmuls
        self.native_attention = native_attention
        # in fp32 or bf16 with the native kernel, also its RoPE + K/V write, residual add + RMSNorm and the
        # MLP's SiLU times up (_fused)
        self.fused_glue = True
        self.kv = KVCache(len(self.layers), rows, self.num_kv_heads, max_seq_len, self.head_dim, dtype, device)
        self._rope = _rope_table(self.decoder.rotary_emb, max_seq_len, dtype, device)
        self._logits_buffer: torch.Tensor | None = None  # [rows, vocab] the LM head's: step(reuse_logits=True)
        self._layers = _Layer.all_of(self.layers, self.decoder.norm)
        # the first layer's input norm (the final norm when there are no layers)
        self._first_norm = _Norm.of(self.layers[0].input_layernorm if self.layers else self.decoder.norm)
        # a step's layers in one native call (model/native_layers.py), or None: the loop in _forward
        self.layer_driver: LayerDriver | None = None
        self.layer_driver_reason = "not built (no native layer library given)"
        if native_layers is not None:
            self.layer_driver, self.layer_driver_reason = LayerDriver.of(
                native_layers,
                [
                    DriverLayer(
                        projections=(layer.q, layer.k, layer.v, layer.o, *(layer.silu_mlp or ())),
                        k_slab=self.kv.k[i],
                        v_slab=self.kv.v[i],
                        post_norm=layer.post_norm.weight,
                        post_eps=layer.post_norm.eps,
                        next_norm=layer.next_norm.weight,
                        next_eps=layer.next_norm.eps,
                        scaling=layer.scaling,
                    )
                    for i, layer in enumerate(self._layers)
                ],
                DriverShape(
                    hidden=self.hidden_size,
                    heads=self.num_heads,
                    kv_heads=self.num_kv_heads,
                    head_dim=self.head_dim,
                    intermediate=int(getattr(cfg, "intermediate_size", 0)),
                ),
                native_attention,
                native_lora,  # a step routed to torch's LoRA kernels (LoraBatch.native None) is not taken
                context,
                dtype,
            )

    @torch.inference_mode()
    def step(self, rows: list[RowStep], *, reuse_logits: bool = False) -> StepOutput:
        """One forward over ``rows``. ``reuse_logits``: the logits are the LM head's output in its own
        dtype (the compute dtype, not widened to fp32), written into a buffer this runner keeps and
        overwrites at the next such step (the caller is done with them by then): a fresh [rows, vocab]
        tensor is a new multi-MB mapping each step under the server's fixed mmap threshold
        (lorafleet_server/malloc.py), whose page faults cost ~0.6 ms of a 32-row bf16 decode step, and
        the widening to fp32 another pass over it; greedy rows take ``greedy_tokens`` of them."""
        if not rows:
            raise ValueError("empty step")
        dev = self.device
        ids: list[int] = []
        positions: list[int] = []
        kv_rows: list[int] = []
        slots: list[int] = []
        for r in rows:
            if r.start + len(r.token_ids) > self.kv.max_seq_len:
                raise ValueError(f"row {r.kv_row} would exceed the KV cache length {self.kv.max_seq_len}")
            ids.extend(r.token_ids)
            positions.extend(range(r.start, r.start + len(r.token_ids)))
            kv_rows.extend([r.kv_row] * len(r.token_ids))
            slots.extend([r.slot] * len(r.token_ids))
        # One token alone runs as two identical rows: torch's matmuls take a GEMV path for a single row
        # whose sums round differently (bf16: ~1e-5), so a request decoding alone would drift from the
        # same request decoding beside others. From two rows up a row's result does not depend on the
        # others (docs/architecture.md, "Measured facts" 10).
        lone = len(ids) == 1
        if lone:
            ids, positions, kv_rows, slots = ids * 2, positions * 2, kv_rows * 2, slots * 2
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)  # [N]
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)  # [N]
        row_t = torch.tensor(kv_rows, dtype=torch.long, device=dev)  # [N]
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)  # [N]
        marks = self.kv.marks(r.kv_row for r in rows)
        try:
            for r in rows:
                self.kv.mark_written(r.kv_row, r.start + len(r.token_ids))
            if self.native_attention is None:
                # torch's decode rows read up to the longest one's length, rounded up (decode_len)
                longest = max((r.start + 1 for r in rows if r.decodes), default=0)
                single_end = decode_len(longest, self.kv.max_seq_len)
                for r in rows:
                    if r.decodes:
                        self.kv.ensure_clean(r.kv_row, single_end)
            with self.threads.run(len(ids)) if self.threads is not None else nullcontext():
                self.context.batch = LoraBatch.build(slot_t, self.dtype, self.lora_impl, self.native_lora, slots)
                try:
                    hidden = self._forward(input_ids, pos_t, row_t, rows)  # [N, hidden]
                finally:
                    self.context.batch = None
                return self._outputs(hidden[:1] if lone else hidden, rows, reuse_logits)
        except BaseException:
            self.kv.restore_marks(marks)  # what this step was to write may be unwritten: not clean
            raise

    def _head_into_buffer(self, x: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] in the buffer
        """The LM head of ``x`` in the head's dtype, in the runner's logits buffer: a native Linear writes
        it there, any other head's output is copied in."""
        head = self.model.lm_head
        n = x.shape[0]
        y = None if isinstance(head, NativeLinearModule) else head(x)  # [n, vocab]
        dtype, vocab = (x.dtype, head.out_features) if y is None else (y.dtype, y.shape[1])
        buf = self._logits_buffer
        if buf is None or buf.shape[0] < n or buf.shape[1] != vocab or buf.dtype != dtype or buf.device != x.device:
            buf = torch.empty(max(n, self.kv.rows), vocab, dtype=dtype, device=x.device)
            self._logits_buffer = buf
        return head.into(x, buf[:n]) if y is None else buf[:n].copy_(y)

    def greedy_tokens(self, logits: torch.Tensor) -> list[int]:  # [B, V] fp32 or bf16 -> B token ids
        """Each row's index of its largest logit, as ``logits.float().max(-1).indices`` (the first of
        tied maxima, the first NaN where a row has one): the native kernel reads the LM head's output
        in place where this runner has it (whatever ``fused_glue`` says: the index is torch's either
        way), else torch's max on the logits as they are (on bf16 about as fast as widening them first
        and taking fp32's: 1.24 against 1.15 ms for 32 x 49,152 on one thread)."""
        kernel = self.native_attention
        if (
            kernel is not None
            and logits.dtype in GLUE_DTYPES
            and logits.device.type == "cpu"
            and logits.is_contiguous()
            and logits.dim() == 2
            and logits.shape[1] > 0
        ):
            return cast(list[int], kernel.argmax_rows(logits).tolist())
        return torch_argmax(logits)

    def calibrate_threads(self) -> None:
        """Before serving: time a prompt chunk at each thread count of ``self.threads`` (model/threads.py),
        in KV row 0 (free at startup; the engine overwrites it). Also creates the kernels' primitives
        that the first requests would otherwise wait for."""
        if self.threads is None or not self.threads.adaptive:
            return
        vocab = int(self.model.config.vocab_size)
        ids = tuple(range(1, min(CALIBRATION_TOKENS, vocab - 1, self.kv.max_seq_len) + 1))
        step = [RowStep(kv_row=0, start=0, token_ids=ids, slot=0, want_logits=True, want_pooled=False)]
        threads, self.threads = self.threads, None  # timed by calibrate, not by step
        try:
            threads.calibrate(lambda: self.step(step), len(ids))
        finally:
            self.threads = threads

    def _forward(
        self, input_ids: torch.Tensor, pos_t: torch.Tensor, row_t: torch.Tensor, rows: list[RowStep]
    ) -> torch.Tensor:
        n = input_ids.shape[0]
        h = self.decoder.embed_tokens(input_ids).to(self.dtype)  # [N, hidden]
        if self._rope is not None:  # the same numbers, looked up: [N, head_dim] each
            cos, sin = self._rope[0].index_select(0, pos_t), self._rope[1].index_select(0, pos_t)
        else:
            cos, sin = self.decoder.rotary_emb(h.unsqueeze(0), pos_t.unsqueeze(0))  # [1, N, head_dim] each
            cos = cos[0].to(self.dtype)  # [N, head_dim]
            sin = sin[0].to(self.dtype)
        plan = _AttentionPlan.build(rows, self.device, self.kv.max_seq_len, self.native_attention)
        h, x = self._add_norm(h, None, self._first_norm)  # x [N, hidden]: the first layer's input
        driver, batch = self.layer_driver, self.context.batch
        if driver is not None and self.fused_glue and plan.token_rows is not None and driver.takes(n, batch):
            if driver.run(h, x, cos, sin, row_t, pos_t, batch, plan.token_rows, plan.tokens):
                return x  # [N, hidden]: the final norm's output
        for i, layer in enumerate(self._layers):
            q = layer.q(x).view(n, self.num_heads, self.head_dim)  # [N, H, D]
            k = layer.k(x).view(n, self.num_kv_heads, self.head_dim)  # [N, KVH, D]
            v = layer.v(x).view(n, self.num_kv_heads, self.head_dim)  # [N, KVH, D]
            k_cache, v_cache = self.kv.k[i], self.kv.v[i]  # [R, KVH, L, D]
            q = self._rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, row_t, pos_t)
            o = plan.attend(q, k_cache, v_cache, layer.scaling)  # [N, H, D]
            if n > plan.tokens:  # a lone token's twin row (see step) gets the same attention output
                o[plan.tokens :] = o[: n - plan.tokens]
            h, x = self._add_norm(h, layer.o(o.reshape(n, self.num_heads * self.head_dim)), layer.post_norm)
            h, x = self._add_norm(h, self._mlp(layer, x), layer.next_norm)  # the next layer's input, or the final norm
        return x  # [N, hidden]

    def _fused(self, tensor: torch.Tensor) -> NativeAttention | None:
        """The native kernel's fused glue (RoPE + K/V write, residual add + RMSNorm, the MLP's SiLU times
        up) where this runner computes in fp32 or bf16 with it; None: torch's ops."""
        if self.native_attention is None or tensor.dtype not in GLUE_DTYPES or not self.fused_glue:
            return None
        return self.native_attention

    def _rope_and_cache(
        self,
        q: torch.Tensor,  # [N, H, D]
        k: torch.Tensor,  # [N, KVH, D]
        v: torch.Tensor,  # [N, KVH, D]
        cos: torch.Tensor,  # [N, D]
        sin: torch.Tensor,  # [N, D]
        k_cache: torch.Tensor,  # [R, KVH, L, D]
        v_cache: torch.Tensor,  # [R, KVH, L, D]
        row_t: torch.Tensor,  # [N]
        pos_t: torch.Tensor,  # [N]
    ) -> torch.Tensor:  # [N, H, D]: q rotated; k rotated and v written to their rows and positions
        glue = self._fused(q)
        if glue is not None and all(t.dtype == q.dtype for t in (k, v, cos, sin, k_cache, v_cache)):
            q = q.contiguous()
            glue.rope_kv_(q, k.contiguous(), v.contiguous(), cos, sin, k_cache, v_cache, row_t, pos_t)
            return q
        cos3, sin3 = cos.unsqueeze(1), sin.unsqueeze(1)  # [N, 1, D]
        q = q * cos3 + rotate_half(q) * sin3
        k = k * cos3 + rotate_half(k) * sin3
        k_cache[row_t, :, pos_t] = k.to(k_cache.dtype)
        v_cache[row_t, :, pos_t] = v.to(v_cache.dtype)
        return q

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:  # x [N, hidden] -> [N, hidden]
        """The layer's MLP; a Llama MLP with SiLU takes the native kernel's act_fn(gate) * up where the
        runner's glue is native (``_fused``)."""
        glue = self._fused(x)
        if glue is None or layer.silu_mlp is None:
            return cast(torch.Tensor, layer.mlp(x))
        gate_proj, up_proj, down_proj = layer.silu_mlp
        gate = gate_proj(x)  # [N, intermediate]
        up = up_proj(x)  # [N, intermediate]
        if gate.dtype != x.dtype or up.dtype != x.dtype:
            return cast(torch.Tensor, down_proj(torch.nn.functional.silu(gate) * up))
        return cast(torch.Tensor, down_proj(glue.silu_mul(gate.contiguous(), up.contiguous())))

    def _add_norm(
        self, h: torch.Tensor, delta: torch.Tensor | None, norm: _Norm
    ) -> tuple[torch.Tensor, torch.Tensor]:  # h [N, hidden] (+ delta) -> (that, norm of it)
        glue = self._fused(h)
        weight = norm.weight  # [hidden], or None: not a Llama RMSNorm
        if (
            glue is not None
            and weight is not None
            and weight.dtype == h.dtype
            and (delta is None or delta.dtype == h.dtype)
        ):
            return h, glue.add_rmsnorm_(h, None if delta is None else delta.contiguous(), weight, norm.eps)
        if delta is not None:
            h = h + delta
        return h, norm.module(h)

    def _outputs(self, hidden: torch.Tensor, rows: list[RowStep], reuse_logits: bool = False) -> StepOutput:
        last: list[int] = []
        pooled: list[torch.Tensor] = []
        offset = 0
        for r in rows:
            n = len(r.token_ids)
            if r.want_logits:
                last.append(offset + n - 1)
            if r.want_pooled:
                pooled.append(hidden[offset : offset + n].float().sum(0))  # [hidden]
            offset += n
        if last:
            idx = torch.tensor(last, dtype=torch.long, device=hidden.device)
            x = hidden.index_select(0, idx)  # [rows, hidden]
            logits = self._head_into_buffer(x) if reuse_logits else self.model.lm_head(x).float()  # [rows, vocab]
        else:
            logits = hidden.new_zeros(0, 0, dtype=torch.float32)
        pooled_t = torch.stack(pooled) if pooled else hidden.new_zeros(0, self.hidden_size, dtype=torch.float32)
        return StepOutput(logits=logits, pooled=pooled_t)


# Decode attention's key length is a multiple of this (the longest row's, rounded up; masked past each
# row's end). oneDNN builds a kernel for every new matmul shape (~0.6 ms each here) and keeps up to 1,024
# of them: with a length that grew by one every step, each step built two new ones, and the server's RSS
# grew with that cache.
DECODE_LEN_BUCKET = 16


def decode_len(longest: int, max_seq_len: int) -> int:
    """The key length decode rows attend over: ``longest`` rounded up to DECODE_LEN_BUCKET, at most the
    KV rows' length. Positions past a row's own end are masked (-inf) and zeroed (KVCache.ensure_clean)."""
    return min(max_seq_len, -(-longest // DECODE_LEN_BUCKET) * DECODE_LEN_BUCKET)


# Decode rows attend over a window of KV rows [lo, hi) read in place (a view of the slab, no copy) when
# the step's single-token rows fill at least this share of it; sparser sets gather their rows instead.
DENSE_WINDOW_MIN_FILL = 0.5


@dataclass(frozen=True)
class _AttentionPlan:
    """Which tokens attend how: with the native kernel (``native``), every token as a row of its own
    (``token_rows``); else single-token rows batched together, longer chunks one by one.

    Single-token (decode) rows attend over a window ``[lo, hi)`` of KV rows:
    a view of the slab when the rows are dense in it (the engine hands out the lowest free rows, so they
    usually are), else the rows gathered; scores and softmax are plain matmuls with an fp32 softmax:
    torch's CPU SDPA for one query token is ~5x slower in bf16 than this (docs/architecture.md,
    "Compute dtype").
    """

    single_tok: torch.Tensor  # [B] token index of each single-token row
    window: torch.Tensor  # [B] position of each single-token row in the window
    gather: torch.Tensor | None  # [W] KV rows of the window, or None: the window is rows [lo, lo + W)
    lo: int
    width: int  # W, the window's number of KV rows
    bias: torch.Tensor  # [W, 1, 1, Lmax] fp32: 0 where the key is valid, -inf elsewhere
    single_len: int  # Lmax
    chunks: tuple[tuple[int, int, int, int], ...]  # (token offset, n tokens, kv row, start)
    chunk_bias: tuple[torch.Tensor, ...]  # per chunk [n, start + n] fp32: 0 on and before the position, -inf after
    tokens: int  # the step's tokens, N
    native: NativeAttention | None = None  # the kernel every token goes to, or None: the matmuls above
    token_rows: AttentionRows | None = None  # the step's tokens as ``native`` takes them

    @staticmethod
    def build(
        rows: list[RowStep], device: torch.device, max_seq_len: int, native: NativeAttention | None = None
    ) -> _AttentionPlan:
        single_tok: list[int] = []
        single_rows: list[int] = []
        single_end: list[int] = []
        chunks: list[tuple[int, int, int, int]] = []
        offset = 0
        for r in rows:
            n = len(r.token_ids)
            if r.decodes:
                single_tok.append(offset)
                single_rows.append(r.kv_row)
                single_end.append(r.start + 1)
            else:
                chunks.append((offset, n, r.kv_row, r.start))
            offset += n
        if native is not None:
            # every token is a row of the kernel: a chunk's token i attends over its KV row's first
            # start + i + 1 positions, so its numbers are those it would get decoding
            for tok0, n, kv_row, start in chunks:
                single_tok.extend(range(tok0, tok0 + n))
                single_rows.extend([kv_row] * n)
                single_end.extend(range(start + 1, start + n + 1))
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return _AttentionPlan(
                single_tok=empty,
                window=empty,
                gather=None,
                lo=0,
                width=0,
                bias=torch.zeros(0, 1, 1, 0, device=device),
                single_len=0,
                chunks=(),
                chunk_bias=(),
                tokens=offset,
                native=native,
                token_rows=AttentionRows.of(single_tok, single_rows, single_end),
            )
        chunk_list = tuple(chunks)
        chunk_bias = tuple(_causal_bias(start, n, device) for _, n, _, start in chunks)
        lmax = decode_len(max(single_end, default=0), max_seq_len)
        lo = min(single_rows, default=0)
        span = max(single_rows, default=-1) + 1 - lo
        if single_rows and len(single_rows) >= DENSE_WINDOW_MIN_FILL * span:
            width, window, gather = span, [row - lo for row in single_rows], None
        else:  # sparse: gather the rows, in step order
            width, window = len(single_rows), list(range(len(single_rows)))
            gather = torch.tensor(single_rows, dtype=torch.long, device=device)
        # Window rows outside the step keep one valid key (their output is discarded): no all -inf row.
        ends = torch.ones(width, dtype=torch.long)  # [W]
        ends[window] = torch.tensor(single_end, dtype=torch.long)
        valid = torch.arange(lmax)[None, :] < ends[:, None]  # [W, Lmax]
        bias = torch.zeros(width, lmax).masked_fill_(~valid, float("-inf"))  # [W, Lmax]
        return _AttentionPlan(
            single_tok=torch.tensor(single_tok, dtype=torch.long, device=device),
            window=torch.tensor(window, dtype=torch.long, device=device),
            gather=gather,
            lo=lo,
            width=width,
            bias=bias.to(device)[:, None, None, :],
            single_len=lmax,
            chunks=chunk_list,
            chunk_bias=chunk_bias,
            tokens=offset,
        )

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """q [N, H, D] (rotated) -> attention output [N, H, D]; the step's K/V are already cached."""
        out = torch.empty_like(q)
        if self.native is not None and self.token_rows is not None:
            if self.token_rows.count:
                self.native(q, k_cache, v_cache, out, self.token_rows, scale)
        elif self.single_tok.numel():
            out.index_copy_(
                0, self.single_tok, self._attend_single(q.index_select(0, self.single_tok), k_cache, v_cache, scale)
            )
        for (offset, n, row, _start), bias in zip(self.chunks, self.chunk_bias, strict=True):
            out[offset : offset + n] = _attend_chunk(q[offset : offset + n], k_cache[row], v_cache[row], bias, scale)
        return out

    def _attend_single(
        self, q_s: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q_s [B, H, D] of the single-token rows -> their attention output [B, H, D]."""
        heads, d = q_s.shape[1], q_s.shape[2]
        kv_heads = k_cache.shape[1]
        lmax = self.single_len
        if self.gather is None:
            k = k_cache[self.lo : self.lo + self.width, :, :lmax]  # [W, KVH, Lmax, D], a view
            v = v_cache[self.lo : self.lo + self.width, :, :lmax]
        else:
            k = k_cache[:, :, :lmax].index_select(0, self.gather)  # [W, KVH, Lmax, D]
            v = v_cache[:, :, :lmax].index_select(0, self.gather)
        q_w = q_s.new_zeros(self.width, heads, d).index_copy_(0, self.window, q_s)  # [W, H, D]
        q_w = q_w.view(self.width, kv_heads, heads // kv_heads, d)  # [W, KVH, G, D]: G query heads per KV head
        if k.dtype == torch.float32:
            scores = torch.matmul(q_w, k.transpose(-1, -2)).float() * scale  # [W, KVH, G, Lmax]
            probs = torch.softmax(scores + self.bias, dim=-1).to(v.dtype)  # [W, KVH, G, Lmax]
        else:
            # bf16: K on the left. The window's rows are strided in the slab, so the batched matmul
            # copies its operands; K^T is a transposing copy, 2x the cost of copying K as it lies.
            scores_t = torch.matmul(k, q_w.transpose(-1, -2))  # [W, KVH, Lmax, G]
            scores = scores_t.transpose(-1, -2).to(torch.float32, memory_format=torch.contiguous_format) * scale
            probs = torch.softmax(scores + self.bias, dim=-1).to(v.dtype)  # [W, KVH, G, Lmax]
        o = torch.matmul(probs, v).view(self.width, heads, d)  # [W, KVH, G, D] -> [W, H, D]
        return o.index_select(0, self.window)  # [B, H, D]


def _causal_bias(start: int, n: int, device: torch.device) -> torch.Tensor:
    """[n, start + n] fp32: query i (at position start + i) may see keys 0..start + i (0), not later ones (-inf)."""
    qpos = torch.arange(start, start + n, device=device)[:, None]  # [n, 1]
    kpos = torch.arange(start + n, device=device)[None, :]  # [1, L]
    return torch.zeros(n, start + n, device=device).masked_fill_(kpos > qpos, float("-inf"))


def _attend_chunk(
    q: torch.Tensor, k_row: torch.Tensor, v_row: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """A prompt chunk's causal attention: q [n, H, D] at positions [start, start + n), its KV row's
    k_row / v_row [KVH, max_seq_len, D] (the chunk's own K/V already written) and its causal ``bias``
    [n, start + n] (``_causal_bias``, built once per step) -> [n, H, D].

    The same math as the decode rows (q @ K^T, fp32 softmax with a -inf bias, @ V), not torch's SDPA:
    SDPA's CPU kernel blocks its sums by the chunk's query and key counts, so a position computed in
    one prompt's prefill rounds differently from the same position in another's, and a prefix-cache
    hit (K/V computed by an earlier prompt sharing the prefix) changed a bf16 request's greedy text.
    Here each score is a dot product over head_dim and each output sums one row of probabilities,
    zeros past the position, so a position's numbers do not depend on the chunk around it.
    """
    n, heads, d = q.shape
    kv_heads = k_row.shape[0]
    length = bias.shape[1]  # start + n
    q_h = q.transpose(0, 1).reshape(kv_heads, heads // kv_heads * n, d)  # [KVH, G*n, D]: query heads of one KV head
    scores = torch.matmul(q_h, k_row[:, :length].transpose(-1, -2)).float() * scale  # [KVH, G*n, L]
    scores = scores.view(kv_heads, heads // kv_heads, n, length) + bias  # [KVH, G, n, L]
    probs = torch.softmax(scores, dim=-1).to(v_row.dtype).view(kv_heads, heads // kv_heads * n, length)
    o = torch.matmul(probs, v_row[:, :length])  # [KVH, G*n, D]
    return o.view(heads, n, d).transpose(0, 1)  # [n, H, D]
