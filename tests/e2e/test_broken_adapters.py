"""Adapters that reach the store broken or incompatible are refused with FAILED_PRECONDITION."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import grpc
import pytest
import torch
from e2elib import LiveServer, lora_config_json, plant_version
from safetensors.torch import save as st_save

from lorafleet import LoraFleetError, Sampling


def _status(live: LiveServer, adapter: str) -> tuple[grpc.StatusCode, str]:
    try:
        live.client.generate("hi", adapter=adapter, sampling=Sampling(max_new_tokens=4))
    except LoraFleetError as exc:
        return exc.code, str(exc)
    return grpc.StatusCode.OK, ""


def _weights(r: int, d_in: int = 576, d_out: int = 576, module: str = "model.layers.0.self_attn.q_proj") -> bytes:
    return st_save(
        {
            f"base_model.model.{module}.lora_A.weight": torch.randn(r, d_in),
            f"base_model.model.{module}.lora_B.weight": torch.randn(d_out, r),
        }
    )


@pytest.fixture
def fingerprint(live: LiveServer) -> str:
    return live.service.base.spec.fingerprint


def test_bin_only_adapter(live: LiveServer, fingerprint: str) -> None:
    plant_version(
        live.store_root,
        "broken",
        "binonly",
        1,
        {"adapter_config.json": lora_config_json(8, ["q_proj"]), "adapter_model.bin": b"\x80\x02pickle"},
        fingerprint,
    )
    code, msg = _status(live, "broken/binonly")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "safetensors" in msg


def test_truncated_safetensors(live: LiveServer, fingerprint: str) -> None:
    data = _weights(8)
    plant_version(
        live.store_root,
        "broken",
        "truncated",
        1,
        {"adapter_config.json": lora_config_json(8, ["q_proj"]), "adapter_model.safetensors": data[:-100]},
        fingerprint,
    )
    code, msg = _status(live, "broken/truncated")
    assert code == grpc.StatusCode.FAILED_PRECONDITION, msg


def test_garbage_header(live: LiveServer, fingerprint: str) -> None:
    data = struct.pack("<Q", 1 << 40) + b"{}"
    plant_version(
        live.store_root,
        "broken",
        "header",
        1,
        {"adapter_config.json": lora_config_json(8, ["q_proj"]), "adapter_model.safetensors": data},
        fingerprint,
    )
    assert _status(live, "broken/header")[0] == grpc.StatusCode.FAILED_PRECONDITION


def test_rank_over_the_limit(live: LiveServer, fingerprint: str) -> None:
    plant_version(
        live.store_root,
        "broken",
        "bigrank",
        1,
        {"adapter_config.json": lora_config_json(48, ["q_proj"]), "adapter_model.safetensors": _weights(48)},
        fingerprint,
        rank=48,
    )
    code, msg = _status(live, "broken/bigrank")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "48" in msg


def test_shapes_that_do_not_match_the_base(live: LiveServer, fingerprint: str) -> None:
    plant_version(
        live.store_root,
        "broken",
        "shapes",
        1,
        {
            "adapter_config.json": lora_config_json(8, ["q_proj"]),
            "adapter_model.safetensors": _weights(8, d_in=64, d_out=64),
        },
        fingerprint,
    )
    code, msg = _status(live, "broken/shapes")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "q_proj" in msg


def test_other_base_fingerprint(live: LiveServer) -> None:
    plant_version(
        live.store_root,
        "broken",
        "otherbase",
        1,
        {"adapter_config.json": lora_config_json(8, ["q_proj"]), "adapter_model.safetensors": _weights(8)},
        "sha256:" + "0" * 64,
    )
    code, msg = _status(live, "broken/otherbase")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "sha256:" + "0" * 64 in msg


def test_tampered_file(live: LiveServer, fingerprint: str) -> None:
    plant_version(
        live.store_root,
        "broken",
        "tampered",
        1,
        {"adapter_config.json": lora_config_json(8, ["q_proj"]), "adapter_model.safetensors": _weights(8)},
        fingerprint,
    )
    path = live.store_root / "broken" / "tampered" / "versions" / "1" / "adapter_model.safetensors"
    path.write_bytes(_weights(8))  # same shape, other bytes: the manifest's sha256 no longer matches
    assert _status(live, "broken/tampered")[0] == grpc.StatusCode.FAILED_PRECONDITION


def test_dora_is_refused_naming_the_field(live: LiveServer, fingerprint: str) -> None:
    cfg = json.loads(lora_config_json(8, ["q_proj"]))
    cfg["use_dora"] = True
    plant_version(
        live.store_root,
        "broken",
        "dora",
        1,
        {"adapter_config.json": json.dumps(cfg).encode(), "adapter_model.safetensors": _weights(8)},
        fingerprint,
    )
    code, msg = _status(live, "broken/dora")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "use_dora" in msg


def test_server_still_serves_good_adapters(live: LiveServer) -> None:
    out = live.client.generate("Hello", adapter="acme/support", sampling=Sampling(max_new_tokens=4))
    assert out.adapter == "acme/support@1" and out.generated_tokens == 4


def test_manifest_never_lists_paths_outside(tmp_path: Path) -> None:
    from lorafleet_adapters.errors import AdapterFormatError
    from lorafleet_adapters.manifest import check_file_name

    for bad in ("../x", "/etc/passwd", "a/b"):
        with pytest.raises(AdapterFormatError):
            check_file_name(bad)
