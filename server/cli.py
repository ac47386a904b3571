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


def _training(args: argparse.Namespace, config: ServerConfig) -> int:
    from adapters.training import cli as training
    from server.app import model_dir_for

    spec = _base_spec(config)
    if args.command == "train":
        return training.run_train(args, spec, model_dir_for(config))
    store = AdapterStore(args.store if args.store is not None else config.store_root)
    if args.command == "publish":
        return training.run_publish(args, store, spec)
    if args.command == "publish-prompt":
        return training.run_publish_prompt(args, store, spec)
    return training.run_stale(args, store, spec)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI. The trainer's options are added only for ``train`` (building them imports the
    trainer, which serving never does)."""
    from lorafleet.cli import add_generate_arguments

    from adapters.training.cli import (
        add_publish_arguments,
        add_publish_prompt_arguments,
        add_stale_arguments,
        add_train_arguments,
    )

    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a LoRA adapter on a customer's JSONL data")
    if command == "train":
        add_train_arguments(train)
        add_server_arguments(train)
    publish = sub.add_parser("publish", help="verify a trained adapter and publish it into the store")
    add_publish_arguments(publish)
    add_server_arguments(publish)
    publish_prompt = sub.add_parser("publish-prompt", help="publish a prompt adapter (system prompt + examples)")
    add_publish_prompt_arguments(publish_prompt)
    add_server_arguments(publish_prompt)
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
    stale = adapters_sub.add_parser("stale", help="list adapters built for another base than the server's")
    add_stale_arguments(stale)
    add_server_arguments(stale)
    gen = sub.add_parser("generate", help="call a running server")
    add_generate_arguments(gen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
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
        if args.command in ("train", "publish", "publish-prompt") or args.adapters_command == "stale":
            return _training(args, config)
        if args.adapters_command == "import":
            return _adapters_import(config, args.src, args.reference)
        return _adapters_list(config, args.tenant)
    except AdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
