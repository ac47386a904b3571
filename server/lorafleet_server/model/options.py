"""The model layer's named choices, as Literal types (no torch here: the config and CLI import them)."""

from __future__ import annotations

from typing import Literal, get_args

# How the base model's weights are held: "auto" is NF4 on CUDA and "none" (the compute dtype) on CPU.
Quantization = Literal["auto", "none", "nf4", "int8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)

# The multi-LoRA kernel (model/lora.py): "auto" picks one per module and step (the C kernel of
# model/native.py where it is built); "gather" is the reference.
LoraImpl = Literal["auto", "native", "dense", "token", "grouped", "gather"]
LORA_IMPLS: tuple[str, ...] = get_args(LoraImpl)

# The attention of every token (model/native.py): "native" is the C kernel built for this CPU, "torch" the
# matmuls; "auto" is native on CPU where it builds, else torch.
AttentionKernel = Literal["auto", "native", "torch"]
ATTENTION_KERNELS: tuple[str, ...] = get_args(AttentionKernel)

# The base Linears on a CPU (model/packed.py): "native" is the C kernel built for this CPU (AMX in bf16, else
# AVX-512 BF16; AVX2 + FMA or AVX-512 in fp32), "avx512" the AVX-512 BF16 one even where AMX runs (to compare),
# "onednn" oneDNN's prepacked matmul, "torch" F.linear; "auto" is the first of these that runs here in bf16
# (AVX-512 BF16 unless oneDNN times clearly faster at load; fp32: the fastest of native and oneDNN where timed
# faster than F.linear at load).
LinearKernel = Literal["auto", "native", "avx512", "onednn", "torch"]
LINEAR_KERNELS: tuple[str, ...] = get_args(LinearKernel)

# A decode step's decoder layers (model/native_layers.py): "native" is one C call for all of them where
# every kernel of a layer is native, "python" the runner's loop of kernel calls; "auto" is native where
# it applies, else python.
LayersKernel = Literal["auto", "native", "python"]
LAYERS_KERNELS: tuple[str, ...] = get_args(LayersKernel)
