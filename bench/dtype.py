"""Compute dtype and compile micro-benchmark: one ModelRunner step in fp32, bf16 and compiled, in one run.

Loads the real default model (SmolLM2-135M) through the serving loader (``load_hf_model`` +
``wrap_targets``) once per variant and times ``ModelRunner.step`` — the serving forward — for:

* a decode step: ``--batch`` rows (default 32), each one new token after ``--context`` cached tokens;
* a prefill step: ``--prefill-rows`` rows (default 4) of ``--prefill-tokens`` new tokens (default 128);

with ``--adapters`` distinct adapters (random weights in slots, default 0: base only; the LoRA kernels
run in the compute dtype either way) of ``--shape``: ``default`` (PEFT's default, r=8 on q_proj and
v_proj) or ``r16all`` (r=16 on all seven Linears). Variants: ``fp32``, ``bf16`` and ``fp32+compile`` /
``bf16+compile`` (``torch.compile`` of each decoder layer's MLP and RMSNorms: what ``--compile`` does,
``compile_base`` in ``model/loader.py``). Variants without compile prepack the base Linears as the
server does (``model/packed.py``: bf16 always, fp32 where timed faster at load). A ``+before`` suffix
(``bf16+before``) runs the LoRA kernels as they were before the embedding_bag ``token`` kernel
(``token_before`` and ``choose_before`` of ``bench/lora_kernels.py``), and a ``+base`` suffix loads no
adapter (the base alone, for the LoRA share); ``+lora32`` keeps the LoRA slot buffers (and math) in fp32
under a bf16 base; attention and LoRA are the server's defaults (``--attention-kernel auto``,
``--lora-impl auto``: the native kernels of ``model/native.py`` where they build, on the native bf16
Linears' helper pool where there is one, and a decode step's layers in one native call where every
kernel of a layer is native, ``--layers-kernel auto``: before 7 December 2026 the attention and the
LoRA here ran on the step's torch threads and no layer driver, unlike the server), and a ``+torchattn``
suffix runs torch's attention matmuls, ``+torchlora`` the torch LoRA kernels only, and ``+onednn``
oneDNN's prepacked base Linears instead of the native bf16 ones or fp32's timed choice
(``--linear-kernel``), ``+torchlin`` plain ``F.linear`` (``--linear-kernel torch``), ``+nativelin`` the
native ones whatever fp32's timing says (``--linear-kernel native``), ``+lin1`` the
native ones on the calling thread alone (``--linear-threads 1``; by default every CPU, as the server):
A/Bs of the whole step in one run. Repeats are interleaved across variants so that load from other
processes hits each alike; the median of each is reported with its ratio to the first variant.

Also reports the quality check of ``model/loader.py`` (``bf16_quality``): top-1 agreement and max
logit difference of bf16 against fp32 on fixed prompts.

    .venv/bin/python -m bench.dtype              # threads: cores - 1, as the server
    .venv/bin/python -m bench.dtype --threads 2 --json bench/results/dtype.json
    .venv/bin/python -m bench.dtype --variants bf16+base,bf16,bf16+before --adapters 32 --shape r16all
    .venv/bin/python -m bench.dtype --variants bf16+torchattn,bf16 --prefill-rows 1 --prefill-tokens 512
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


# Adapter shapes: (rank, target module suffixes).
SHAPES: dict[str, tuple[int, tuple[str, ...]]] = {
    "default": (8, ("q_proj", "v_proj")),
    "r16all": (16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}


def build_runner(
    model_dir: Path,
    dtype: torch.dtype,
    compiled: bool,
    adapters: int,
    rows: int,
    shape: str = "default",
    lora_dtype: torch.dtype | None = None,
    attention: str = "auto",
    native_lora: bool = True,
    linear: str = "auto",
    linear_threads: int = 0,
) -> Any:
    from lorafleet_server.model.loader import compile_base, load_hf_model, wrap_targets
    from lorafleet_server.model.lora import LoraContext
    from lorafleet_server.model.native import choose_attention, choose_lora
    from lorafleet_server.model.native_layers import choose_layers
    from lorafleet_server.model.packed import pack_base
    from lorafleet_server.model.runner import AttentionShape, ModelRunner

    cpu = torch.device("cpu")
    model = load_hf_model(model_dir, "none", cpu, dtype)
    context = LoraContext()
    layers = wrap_targets(model, adapters + 1, 16, context, lora_dtype or dtype, cpu)
    gen = torch.Generator().manual_seed(0)
    rank, targets = SHAPES[shape]
    for slot in range(1, adapters + 1):
        for name, layer in layers.items():
            if name.endswith(targets):
                a = torch.randn(rank, layer.in_features, generator=gen) * 0.02  # [r, in]
                b = torch.randn(layer.out_features, rank, generator=gen) * 0.02  # [out, r]
                layer.write_slot(slot, a, b * 2.0)
    # where the server caches its kernels: --kernel-cache-dir's env, else DATA_DIR/kernels
    kernels = Path(
        os.environ.get("LORAFLEET_KERNEL_CACHE_DIR")
        or Path(os.environ.get("LORAFLEET_DATA_DIR", REPO / "data")) / "kernels"
    )
    pool = None  # the native Linears' helper threads, which the server's other native kernels share
    if compiled:
        compile_base(model)
    else:  # as load_base does: the server's base Linears (fp32: prepacked where timed faster)
        choice = pack_base(
            model,
            list(layers.values()),
            linear,  # type: ignore[arg-type]
            eligible=None,
            cache_dir=kernels,
            threads=linear_threads or len(os.sched_getaffinity(0)),  # 0: every CPU, as the server
            dtype=dtype,
            measure_threads=(torch.get_num_threads(),),  # the runner's steps all run on these
        )
        print(f"base Linears: {choice.name} ({choice.reason})")
        pool = choice.pool
    shape_ = AttentionShape.of(model.config)
    lora = choose_lora("auto" if native_lora else "token", cache_dir=kernels, device=cpu, pool=pool)
    native = choose_attention(
        attention,  # type: ignore[arg-type]
        cache_dir=kernels,
        heads=shape_.heads,
        kv_heads=shape_.kv_heads,
        head_dim=shape_.head_dim,
        dtype=dtype,
        device=cpu,
        pool=pool,
    )
    # the decode steps' layers in one native call where every kernel of a layer is native, as the server
    layers_kernel = choose_layers("auto", cache_dir=kernels, attention=native.kernel, lora=lora.kernel)
    return ModelRunner(
        model,
        context,
        rows=rows,
        max_seq_len=1024,
        dtype=dtype,
        device=cpu,
        native_attention=native.kernel,
        native_lora=lora.kernel,
        native_layers=layers_kernel.kernel,
    )


@contextlib.contextmanager
def kernels_before(active: bool) -> Iterator[None]:
    """While active, ``model/lora.py`` picks and runs its kernels as before the embedding_bag ``token``."""
    if not active:
        yield
        return
    from bench.lora_kernels import choose_before, token_before
    from lorafleet_server.model import lora

    saved = lora.choose_impl, lora.lora_delta_token
    lora.choose_impl = choose_before  # type: ignore[assignment]
    lora.lora_delta_token = lambda x, route, a, bt: token_before(x, route.slots, route.rank, a, bt)
    try:
        yield
    finally:
        lora.choose_impl, lora.lora_delta_token = saved


def decode_rows(batch: int, context: int, adapters: int) -> list[Any]:
    from lorafleet_server.model.runner import RowStep

    return [
        RowStep(
            kv_row=i,
            start=context,
            token_ids=(100 + i,),
            slot=(i % adapters) + 1 if adapters else 0,
            want_logits=True,
            want_pooled=False,
        )
        for i in range(batch)
    ]


def prefill_rows(rows: int, tokens: int, adapters: int) -> list[Any]:
    from lorafleet_server.model.runner import RowStep

    return [
        RowStep(
            kv_row=i,
            start=0,
            token_ids=tuple(range(200 + i, 200 + i + tokens)),
            slot=(i % adapters) + 1 if adapters else 0,
            want_logits=True,
            want_pooled=False,
        )
        for i in range(rows)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: the prepared default model)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--prefill-rows", type=int, default=4)
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=0)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default", help="adapter rank and targets")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: cores - 1, as the server)")
    parser.add_argument("--variants", default="fp32,bf16,fp32+compile,bf16+compile")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from lorafleet_server.model.cpu import cpu_features
    from lorafleet_server.model.loader import bf16_quality
    from lorafleet_server.model.prepare import prepare_default_model

    cores = len(os.sched_getaffinity(0))
    threads = args.threads or max(1, cores - 1)
    torch.set_num_threads(threads)
    model_dir = args.model or prepare_default_model(
        Path(os.environ.get("LORAFLEET_DATA_DIR", REPO / "data")) / "models"
    )
    feats = cpu_features()
    print(f"cpu: {feats.summary()}  cores={cores} threads={threads} torch={torch.__version__}")

    t0 = time.perf_counter()
    quality = bf16_quality(model_dir)
    print(f"bf16 quality: {quality.describe()} ({time.perf_counter() - t0:.1f} s)")

    rows = max(args.batch, args.prefill_rows)
    runners: dict[str, Any] = {}
    for name in args.variants.split(","):
        dtype = torch.bfloat16 if name.startswith("bf16") else torch.float32
        adapters = 0 if name.endswith("+base") else args.adapters
        lora_dtype = torch.float32 if "+lora32" in name else None
        attention = "torch" if "+torchattn" in name else "auto"
        linear = (
            "onednn"
            if "+onednn" in name
            else "torch"
            if "+torchlin" in name
            else "native"
            if "+nativelin" in name
            else "auto"
        )
        runners[name] = build_runner(
            model_dir,
            dtype,
            "+compile" in name,
            adapters,
            rows,
            args.shape,
            lora_dtype,
            attention,
            "+torchlora" not in name,
            linear,
            1 if "+lin1" in name else 0,
        )
        r = runners[name]
        print(
            f"{name}: attention {'native' if r.native_attention is not None else 'torch'}, "
            f"LoRA {'native' if r.native_lora is not None else 'torch'}, "
            f"LM head {type(r.model.lm_head).__name__}, "
            f"layers {'native' if r.layer_driver is not None else 'python'}"
        )
    # Prefill once (fills the KV rows the decode steps read) and warm up (compiles) every variant.
    warm: dict[str, float] = {}
    for name, runner in runners.items():
        t0 = time.perf_counter()
        for start in range(0, args.context, args.prefill_tokens):
            # (the context prefill uses the current kernels in every variant: it is not timed)
            n = min(args.prefill_tokens, args.context - start)
            runner.step(
                [
                    r.__class__(**{**r.__dict__, "start": start, "token_ids": r.token_ids[:n]})
                    for r in prefill_rows(rows, args.prefill_tokens, args.adapters)
                ]
            )
        with kernels_before(name.endswith("+before")):
            for _ in range(2):
                runner.step(decode_rows(args.batch, args.context, args.adapters))
                runner.step(prefill_rows(args.prefill_rows, args.prefill_tokens, args.adapters))
        warm[name] = time.perf_counter() - t0
    times: dict[str, dict[str, list[float]]] = {n: {"decode": [], "prefill": []} for n in runners}
    dec = decode_rows(args.batch, args.context, args.adapters)
    pre = prefill_rows(args.prefill_rows, args.prefill_tokens, args.adapters)
    for _ in range(args.repeats):
        for name, runner in runners.items():
            with kernels_before(name.endswith("+before")):
                t0 = time.perf_counter()
                runner.step(dec)
                times[name]["decode"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                runner.step(pre)
                times[name]["prefill"].append(time.perf_counter() - t0)
    result: dict[str, Any] = {
        "cpu": feats.summary(),
        "threads": threads,
        "torch": torch.__version__,
        "batch": args.batch,
        "context": args.context,
        "prefill": f"{args.prefill_rows}x{args.prefill_tokens}",
        "adapters": args.adapters,
        "shape": args.shape,
        "quality": quality.describe(),
        "variants": {},
    }
    base = {k: statistics.median(v) for k, v in times[next(iter(runners))].items()}
    print(
        f"\ndecode: {args.batch} rows x 1 token after {args.context}; prefill: {args.prefill_rows} x "
        f"{args.prefill_tokens} tokens; adapters: {args.adapters} ({args.shape}); median of {args.repeats}"
    )
    print(
        f"{'variant':<14} {'warm-up s':>9} {'decode ms':>10} {'tok/s':>7} {'ratio':>6} {'prefill ms':>11} {'ratio':>6}"
    )
    for name in runners:
        d = statistics.median(times[name]["decode"])
        p = statistics.median(times[name]["prefill"])
        print(
            f"{name:<14} {warm[name]:>9.1f} {d * 1e3:>10.1f} {args.batch / d:>7.0f} {base['decode'] / d:>5.2f}x "
            f"{p * 1e3:>11.1f} {base['prefill'] / p:>5.2f}x"
        )
        result["variants"][name] = {
            "warmup_s": round(warm[name], 2),
            "decode_ms": round(d * 1e3, 2),
            "decode_speedup": round(base["decode"] / d, 3),
            "prefill_ms": round(p * 1e3, 2),
            "prefill_speedup": round(base["prefill"] / p, 3),
        }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
