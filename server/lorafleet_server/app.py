"""Assembly: from a ServerConfig to a running engine (model, adapters tiers, scheduler)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from lorafleet_adapters.backend import Store, open_store
from lorafleet_adapters.device_slots import DeviceSlots
from lorafleet_adapters.host_cache import HostCache
from lorafleet_adapters.peft_format import AdapterWeights
from lorafleet_server import __version__
from lorafleet_server.config import ServerConfig
from lorafleet_server.engine.adapter_manager import AdapterManager
from lorafleet_server.engine.engine import Engine
from lorafleet_server.engine.prefix_cache import PrefixCache
from lorafleet_server.engine.types import ModelInfo
from lorafleet_server.errors import StartupError
from lorafleet_server.malloc import fix_mmap_threshold
from lorafleet_server.metrics import DISK_TIER, Metrics
from lorafleet_server.model.loader import LoadedBase, load_base, resolve_device
from lorafleet_server.model.lora import MultiLoRALinear, SlotWrites, slot_memory_bytes
from lorafleet_server.model.native import NativeKernelError, choose_attention, choose_lora, choose_transpose
from lorafleet_server.model.native_layers import choose_layers
from lorafleet_server.model.prepare import prepare_default_model
from lorafleet_server.model.runner import AttentionShape, ModelRunner
from lorafleet_server.model.threads import StepThreads
from lorafleet_server.onednn import onednn_cache_summary
from lorafleet_server.openmp import openmp_wait_summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Service:
    config: ServerConfig
    engine: Engine
    base: LoadedBase
    store: Store
    info: ModelInfo
    metrics: Metrics
    # Bytes the device slots hold now (every MultiLoRALinear's buffers); grows and shrinks with the
    # ranks of the loaded adapters, so it is read when asked, from any thread.
    slot_memory_bytes: Callable[[], int]


def model_dir_for(config: ServerConfig) -> Path:
    return config.model if config.model is not None else prepare_default_model(config.models_dir)


def make_slot_io(layers: dict[str, MultiLoRALinear]) -> tuple[Any, Any]:
    """Functions that write an adapter into (or clear) one slot of every wrapped Linear.

    Each Linear sizes its buffers to the largest rank loaded on it, so a write may grow them and a
    clear shrink them; DeviceSlots calls both on the engine thread between steps.
    """

    def write(slot: int, weights: AdapterWeights) -> None:
        writes = SlotWrites()
        try:
            for name, layer in layers.items():
                pair = weights.modules.get(name)
                if pair is None:
                    layer.stage_clear(slot, writes)
                else:
                    layer.stage_write(slot, pair[0], pair[1], writes)
        finally:  # also when a module refuses its weights: what was recorded is written (see SlotWrites)
            writes.run()

    def clear(slot: int) -> None:
        writes = SlotWrites()
        for layer in layers.values():
            layer.stage_clear(slot, writes)
        writes.run()

    return write, clear


def eos_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, list | tuple):
        ids.update(int(i) for i in extra)
    return frozenset(ids)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)


def torch_threads_for(config: ServerConfig) -> int:
    """Intra-op threads: leave a core to the gRPC and Python threads. With every core in torch's pool,
    any other busy thread stalls each op's thread barrier (measured: a batch-4 decode step went from
    ~85 ms to ~4 s on 2 cores)."""
    if config.torch_threads:
        return config.torch_threads
    return max(1, _cores() - 1)


def step_threads_for(config: ServerConfig, device: torch.device) -> StepThreads | None:
    """Threads per step on a CPU (model/threads.py): ``torch_threads_for``, or every core (or
    ``prefill_threads``) while that measures faster for steps like it (decode steps only without
    ``fixed_decode_threads``). None on other devices."""
    if device.type != "cpu":
        return None
    return StepThreads(
        torch_threads_for(config),
        config.prefill_threads or _cores(),
        measure_decode=not config.fixed_decode_threads,
    )


def build_service(config: ServerConfig, metrics: Metrics | None = None) -> Service:
    """Load the model and wire the tiers, engine and metrics (``metrics``, whose port ``lorafleet serve``
    opens before the load; or new ones on a fresh registry)."""
    from transformers import AutoTokenizer

    log.info("malloc: %s", fix_mmap_threshold())  # before the model's allocations (malloc.py says why)
    log.info("oneDNN caches: %s", onednn_cache_summary())  # set when the package was imported (onednn.py)
    # The store first: a bad URL, a missing bucket, wrong credentials or an unreachable endpoint
    # fail here with the store's own message (StoreUnavailable), before seconds of model loading.
    metrics = metrics if metrics is not None else Metrics(CollectorRegistry())
    store = open_store(config.store_settings, on_cache_event=lambda e: metrics.adapter_event(DISK_TIER, e))
    store.check()
    threads = torch_threads_for(config)
    torch.set_num_threads(threads)
    model_dir = model_dir_for(config)
    device = resolve_device(config.device)
    step_threads = step_threads_for(config, device)
    base = load_base(
        model_dir,
        quantization=config.quantization,
        device=device,
        num_slots=config.max_loaded_adapters + 1,
        max_lora_rank=config.max_lora_rank,
        max_adapter_bytes=config.max_adapter_bytes,
        dtype=config.dtype,
        compile=config.compile,
        linear_kernel=config.linear_kernel,
        kernels_dir=config.kernels_dir,
        compiler=config.c_compiler,
        linear_threads=config.linear_threads or len(os.sched_getaffinity(0)),
        # an fp32 base's Linears are timed at the thread counts of the steps packed Linears serve
        measure_threads=step_threads.small_step_counts if step_threads is not None else (),
    )
    if config.max_seq_len > base.max_position_embeddings:
        raise StartupError(
            f"--max-seq-len {config.max_seq_len} exceeds the model's context of {base.max_position_embeddings}"
        )
    if base.sliding_window is not None and config.max_seq_len > base.sliding_window:
        raise StartupError(
            f"--max-seq-len {config.max_seq_len} exceeds the model's sliding attention window of "
            f"{base.sliding_window}: lorafleet attends to every earlier position, which matches the model "
            f"only up to the window; use --max-seq-len {base.sliding_window} or less"
        )
    tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
    write, clear = make_slot_io(base.lora_layers)
    slots = DeviceSlots(config.max_loaded_adapters, write, clear, lambda e: metrics.adapter_event("device", e))
    host_cache = HostCache(config.host_cache_bytes, lambda e: metrics.adapter_event("host", e))
    transpose = choose_transpose(cache_dir=config.kernels_dir, compiler=config.c_compiler)
    log.info("adapter host layout: %s (%s)", transpose.name, transpose.reason)
    manager = AdapterManager(
        store,
        base.spec,
        host_cache,
        slots,
        observer=metrics,
        poll_seconds=config.adapter_poll_seconds,
        rescan_seconds=config.adapter_rescan_seconds,
        host_dtype=base.dtype,
        host_transpose=transpose.kernel,
    )
    shape = AttentionShape.of(base.model.config)
    attention = choose_attention(
        config.attention_kernel,
        cache_dir=config.kernels_dir,
        compiler=config.c_compiler,
        heads=shape.heads,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        dtype=base.dtype,
        device=base.device,
        pool=base.pool,
    )
    log.info("attention: %s (%s)", attention.name, attention.reason)
    lora = choose_lora(
        config.lora_impl,
        cache_dir=config.kernels_dir,
        compiler=config.c_compiler,
        device=base.device,
        pool=base.pool,
    )
    log.info("multi-LoRA: %s (%s)", lora.name, lora.reason)
    layers = choose_layers(
        config.layers_kernel,
        cache_dir=config.kernels_dir,
        compiler=config.c_compiler,
        attention=attention.kernel,
        lora=lora.kernel,
    )
    runner = ModelRunner(
        base.model,
        base.context,
        rows=config.max_batch_size,
        max_seq_len=config.max_seq_len,
        dtype=base.dtype,
        device=base.device,
        lora_impl=config.lora_impl,
        threads=step_threads,
        native_attention=attention.kernel,
        native_lora=lora.kernel,
        native_layers=layers.kernel,
    )
    if layers.kernel is not None and runner.layer_driver is None and config.layers_kernel == "native":
        raise NativeKernelError(f"--layers-kernel native: {runner.layer_driver_reason}")
    log.info(
        "decoder layers: %s (%s)",
        "native" if runner.layer_driver is not None else "python",
        runner.layer_driver_reason if layers.kernel is not None else layers.reason,
    )
    runner.calibrate_threads()
    if runner.threads is not None:
        log.info("threads: %s; OpenMP waits: %s", runner.threads.describe(), openmp_wait_summary())
    engine = Engine(
        runner,
        tokenizer,
        manager,
        config.engine,
        eos_ids(tokenizer, base.model),
        observer=metrics,
        prefix_cache=PrefixCache(config.prefix_cache_bytes, observer=metrics),
    )
    manager.set_wake(engine.wake)
    manager.set_prompt_check(engine.check_prompt_fits)
    metrics.bind_load(engine.load_stats)
    metrics.bind_prefix_cache_bytes(lambda: float(engine.prefix_cache.bytes_used))
    metrics.bind_adapters(lambda: len(host_cache.keys()), slots.resident_count, slots.pinned_count)
    if config.metrics_adapter_residency:  # off by default: adapter names are tenants' data
        metrics.bind_residency(
            lambda: [(str(k), "device") for k in slots.resident_keys()] + [(str(k), "host") for k in host_cache.keys()]
        )
    if device.type == "cuda":
        metrics.bind_device_memory(lambda: float(torch.cuda.memory_allocated(device)))
    lora_layers = tuple(base.lora_layers.values())

    def slot_memory() -> int:
        return slot_memory_bytes(lora_layers)

    metrics.bind_slot_memory(lambda: float(slot_memory()))
    info = ModelInfo(
        model_id=base.model_id,
        fingerprint=base.spec.fingerprint,
        quantization=base.quantization,
        device=str(device),
        dtype=str(base.dtype).removeprefix("torch."),
        max_context_tokens=config.max_seq_len,
        max_lora_rank=config.max_lora_rank,
        max_new_tokens=config.max_new_tokens,
        max_batch_size=config.max_batch_size,
        max_loaded_adapters=config.max_loaded_adapters,
        max_message_bytes=config.max_message_bytes,
        target_modules=tuple(sorted({n.rsplit(".", 1)[-1] for n in base.lora_layers})),
        server_version=__version__,
        dtype_reason=base.dtype_reason,
        compiled=base.compiled,
        torch_threads=threads,
        cpu_features=base.cpu_features,
        linear_kernel=base.linear_kernel,
        prefill_threads=runner.threads.large if runner.threads is not None else threads,
        attention_kernel=attention.name,
        lora_kernel=lora.name,
        native_threads=base.pool.threads if base.pool is not None else 0,
        layers_kernel="native" if runner.layer_driver is not None else "python",
    )
    metrics.build.info(
        {
            "version": __version__,
            "model": info.model_id,
            "quantization": info.quantization,
            "device": info.device,
            "fingerprint": info.fingerprint,
        }
    )
    return Service(
        config=config,
        engine=engine,
        base=base,
        store=store,
        info=info,
        metrics=metrics,
        slot_memory_bytes=slot_memory,
    )
