"""The ``lorafleet`` command: serve, prepare the model, manage the adapter store, call a server."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from lorafleet_adapters.errors import AdapterError
from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.ref import AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.config import ServerConfig, add_server_arguments, config_from_args
from lorafleet_server.logs import setup_logging


def _serve(config: ServerConfig) -> int:
    from lorafleet_server.app import build_service
    from lorafleet_server.grpc.server import serve_forever

    service = build_service(config)
    asyncio.run(serve_forever(service))
    return 0


def _model_dir(config: ServerConfig) -> Path:
    from lorafleet_server.app import model_dir_for

    return model_dir_for(config)


def _prepare(config: ServerConfig) -> int:
    from lorafleet_server.model.prepare import weights_fingerprint

    model_dir = _model_dir(config)
    print(json.dumps({"model_dir": str(model_dir), "fingerprint": weights_fingerprint(model_dir)}))
    return 0


def _base_spec(config: ServerConfig) -> BaseModelSpec:
    from lorafleet_server.model.loader import base_spec_from_files, resolve_device, resolve_quantization

    quant = resolve_quantization(config.quantization, resolve_device(config.device))
    return base_spec_from_files(_model_dir(config), quant, config.max_lora_rank, config.max_adapter_bytes)


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


TRAINING_COMMANDS = ("train", "publish", "publish-prompt")
TRAIN_EXTRA_HINT = "pip install './proto/python' '.[train]' from the repository (or lorafleet[train] from an index)"


def _training_cli() -> ModuleType:
    """The training package's CLI, imported only for training commands (serving never imports it)."""
    try:
        from lorafleet_training import cli as training
    except ImportError as exc:
        raise SystemExit(f"error: this lorafleet install has no training support ({exc}); {TRAIN_EXTRA_HINT}") from None
    return training


def _require_train_extra() -> None:
    missing = [name for name in ("peft",) if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"error: `lorafleet train` needs the training extra ({', '.join(missing)} not installed): "
            + TRAIN_EXTRA_HINT
        )


def _training(args: argparse.Namespace, config: ServerConfig) -> int:
    training = _training_cli()
    spec = _base_spec(config)
    if args.command == "train":
        return int(training.run_train(args, spec, _model_dir(config)))
    store = AdapterStore(args.store if args.store is not None else config.store_root)
    if args.command == "publish":
        return int(training.run_publish(args, store, spec))
    if args.command == "publish-prompt":
        return int(training.run_publish_prompt(args, store, spec))
    return int(training.run_stale(args, store, spec))


def _forward_generate(argv: list[str]) -> int:
    """Calling a server is the client's job: ``lorafleet generate ...`` runs ``lorafleet-client generate
    ...`` (the lorafleet-client distribution) in this process's place; the server imports none of it."""
    if importlib.util.find_spec("lorafleet") is None:
        print(
            "error: `lorafleet generate` runs the Python client's CLI, which is not installed: "
            "pip install ./clients/python, then `lorafleet-client generate ...`",
            file=sys.stderr,
        )
        return 2
    os.execv(sys.executable, [sys.executable, "-m", "lorafleet", *argv])
    return 0  # not reached: execv replaces this process


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI. A training command's options are added only when that command runs (building
    them imports the training package, which serving never does)."""
    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a LoRA adapter on a customer's JSONL data (extra: train)")
    publish = sub.add_parser("publish", help="verify a trained adapter and publish it into the store")
    publish_prompt = sub.add_parser("publish-prompt", help="publish a prompt adapter (system prompt + examples)")
    if command in TRAINING_COMMANDS:
        training = _training_cli()
        if command == "train":
            _require_train_extra()
            training.add_train_arguments(train)
            add_server_arguments(train)
        elif command == "publish":
            training.add_publish_arguments(publish)
            add_server_arguments(publish)
        else:
            training.add_publish_prompt_arguments(publish_prompt)
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
    stale.add_argument("--store", type=Path, default=None, help="adapter store root (default: the server's)")
    add_server_arguments(stale)
    sub.add_parser("generate", help="call a running server (runs `lorafleet-client generate`)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "generate":
        return _forward_generate(argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
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
