"""The ``lorafleet`` command: serve, prepare the model, manage the adapter store, call a server."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from adapters.errors import AdapterError
from adapters.ref import AdapterRef
from adapters.store import AdapterStore
from server.config import ServerConfig, add_server_arguments, config_from_args
from server.logs import setup_logging


def _serve(config: ServerConfig) -> int:
    from server.app import build_service
    from server.grpc.server import serve_forever

    service = build_service(config)
    asyncio.run(serve_forever(service))
    return 0


def _prepare(config: ServerConfig) -> int:
    from server.app import model_dir_for
    from server.model.prepare import weights_fingerprint

    model_dir = model_dir_for(config)
    print(json.dumps({"model_dir": str(model_dir), "fingerprint": weights_fingerprint(model_dir)}))
    return 0


def _base_spec(config: ServerConfig):  # type: ignore[no-untyped-def]
    from server.app import model_dir_for
    from server.model.loader import base_spec_from_files, resolve_device, resolve_quantization

    quant = resolve_quantization(config.quantization, resolve_device(config.device))
    return base_spec_from_files(model_dir_for(config), quant, config.max_lora_rank, config.max_adapter_bytes)


def _adapters_import(config: ServerConfig, src: Path, reference: str) -> int:
    ref = AdapterRef.parse(reference)
    if ref.version is not None:
        raise AdapterError("versions are assigned at import; give tenant/name without @version")
    key = AdapterStore(config.store_root).import_peft(src, ref.tenant, ref.name, _base_spec(config))
    print(f"published {key}")
    return 0


def _adapters_list(config: ServerConfig, tenant: str | None) -> int:
    config.store_root.mkdir(parents=True, exist_ok=True)
    for s in AdapterStore(config.store_root).list(tenant):
        versions = ",".join(str(v) for v in s.versions)
        print(f"{s.tenant}/{s.name}\tlatest={s.latest}\tversions={versions}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lorafleet.cli import add_generate_arguments

    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the gRPC server")
    add_server_arguments(serve)
    prepare = sub.add_parser("prepare-model", help="convert the default model to its safetensors cache")
    add_server_arguments(prepare)
    adapters = sub.add_parser("adapters", help="the adapter store")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    imp = adapters_sub.add_parser("import", help="verify a PEFT adapter directory and publish it")
    imp.add_argument("src", type=Path, help="PEFT adapter directory (adapter_config.json + safetensors)")
    imp.add_argument("reference", help="tenant/name")
    add_server_arguments(imp)
    lst = adapters_sub.add_parser("list", help="list adapters and versions in the store")
    lst.add_argument("--tenant", default=None)
    add_server_arguments(lst)
    gen = sub.add_parser("generate", help="call a running server")
    add_generate_arguments(gen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        from lorafleet.cli import run_generate

        return run_generate(args)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging(config.log_level, config.log_format)
    try:
        if args.command == "serve":
            return _serve(config)
        if args.command == "prepare-model":
            return _prepare(config)
        if args.adapters_command == "import":
            return _adapters_import(config, args.src, args.reference)
        return _adapters_list(config, args.tenant)
    except AdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
