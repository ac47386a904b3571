"""A step's decoder layers in one native call (``csrc/layers.c``).

Where every piece of a Llama layer already runs in a native kernel (the base Linears, the multi-LoRA,
RoPE + K/V write, the attention, residual add + RMSNorm, SiLU x up), the runner's Python loop over the
layers is only glue: ~19 ctypes calls a layer, each with its tensor checks, ``data_ptr`` reads, output
allocation and nn.Module dispatch, ~5 ms of a 32-row decode step on the AMX Xeon (docs/architecture.md,
"Measured facts" 18). ``csrc/layers.c`` makes the same calls with the same arguments from C: it only
holds the kernels' addresses (each stays in its own library), a table of every layer's weights, slot
tables and KV slabs built once, and one workspace for the activations. So a step's numbers are the
loop's, bit for bit; the tests check that on every path it takes. (In bf16 the Linears of one input,
q, k and v or gate and up, run as one ``lf_linear_parts`` call before their LoRAs: one call's start and
end instead of three, the same numbers.)

It takes a step (:meth:`LayerDriver.takes`) only where the loop would call the native kernel for every
one of those pieces: Llama layers with RMSNorm and a SiLU MLP, every projection a native Linear (bf16
on AMX or AVX-512 BF16, or fp32 on AVX2), the LoRA, the attention and the Linears on the same pool (or none), and a step
whose adapted modules take the native LoRA: any step without adapters, and any with them where the
server built the native LoRA (``auto`` takes it for every call it takes). Anything else (a compiled
or quantized base, torch's attention) runs the loop.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorafleet_server.model.lora import LoraBatch, LoraContext, MultiLoRALinear
from lorafleet_server.model.native import (
    MAX_LORA_RANK,
    AttentionRows,
    KernelChoice,
    NativeAttention,
    NativeKernelError,
    NativeLinear,
    NativeLinearF32,
    NativeLora,
    _functions,
    build_library,
    native_or_fallback,
    threads_and_pool,
)
from lorafleet_server.model.options import LayersKernel
from lorafleet_server.model.packed import NativeLinearModule

LAYERS_SOURCE = "layers.c"
# Tokens of the step the activations' workspace first holds (a decode step's); it grows to the longest seen.
SHORT_STEP_TOKENS = 64
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")  # csrc/layers.c's PROJ_ order
# csrc/layers.c's OP_ codes, for errors
_OPS = ("", "q", "k", "v", "RoPE", "attention", "o", "post-attention norm", "gate", "up", "SiLU", "down", "next norm")
_OP_LORA = 16

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


class _Proj(ctypes.Structure):
    _fields_ = [
        ("packed", _P),
        ("bias", _P),
        ("lora_at", _P),
        ("lora_bt", _P),
        ("ranks", _P),
        ("d_in", _I64),
        ("d_out", _I64),
        ("r_cap", _I64),
    ]


class _LayerTable(ctypes.Structure):
    _fields_ = [
        ("proj", _Proj * len(PROJECTIONS)),
        ("k_slab", _P),
        ("v_slab", _P),
        ("post_norm", _P),
        ("next_norm", _P),
        ("post_eps", ctypes.c_float),
        ("next_eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        ("linear", _P),
        ("linear_parts", _P),
        ("lora", _P),
        ("rope_kv", _P),
        ("attention", _P),
        ("add_rmsnorm", _P),
        ("silu_mul", _P),
        ("pool", _P),
        ("linear_bf16", ctypes.c_int),
        ("linear_threads", ctypes.c_int),
        ("threads", ctypes.c_int),
        ("bf16", ctypes.c_int),
        ("hidden", _I64),
        ("heads", _I64),
        ("kv_heads", _I64),
        ("head_dim", _I64),
        ("intermediate", _I64),
        ("kv_rows", _I64),
        ("max_seq_len", _I64),
        ("n_slots", _I64),
        ("n", _I64),
        ("tokens", _I64),
        ("att_count", _I64),
        ("h", _P),
        ("x", _P),
        ("cos", _P),
        ("sin", _P),
        ("kv_row", _P),
        ("pos", _P),
        ("slots", _P),
        ("att_tok", _P),
        ("att_kv_row", _P),
        ("att_len", _P),
        ("work", _P),
    ]


class NativeLayers:
    """``csrc/layers.c`` through ctypes: the entry point a :class:`LayerDriver` calls."""

    def __init__(self, library: Path) -> None:
        lib, fns = _functions(
            library, {"lf_layers": [ctypes.POINTER(_Step), ctypes.POINTER(_LayerTable), _I64], "lf_layers_ops": []}
        )
        sizes = lib.lf_layers_sizes
        sizes.restype, sizes.argtypes = ctypes.c_int64, []
        mirrors = ctypes.sizeof(_Proj) << 32 | ctypes.sizeof(_LayerTable) << 16 | ctypes.sizeof(_Step)
        if fns["lf_layers_ops"]() != _OP_LORA or sizes() != mirrors:
            raise NativeKernelError(f"{library} lays out its arguments differently from this module")
        self.library = library
        self._lib = lib  # keeps the library loaded while its function lives
        self.fn = fns["lf_layers"]


def load_native_layers(cache_dir: Path, compiler: str | None = None) -> NativeLayers:
    """Build (or find in ``cache_dir``) and load the layer driver."""
    return NativeLayers(build_library(LAYERS_SOURCE, cache_dir, compiler))


@dataclass(frozen=True)
class _Projection:
    base: NativeLinearModule
    lora: MultiLoRALinear | None  # its LoRA wrapper, or None: no adapter can target it


def _projection(module: nn.Module) -> _Projection | None:
    """A projection the driver takes: a native Linear, bare or under a MultiLoRALinear."""
    if isinstance(module, MultiLoRALinear):
        base = module.base
        return _Projection(base, module) if isinstance(base, NativeLinearModule) else None
    return _Projection(module, None) if isinstance(module, NativeLinearModule) else None


@dataclass(frozen=True)
class DriverLayer:
    """What the driver needs of one decoder layer (model/runner.py's ``_Layer``, looked up once)."""

    projections: tuple[nn.Module, ...]  # q, k, v, o, gate, up, down
    k_slab: torch.Tensor  # [R, KVH, L, D]
    v_slab: torch.Tensor  # [R, KVH, L, D]
    post_norm: torch.Tensor | None  # [hidden]: the RMSNorm before the MLP, or None: not an RMSNorm
    post_eps: float
    next_norm: torch.Tensor | None  # [hidden]: the next layer's input RMSNorm or the final one
    next_eps: float
    scaling: float


@dataclass(frozen=True)
class DriverShape:
    """The model's shapes the driver checks its tables against."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


class LayerDriver:
    """The decoder layers of a step in one ``lf_layers`` call; :meth:`of` builds one where the
    model's layers are all native, else says why not."""

    def __init__(
        self,
        native: NativeLayers,
        layers: list[DriverLayer],
        projections: list[tuple[_Projection, ...]],
        shape: DriverShape,
        kernel: NativeLinear | NativeLinearF32,
        attention: NativeAttention,
        lora: NativeLora,
        context: LoraContext,
        dtype: torch.dtype,
    ) -> None:
        self.native = native
        self._layers = layers
        self._projections = projections
        self.shape = shape
        self.context = context
        self.dtype = dtype
        self._kernel = kernel
        kv = layers[0].k_slab
        self._step = _Step(
            linear=kernel.address,
            linear_parts=kernel.parts_address if isinstance(kernel, NativeLinear) else None,
            lora=lora.address,
            rope_kv=attention.addresses["lf_rope_kv"],
            attention=attention.addresses["lf_attention"],
            add_rmsnorm=attention.addresses["lf_add_rmsnorm"],
            silu_mul=attention.addresses["lf_silu_mul"],
            pool=None if attention.pool is None else attention.pool.address.value,
            linear_bf16=1 if isinstance(kernel, NativeLinear) else 0,
            linear_threads=kernel.threads if isinstance(kernel, NativeLinear) else 0,
            bf16=1 if dtype == torch.bfloat16 else 0,
            hidden=shape.hidden,
            heads=shape.heads,
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            intermediate=shape.intermediate,
            kv_rows=kv.shape[0],
            max_seq_len=kv.shape[2],
        )
        self._pool = attention.pool
        q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        per_row = 2 * q_width + 2 * kv_width + shape.hidden + 3 * shape.intermediate  # q, o, k, v, delta, gate, up, act
        self._per_row = per_row
        self._work = torch.empty(SHORT_STEP_TOKENS * per_row, dtype=dtype)  # the activations, reused every step
        self._lora = lora
        # every MultiLoRALinear of a model has the same number of slots
        self._n_slots = next((int(p.lora.slot_rank_t.shape[0]) for ps in projections for p in ps if p.lora), 0)
        self._step.n_slots = self._n_slots
        self._table: ctypes.Array[_LayerTable] | None = None
        self._table_generation = -1

    @staticmethod
    def of(
        native: NativeLayers,
        layers: list[DriverLayer],
        shape: DriverShape,
        attention: NativeAttention | None,
        lora: NativeLora | None,
        context: LoraContext,
        dtype: torch.dtype,
    ) -> tuple[LayerDriver | None, str]:
        """A driver for ``layers`` and why, or None and why not (the runner's Python loop then runs)."""
        if attention is None:
            return None, "torch's attention runs in the layer loop"
        if lora is None:
            return None, "the torch multi-LoRA kernels run in the layer loop"
        if attention.pool is not lora.pool:
            return None, "the attention and the multi-LoRA run on different thread pools"
        if dtype not in (torch.bfloat16, torch.float32) or not layers:
            return None, f"no native layers for {dtype}" if layers else "no decoder layers"
        found: list[tuple[_Projection, ...]] = []
        kernels: set[int] = set()
        for i, layer in enumerate(layers):
            if layer.post_norm is None or layer.next_norm is None:
                return None, f"layer {i} has a norm other than Llama's RMSNorm"
            if layer.post_norm.dtype != dtype or layer.next_norm.dtype != dtype:
                return None, f"layer {i}'s norm weights are not {dtype}"
            if not all(t.is_contiguous() for t in (layer.k_slab, layer.v_slab, layer.post_norm, layer.next_norm)):
                return None, f"layer {i}'s KV slabs or norm weights are not contiguous"
            if len(layer.projections) != len(PROJECTIONS):
                return None, f"layer {i} is not a Llama layer with a SiLU MLP"
            projs = tuple(_projection(m) for m in layer.projections)
            if any(p is None for p in projs):
                return None, f"layer {i} has a projection that is not a native Linear"
            found.append(tuple(p for p in projs if p is not None))
            kernels.update(id(p.base.kernel) for p in found[-1])
        kernel = found[0][0].base.kernel
        if len(kernels) != 1 or kernel.dtype != dtype:
            return None, "the projections do not share one native Linear kernel of the compute dtype"
        if (kernel.pool if isinstance(kernel, NativeLinear) else None) is not attention.pool:
            return None, "the Linears and the attention run on different thread pools"
        want = [
            (shape.hidden, shape.heads * shape.head_dim),
            (shape.hidden, shape.kv_heads * shape.head_dim),
            (shape.hidden, shape.kv_heads * shape.head_dim),
            (shape.heads * shape.head_dim, shape.hidden),
            (shape.hidden, shape.intermediate),
            (shape.hidden, shape.intermediate),
            (shape.intermediate, shape.hidden),
        ]
        for i, projs in enumerate(found):
            if [(p.base.in_features, p.base.out_features) for p in projs] != want:
                return None, f"layer {i}'s projections differ from the model's shapes"
            wrappers = [(p.lora, shape_) for p, shape_ in zip(projs, want, strict=True) if p.lora is not None]
            if any(w.context is not context or (w.in_features, w.out_features) != s for w, s in wrappers):
                return None, f"layer {i} has a LoRA wrapper of another model or shape"
        driver = LayerDriver(native, layers, found, shape, kernel, attention, lora, context, dtype)
        return driver, f"{len(layers)} layers a call ({native.library.name})"

    def takes(self, tokens: int, batch: LoraBatch | None) -> bool:
        """Whether a step of ``tokens`` tokens and this routing runs here: where the loop would take the
        native LoRA for every projection an adapter targets (``MultiLoRALinear._add_lora``: wherever the
        batch carries it). ``tokens`` is any count: the workspace grows to fit."""
        return batch is None or batch.native is not None

    def _layer_table(self) -> ctypes.Array[_LayerTable] | None:
        """The layers' table, rebuilt when a slot table was reallocated (a new rank capacity) since the
        last one; None where a projection's slot table is one the native LoRA does not take."""
        generation = self.context.generation
        if self._table is not None and generation == self._table_generation:
            return self._table
        table = (_LayerTable * len(self._layers))()
        for entry, layer, projs in zip(table, self._layers, self._projections, strict=True):
            for j, p in enumerate(projs):
                base, wrapper = p.base, p.lora
                proj = entry.proj[j]
                proj.packed = base.packed.data_ptr()
                proj.bias = None if base.bias_f32 is None else base.bias_f32.data_ptr()
                proj.d_in, proj.d_out = base.in_features, base.out_features
                if wrapper is not None:
                    at, bt = wrapper.lora_at, wrapper.lora_bt  # [S, in, r_cap], [S, r_cap, out]
                    r_cap = int(at.shape[2])
                    if r_cap > MAX_LORA_RANK or at.dtype != self.dtype or bt.dtype != self.dtype:
                        return None
                    if r_cap and (at.shape[0] != self._n_slots or not (at.is_contiguous() and bt.is_contiguous())):
                        return None
                    proj.lora_at, proj.lora_bt = at.data_ptr(), bt.data_ptr()
                    proj.ranks = wrapper.slot_rank_t.data_ptr()
                    proj.r_cap = r_cap
            entry.k_slab, entry.v_slab = layer.k_slab.data_ptr(), layer.v_slab.data_ptr()
            assert layer.post_norm is not None and layer.next_norm is not None  # checked by of()
            entry.post_norm, entry.next_norm = layer.post_norm.data_ptr(), layer.next_norm.data_ptr()
            entry.post_eps, entry.next_eps, entry.scale = layer.post_eps, layer.next_eps, layer.scaling
        self._table, self._table_generation = table, generation
        return table

    def run(
        self,
        h: torch.Tensor,  # [N, hidden] the residual stream, updated in place
        x: torch.Tensor,  # [N, hidden] the first layer's input (normed); the final norm's output on return
        cos: torch.Tensor,  # [N, D]
        sin: torch.Tensor,  # [N, D]
        kv_row: torch.Tensor,  # [N] int64
        pos: torch.Tensor,  # [N] int64
        batch: LoraBatch | None,
        rows: AttentionRows,
        tokens: int,  # tokens the attention computes; a lone token's twin row copies its output
    ) -> bool:
        """Every layer of the step; False (nothing computed) where a table is one the kernels do not
        take, and the loop must run instead."""
        n = h.shape[0]
        table = self._layer_table()
        if table is None:
            return False
        tensors = (h, x, cos, sin)
        if any(t.dtype != self.dtype or not t.is_contiguous() for t in tensors):
            return False
        if n * self._per_row > self._work.numel():  # a longer step than any before: room for it, kept
            self._work = torch.empty(n * self._per_row, dtype=self.dtype)
        s = self._step
        s.work = self._work.data_ptr()
        threads, _ = threads_and_pool(self._pool)
        s.threads = threads
        if not isinstance(self._kernel, NativeLinear):
            s.linear_threads = threads  # the fp32 kernel runs on the step's torch threads
        s.n, s.tokens, s.att_count = n, tokens, rows.count
        s.h, s.x, s.cos, s.sin = h.data_ptr(), x.data_ptr(), cos.data_ptr(), sin.data_ptr()
        s.kv_row, s.pos = kv_row.data_ptr(), pos.data_ptr()
        s.slots = None if batch is None else batch.slots.data_ptr()
        s.att_tok, s.att_kv_row, s.att_len = rows.tok.data_ptr(), rows.kv_row.data_ptr(), rows.length.data_ptr()
        rc = self.native.fn(ctypes.byref(s), table, len(self._layers))
        if rc != 0:
            layer, op = divmod(rc - 1, 32)
            what = _OPS[op - _OP_LORA] + "'s LoRA" if op > _OP_LORA else _OPS[op]
            raise NativeKernelError(f"the native layers: layer {layer}'s {what} refused its arguments")
        return True


def choose_layers(
    choice: LayersKernel,
    *,
    cache_dir: Path,
    attention: NativeAttention | None,
    lora: NativeLora | None,
    compiler: str | None = None,
) -> KernelChoice[NativeLayers]:
    """``--layers-kernel``: "python" is the runner's loop; "native" the C driver, or NativeKernelError
    where it cannot be built or the step's attention or multi-LoRA is not native; "auto" the C driver
    where those are native and it builds, else the loop with the reason. Whether it then takes the
    model's layers is the runner's :meth:`LayerDriver.of`."""
    if choice == "python":
        return KernelChoice(None, "--layers-kernel python")
    missing = "torch's attention" if attention is None else "the torch multi-LoRA kernels" if lora is None else None
    if missing is not None:
        if choice == "native":
            raise NativeKernelError(f"--layers-kernel native needs the native attention and multi-LoRA, not {missing}")
        return KernelChoice(None, f"{missing} run in the layer loop")
    return native_or_fallback(choice == "native", lambda: load_native_layers(cache_dir, compiler))
