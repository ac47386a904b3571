"""Slot memory benchmark: process RSS and LoRA slot-buffer bytes with N distinct adapters in N slots.

Builds the real service (``lorafleet_server.app.build_service``, default ServerConfig apart from
the paths and ``--max-loaded-adapters``/``--max-lora-rank``) on the real default model, imports N
distinct PEFT adapters of one shape (default: 32 adapters, r=8 on q_proj,v_proj), loads every one
into a device slot through the engine (``AdapterAdmin.load``, as LoadAdapter does), and reports
``/proc/self/status`` VmRSS / VmHWM and the bytes held by the ``MultiLoRALinear`` slot buffers at
each stage. The adapters are made in a child process so that PEFT's copy of the model never counts
in this process's RSS.

It reads the slot bytes straight off the buffers (``lora_a`` + ``lora_bt`` of every wrapped Linear),
so it runs unchanged against an older checkout, e.g. to compare before and after a change::

    .venv/bin/python -m bench.slot_memory
    git worktree add /tmp/slots-before <commit>
    PYTHONPATH=/tmp/slots-before/server:/tmp/slots-before/adapters:/tmp/slots-before/training:\\
/tmp/slots-before/proto/python:/tmp/slots-before/clients/python .venv/bin/python -m bench.slot_memory

Run from the repository root. Prints a table; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TENANT = "bench"


def read_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def slot_buffer_bytes(layers: Any) -> int:
    """Bytes of every wrapped Linear's slot buffers, read off the tensors (works on any checkout)."""
    return sum(int(m.lora_a.nbytes) + int(m.lora_bt.nbytes) for m in layers.values())


def _make_adapters(model_dir: str, root: str, count: int, rank: int, alpha: int, targets: list[str]) -> list[str]:
    """Child-process body: ``count`` distinct PEFT adapters of one shape (bench.serving's maker)."""
    from bench.serving import Shape, make_adapters

    shape = Shape("bench", f"r={rank} on {','.join(targets)}", rank, alpha, tuple(targets))
    return [str(p) for p in make_adapters(Path(model_dir), [shape], count, Path(root))["bench"]]


def make_adapters_elsewhere(model_dir: Path, root: Path, args: argparse.Namespace) -> list[Path]:
    targets = args.targets.split(",")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        paths = pool.apply(_make_adapters, (str(model_dir), str(root), args.adapters, args.rank, args.alpha, targets))
        pool.close()
        pool.join()
    return [Path(p) for p in paths]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.slot_memory",
        description="RSS and LoRA slot-buffer bytes with N distinct adapters loaded into N device slots.",
    )
    parser.add_argument("--adapters", type=int, default=32, help="distinct adapters, one slot each (%(default)s)")
    parser.add_argument("--rank", type=int, default=8, help="their rank (%(default)s)")
    parser.add_argument("--alpha", type=int, default=16, help="their lora_alpha (%(default)s)")
    parser.add_argument("--targets", default="q_proj,v_proj", help="their target modules, comma-separated")
    parser.add_argument(
        "--max-loaded-adapters", type=int, default=None, help="device slots (default: max(32, --adapters))"
    )
    parser.add_argument("--max-lora-rank", type=int, default=64, help="the server's --max-lora-rank (%(default)s)")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (%(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch

    import lorafleet_server
    from lorafleet_server.app import build_service
    from lorafleet_server.config import ServerConfig
    from lorafleet_server.engine.admin import AdapterAdmin
    from lorafleet_server.model.prepare import prepare_default_model

    torch.set_num_threads(args.threads)
    model_dir = args.model or prepare_default_model(REPO / "data" / "models")
    work = Path(tempfile.mkdtemp(prefix="lorafleet-slotmem-"))
    stages: list[dict[str, Any]] = []

    def stage(name: str, slot_bytes: int | None) -> None:
        stages.append({"stage": name, **read_status(), "slot_buffer_bytes": slot_bytes})

    try:
        dirs = make_adapters_elsewhere(model_dir, work / "adapters", args)
        stage("imports done", None)
        config = ServerConfig(
            model=model_dir,
            data_dir=work / "data",
            adapter_store=work / "store",
            port=0,
            metrics_port=0,
            max_loaded_adapters=args.max_loaded_adapters or max(32, args.adapters),
            max_lora_rank=args.max_lora_rank,
            torch_threads=args.threads,
            adapter_poll_seconds=0,
            log_level="WARNING",
        )
        service = build_service(config)
        layers = service.base.lora_layers
        stage("service built", slot_buffer_bytes(layers))
        refs = []
        for i, path in enumerate(dirs):
            name = f"a{i:02d}"
            service.store.import_peft(path, TENANT, name, service.base.spec)
            refs.append(f"{TENANT}/{name}")
        service.engine.start()
        admin = AdapterAdmin(service.engine)
        started = time.perf_counter()
        tiers = [admin.load(ref)[1] for ref in refs]
        load_seconds = time.perf_counter() - started
        resident = service.engine.run(lambda: len(service.engine.adapters.slot_snapshot()))
        stage(f"{len(refs)} adapters in slots", slot_buffer_bytes(layers))
        reported = getattr(service, "slot_memory_bytes", None)
        result = {
            "server_tree": str(Path(lorafleet_server.__file__).resolve().parents[2]),
            "model": service.info.model_id,
            "device": service.info.device,
            "dtype": service.info.dtype,
            "wrapped_linears": len(layers),
            "slots": config.max_loaded_adapters,
            "max_lora_rank": config.max_lora_rank,
            "adapters": {"count": len(refs), "rank": args.rank, "targets": args.targets, "resident": resident},
            "load_seconds": load_seconds,
            "tiers": sorted({str(t) for t in tiers}),
            "reported_slot_memory_bytes": reported() if callable(reported) else None,
            "stages": stages,
        }
        service.engine.shutdown(10)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mib = 1 << 20
    print(f"tree: {result['server_tree']}")
    print(
        f"{result['model']} on {result['device']} ({result['dtype']}), {result['wrapped_linears']} wrapped Linears, "
        f"{result['slots']} slots, max_lora_rank {result['max_lora_rank']}; "
        f"{resident} adapters resident (r={args.rank} on {args.targets}), loaded in {load_seconds:.2f}s"
    )
    print(f"{'stage':<24} {'VmRSS MiB':>10} {'VmHWM MiB':>10} {'slot buffers MiB':>17}")
    for s in stages:
        slot = "" if s["slot_buffer_bytes"] is None else f"{s['slot_buffer_bytes'] / mib:.1f}"
        print(f"{s['stage']:<24} {s['VmRSS'] / mib:>10.1f} {s['VmHWM'] / mib:>10.1f} {slot:>17}")
    if result["reported_slot_memory_bytes"] is not None:
        print(f"service.slot_memory_bytes(): {result['reported_slot_memory_bytes']} bytes")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
