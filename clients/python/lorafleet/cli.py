"""The lorafleet-client command: generate, info, tokenize and classify against a lorafleet server.

A parent CLI can mount ``generate`` with add_generate_arguments() and run_generate().
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lorafleet._channel import API_KEY_ENV, DEFAULT_TARGET
from lorafleet.client import LoraFleetClient
from lorafleet.errors import LoraFleetError
from lorafleet.models import Completion, Message, Sampling

PROG = "lorafleet-client"
EXIT_OK, EXIT_RPC_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a tool killed by SIGPIPE


def default_target() -> str:
    return os.environ.get("LORAFLEET_TARGET") or DEFAULT_TARGET


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--target, --api-key, the TLS flags and --timeout."""
    parser.add_argument(
        "--target",
        default=default_target(),
        metavar="HOST:PORT",
        help=f"server address (default: $LORAFLEET_TARGET or {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"API key sent as 'authorization: Bearer KEY' (default: ${API_KEY_ENV}; prefer the variable: "
        "a flag shows in `ps`)",
    )
    parser.add_argument(
        "--tls", action="store_true", help="use TLS (the system's root certificates unless --tls-ca is given)"
    )
    parser.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="CA certificate(s) of the server's certificate (implies --tls)"
    )
    parser.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="client certificate, for servers that require one (mTLS)"
    )
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS", help="deadline per call")


def _seconds(value: str) -> float:
    """A --timeout: a positive number of seconds."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:  # also nan
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value!r}")
    return seconds


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``generate``, connection arguments included."""
    add_connection_arguments(parser)
    parser.add_argument("--adapter", default="", metavar="REF", help='"tenant/name[@version]"; default: base')
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument("--max-new-tokens", type=int, metavar="N")
    parser.add_argument("--temperature", type=float, metavar="T", help="0: greedy")
    parser.add_argument("--top-p", type=float, metavar="P")
    parser.add_argument("--top-k", type=int, metavar="K")
    parser.add_argument("--repetition-penalty", type=float, metavar="R")
    parser.add_argument("--seed", type=int, metavar="S")
    parser.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeat for several)")
    parser.add_argument("--system", metavar="TEXT", help="system message (with --chat)")
    parser.add_argument("--chat", action="store_true", help="send PROMPT as a user message of a chat")
    parser.add_argument("--request-id", metavar="ID", help="sent as x-request-id")
    parser.add_argument("prompt", metavar="PROMPT", help='the prompt; "-" reads it from stdin')


class UsageError(Exception):
    """A connection flag that cannot be used (a certificate file that cannot be read, a lone --tls-key)."""


def _read_pem(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror or exc}") from None


def _text(arg: str, name: str) -> str:
    """The text argument ``arg``, or stdin for ``-``. Bytes that are not UTF-8 reach Python as lone
    surrogates (its surrogateescape), which no request can carry: a usage error naming ``name``."""
    text = sys.stdin.read() if arg == "-" else arg
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = "stdin" if arg == "-" else name
        raise UsageError(f"{where} is not valid UTF-8") from None
    return text


def _client(args: argparse.Namespace) -> LoraFleetClient:
    """A client from the connection flags (raises UsageError for unusable TLS flags)."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together (a client certificate and its key)")
    return LoraFleetClient(
        args.target,
        api_key=args.api_key,
        tls=args.tls,
        root_certificates=_read_pem(args.tls_ca, "--tls-ca"),
        client_certificate=_read_pem(args.tls_cert, "--tls-cert"),
        client_key=_read_pem(args.tls_key, "--tls-key"),
        timeout=args.timeout,
    )


def _fail(error: LoraFleetError) -> int:
    print(f"{PROG}: error: {error.code.name}: {error.message}", file=sys.stderr)
    return EXIT_RPC_ERROR


def _sampling(args: argparse.Namespace) -> Sampling | None:
    """The sampling flags; None when none was given (the server's defaults)."""
    sampling = Sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    return None if sampling == Sampling() else sampling


def _summary_line(completion: Completion, seconds: float) -> str:
    return (
        f"[finish={completion.finish_reason} prompt_tokens={completion.prompt_tokens} "
        f"generated_tokens={completion.generated_tokens} adapter={completion.adapter or '-'} "
        f"request_id={completion.request_id or '-'} time={seconds:.2f}s]"
    )


def run_generate(args: argparse.Namespace) -> int:
    """Runs ``generate`` with arguments parsed by a parser set up with add_generate_arguments()."""
    if args.system is not None and not args.chat:
        print(f"{PROG}: error: --system needs --chat", file=sys.stderr)
        return EXIT_USAGE
    prompt = _text(args.prompt, "PROMPT")
    messages: list[Message] | None = None
    if args.chat:
        messages = [Message("system", args.system)] if args.system is not None else []
        messages.append(Message("user", prompt))
    inputs = {"messages": messages} if messages is not None else {"prompt": prompt}
    started = time.monotonic()
    with _client(args) as client:
        try:
            if not args.stream:
                completion = client.generate(
                    **inputs, adapter=args.adapter, sampling=_sampling(args), request_id=args.request_id
                )
                print(completion.text, flush=True)
            else:
                with client.stream(
                    **inputs, adapter=args.adapter, sampling=_sampling(args), request_id=args.request_id
                ) as stream:
                    try:
                        for chunk in stream:
                            print(chunk, end="", flush=True)
                    except LoraFleetError:
                        if stream.text:  # the error goes on a line of its own, not after the partial text
                            print(flush=True)
                        raise
                    except KeyboardInterrupt:
                        stream.cancel()
                        print(f"\n{PROG}: cancelled", file=sys.stderr)
                        return EXIT_INTERRUPTED
                    print(flush=True)
                    completion = stream.result
        except LoraFleetError as error:
            return _fail(error)
    print(_summary_line(completion, time.monotonic() - started), file=sys.stderr)
    return EXIT_OK


def run_info(args: argparse.Namespace) -> int:
    """Prints the server's model info as JSON."""
    with _client(args) as client:
        try:
            info = client.model_info()
        except LoraFleetError as error:
            return _fail(error)
    print(json.dumps(dataclasses.asdict(info), indent=2))
    return EXIT_OK


def run_tokenize(args: argparse.Namespace) -> int:
    """Prints the token ids and token strings of TEXT as JSON."""
    with _client(args) as client:
        try:
            tokens = client.tokenize(_text(args.text, "TEXT"))
        except LoraFleetError as error:
            return _fail(error)
    print(json.dumps({"count": len(tokens.ids), "ids": tokens.ids, "tokens": tokens.tokens}))
    return EXIT_OK


def run_classify(args: argparse.Namespace) -> int:
    """Prints a head adapter's labels with probabilities for TEXT (``-``: stdin) as JSON."""
    text = _text(args.text, "TEXT")
    inputs = {"messages": [Message("user", text)]} if args.chat else {"text": text}
    with _client(args) as client:
        try:
            result = client.classify(**inputs, adapter=args.adapter, top_k=args.top_k)  # type: ignore[arg-type]
        except LoraFleetError as error:
            return _fail(error)
    labels = [{"label": s.label, "probability": round(s.probability, 6)} for s in result.labels]
    print(json.dumps({"label": result.label, "labels": labels, "adapter": result.adapter}))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Client of a lorafleet gRPC server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate text, optionally through an adapter")
    add_generate_arguments(generate)
    generate.set_defaults(func=run_generate)

    info = commands.add_parser("info", help="print the model info as JSON")
    add_connection_arguments(info)
    info.set_defaults(func=run_info)

    tokenize = commands.add_parser("tokenize", help="print the tokens of TEXT as JSON")
    add_connection_arguments(tokenize)
    tokenize.add_argument("text", metavar="TEXT", help="the text to tokenize ('-': read stdin)")
    tokenize.set_defaults(func=run_tokenize)

    classify = commands.add_parser("classify", help="classify TEXT with a head adapter; labels as JSON")
    add_connection_arguments(classify)
    classify.add_argument("text", metavar="TEXT", help="the text to classify ('-': read stdin)")
    classify.add_argument("--adapter", "-a", required=True, help="head adapter tenant/name[@version]")
    classify.add_argument("--top-k", type=int, default=0, help="labels to print, most likely first (0: all)")
    classify.add_argument("--chat", action="store_true", help="send TEXT as one user turn of a chat")
    classify.set_defaults(func=run_classify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 RPC error, 2 usage, 130 interrupted, 141 stdout closed)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        status: int = args.func(args)
    except (UsageError, ValueError) as error:  # ValueError: an argument the request cannot carry
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C in a blocking call or a stdin read (a stream cancels itself)
        print(f"\n{PROG}: cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly, as a Unix tool does
        # Point stdout at /dev/null so the interpreter's final flush does not raise the same again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    return status


if __name__ == "__main__":
    sys.exit(main())
