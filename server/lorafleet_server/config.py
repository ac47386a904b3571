"""Server configuration: one frozen dataclass, read from flags, environment and a TOML file here only.

Precedence: command-line flag > environment variable (``LORAFLEET_<FIELD>``) > ``--config`` file
(table ``[server]``) > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464  # Prometheus /metrics over HTTP on the same host; 0: any free port
    data_dir: Path = Path("data")
    model: Path | None = None  # a Hugging Face causal-LM directory; None: the default SmolLM2 cache
    adapter_store: Path | None = None  # None: <data_dir>/adapters
    quantization: str = "auto"  # auto | none | nf4 | int8
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_loaded_adapters: int = 32  # device slots
    max_lora_rank: int = 64
    adapter_poll_seconds: float = 5.0  # how often to look for newly published versions; 0: never
    host_cache_bytes: int = 4 * GiB
    max_adapter_bytes: int = 1 * GiB
    max_batch_size: int = 32
    max_seq_len: int = 2048
    max_new_tokens: int = 1024
    default_max_new_tokens: int = 256
    max_waiting: int = 1024
    max_step_tokens: int = 512
    max_message_bytes: int = 4 * MiB
    lora_impl: str = "auto"  # auto | dense | token | grouped | gather
    torch_threads: int = 0  # intra-op threads; 0: one less than the CPU cores (gRPC needs a core too)
    shutdown_grace_seconds: float = 10.0
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one JSON object per line)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def store_root(self) -> Path:
        return self.adapter_store if self.adapter_store is not None else self.data_dir / "adapters"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


_HELP = {
    "host": "address to listen on",
    "port": "gRPC port",
    "metrics_port": "Prometheus metrics port (HTTP, same host)",
    "data_dir": "where the model cache and the default adapter store live",
    "model": "Hugging Face causal-LM directory to serve (default: SmolLM2-135M-Instruct)",
    "adapter_store": "adapter store root (default: DATA_DIR/adapters)",
    "quantization": "auto (NF4 on CUDA, fp32 on CPU), none, nf4, int8",
    "device": "auto, cpu, cuda or cuda:N",
    "max_loaded_adapters": "device slots for adapters",
    "max_lora_rank": "largest adapter rank accepted",
    "adapter_poll_seconds": "seconds between looks for newly published adapter versions (0: off)",
    "host_cache_bytes": "host-memory adapter cache size",
    "max_adapter_bytes": "largest adapter file accepted",
    "max_batch_size": "running requests at most",
    "max_seq_len": "prompt plus generated tokens per request",
    "max_new_tokens": "limit on a request's max_new_tokens",
    "default_max_new_tokens": "max_new_tokens when a request leaves it unset",
    "max_waiting": "queued requests before RESOURCE_EXHAUSTED",
    "max_step_tokens": "tokens per forward (decode rows plus prefill chunks)",
    "max_message_bytes": "largest gRPC message",
    "lora_impl": "multi-LoRA kernel: auto, dense, token, grouped or gather (reference)",
    "torch_threads": "torch intra-op threads (0: CPU cores - 1, at least 1)",
    "shutdown_grace_seconds": "how long in-flight requests may finish on shutdown",
    "log_level": "DEBUG, INFO, WARNING, ERROR",
    "log_format": "text or json (one object per line)",
}

_CHOICES = {
    "quantization": ("auto", "none", "nf4", "int8"),
    "lora_impl": ("auto", "dense", "token", "grouped", "gather"),
    "log_format": ("text", "json"),
}


def _field_type(f: dataclasses.Field[Any]) -> type:
    name = str(f.type)
    if "Path" in name:
        return Path
    if "float" in name:
        return float
    if "int" in name:
        return int
    return str


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file with a [server] table")
    for f in dataclasses.fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        env = "LORAFLEET_" + f.name.upper()
        parser.add_argument(
            flag,
            dest=f.name,
            default=None,
            type=_field_type(f),
            choices=_CHOICES.get(f.name),
            help=f"{_HELP.get(f.name, '')} (env {env}; default {f.default})",
        )


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    environ = os.environ if environ is None else environ
    file_values: dict[str, Any] = {}
    config_path = getattr(args, "config", None) or environ.get("LORAFLEET_CONFIG")
    if config_path:
        with Path(config_path).open("rb") as fh:
            file_values = dict(tomllib.load(fh).get("server", {}))
    known = {f.name: f for f in dataclasses.fields(ServerConfig)}
    unknown = set(file_values) - set(known)
    if unknown:
        raise ValueError(f"unknown keys in [server] of {config_path}: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for name, f in known.items():
        kind = _field_type(f)
        raw: Any = getattr(args, name, None)
        if raw is None:
            raw = environ.get("LORAFLEET_" + name.upper())
        if raw is None:
            raw = file_values.get(name)
        if raw is None:
            continue
        value = kind(raw)
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ValueError(f"{name} must be one of {', '.join(_CHOICES[name])}, got {value!r}")
        values[name] = value
    config = ServerConfig(**values)
    _check(config)
    return config


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="lorafleet serve")
    add_server_arguments(parser)
    return config_from_args(parser.parse_args(argv), environ)


def _check(c: ServerConfig) -> None:
    positive = (
        "max_loaded_adapters",
        "max_lora_rank",
        "max_batch_size",
        "max_seq_len",
        "max_new_tokens",
        "default_max_new_tokens",
        "max_waiting",
        "max_step_tokens",
        "max_message_bytes",
    )
    for name in positive:
        if getattr(c, name) <= 0:
            raise ValueError(f"{name} must be > 0")
    for name in ("port", "metrics_port"):
        if not 0 <= getattr(c, name) <= 65535:
            raise ValueError(f"{name} must be in [0, 65535] (0: any free port)")
    if c.torch_threads < 0:
        raise ValueError("torch_threads must be >= 0 (0: automatic)")
    if c.default_max_new_tokens > c.max_new_tokens:
        raise ValueError("default_max_new_tokens must not exceed max_new_tokens")
