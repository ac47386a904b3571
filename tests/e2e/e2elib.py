"""Helpers shared by the end-to-end tests (fixtures live in conftest.py)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from lorafleet import LoraFleetClient, Sampling
from lorafleet_adapters.manifest import Manifest, sha256_file, utc_now_iso
from lorafleet_server.app import Service

T = TypeVar("T")


def make_real_adapter(model_dir: Path, out: Path, seed: int, b_std: float = 0.02, **lora: Any) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    model.save_pretrained(out)
    return out


@dataclasses.dataclass
class LiveServer:
    service: Service
    port: int
    metrics_port: int
    client: LoraFleetClient

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def store_root(self) -> Path:
        return self.service.config.store_root


def plant_version(
    store_root: Path,
    tenant: str,
    name: str,
    version: int,
    files: dict[str, bytes],
    base_fingerprint: str,
    rank: int = 8,
) -> None:
    """Write a version straight into the store (bypassing import's checks), with a valid manifest."""
    vdir = store_root / tenant / name / "versions" / str(version)
    vdir.mkdir(parents=True)
    for fname, data in files.items():
        (vdir / fname).write_bytes(data)
    manifest = Manifest(
        schema_version=1,
        tenant=tenant,
        name=name,
        version=version,
        kind="lora",
        method="lora",
        base_fingerprint=base_fingerprint,
        base_model="test",
        base_quantization="none",
        rank=rank,
        lora_alpha=16.0,
        use_rslora=False,
        target_modules=("q_proj",),
        files={f: sha256_file(vdir / f) for f in files},
        created_at=utc_now_iso(),
        producer="test",
        training_data_fingerprint=None,
        eval_metrics={},
        pii_scan=None,
    )
    (vdir / "manifest.json").write_text(manifest.to_json())
    (store_root / tenant / name / "latest").write_text(str(version))


def lora_config_json(r: int, targets: list[str]) -> bytes:
    return json.dumps(
        {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": 16,
            "target_modules": targets,
            "bias": "none",
            "task_type": "CAUSAL_LM",
        }
    ).encode()


def metric(service: Service, name: str, **labels: str) -> float:
    """A sample of the service's own registry (0 when the series does not exist yet)."""
    return service.metrics.registry.get_sample_value(name, labels or None) or 0.0


def seconds_per_token(client: LoraFleetClient, prompt: str, tokens: int = 16, runs: int = 3) -> float:
    """This machine's speed for one request alone: the seconds of a ``tokens``-token request over
    ``tokens`` (its prefill included, so a little over a decode step's), the fastest of ``runs`` after
    one untimed (a fresh server's first request ran ~3x slower, and load from elsewhere only slows a
    run). For tests whose deadlines must pass before a request ends on machines of any speed (an AMX
    Xeon decodes ~130 tokens a second alone, an AVX2 EPYC in fp32 a fraction of that)."""
    client.generate(prompt, sampling=Sampling(max_new_tokens=tokens))
    times = []
    for _ in range(runs):
        started = time.monotonic()
        client.generate(prompt, sampling=Sampling(max_new_tokens=tokens))
        times.append(time.monotonic() - started)
    return min(times) / tokens


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait, bounded, for something another thread does (a counter moving after the client has its answer)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(0.01)


def wait_for_metric(service: Service, name: str, value: float, timeout: float = 30.0, **labels: str) -> None:
    """Wait until the sample reaches ``value``, then require it to be exactly ``value`` (not past it)."""
    wait_until(lambda: metric(service, name, **labels) >= value, timeout, f"{name}{labels} to reach {value}")
    assert metric(service, name, **labels) == value, (name, labels)


def start_queued(service: Service, calls: list[Callable[[], T]]) -> list[Future[T]]:
    """Start every call on its own thread (at once) and return when all of them are queued in the engine.

    Use it while the engine is held (``enginelib.engine_held``): the calls then start together, in one
    step, when it is released. Their submits run concurrently, as gRPC's worker threads run them.
    """
    pool = ThreadPoolExecutor(max_workers=max(len(calls), 1))
    queued = service.engine.load_stats()[1]
    futures = [pool.submit(call) for call in calls]
    pool.shutdown(wait=False)
    wait_until(lambda: service.engine.load_stats()[1] >= queued + len(calls), 60, "every call queued")
    return futures
