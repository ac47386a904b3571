"""lorafleet-client: argument parsing, output and exit codes (against the fake server)."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from lorafleet.cli import add_generate_arguments, main, run_generate
from lorafleet_proto.v1 import inference_pb2 as ipb

if TYPE_CHECKING:
    from conftest import FakeServer


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--adapter",
        "--stream",
        "--max-new-tokens",
        "--top-p",
        "--seed",
        "--stop",
        "--chat",
        "PROMPT",
    ):
        assert flag in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["generate"],
        ["generate", "--top-k", "many", "hi"],
        ["tokenize"],
        ["bogus"],
        ["info", "--timeout", "-1"],  # it went out, and failed DEADLINE_EXCEEDED
        ["info", "--timeout", "nan"],
    ],
)
def test_usage_errors_exit_two(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_system_needs_chat(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--target", "127.0.0.1:1", "--system", "be brief", "hi"]) == 2
    assert "--system needs --chat" in capsys.readouterr().err


def test_generate_prints_text_and_summary(fake_server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--target", fake_server.target, "--adapter", "acme/support", "--request-id", "r1"]
    argv += ["--max-new-tokens", "9", "--temperature", "0.5", "--top-p", "0.75", "--top-k", "4"]
    argv += ["--repetition-penalty", "1.5", "--seed", "3", "--stop", "a", "--stop", "b", "hello"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "echo hello\n"
    assert "finish=stop" in captured.err and "adapter=acme/support@2" in captured.err
    assert "request_id=r1" in captured.err and "generated_tokens=5" in captured.err
    request = fake_server.recorder.request
    assert isinstance(request, ipb.GenerateRequest)
    params = request.params
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k) == (9, 0.5, 0.75, 4)
    assert (params.repetition_penalty, params.seed, list(params.stop)) == (1.5, 3, ["a", "b"])


def test_generate_stream_from_env_target(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORAFLEET_TARGET", fake_server.target)
    assert main(["generate", "--stream", "hi"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello, wörld\n"
    assert "finish=stop" in captured.err
    request = fake_server.recorder.request
    assert isinstance(request, ipb.GenerateStreamRequest) and not request.HasField("params")


def test_generate_chat_from_stdin(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    argv = ["generate", "--target", fake_server.target, "--chat", "--system", "be brief", "-"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "echo system:be brief|user:from stdin\n"


def test_rpc_error_exits_one(fake_server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    for extra in ([], ["--stream"]):
        argv = ["generate", "--target", fake_server.target, "--adapter", "error:NOT_FOUND", *extra, "hi"]
        assert main(argv) == 1
        assert "error: NOT_FOUND: fake error:NOT_FOUND" in capsys.readouterr().err


def test_a_stream_failing_midway_prints_its_error_on_a_line_of_its_own(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--target", fake_server.target, "--adapter", "late-error:UNAVAILABLE", "--stream", "hi"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "Hel\n"  # was "Hel" with the error glued to it on the terminal


def test_a_closed_stdout_ends_quietly(fake_server: FakeServer) -> None:
    script = "import sys; from lorafleet.cli import main; sys.exit(main(sys.argv[1:]))"
    # The fake echoes the prompt: 99 KB of output, more than the pipe holds, so the write meets the close
    argv = [sys.executable, "-c", script, "generate", "--target", fake_server.target, "hi " * 33_000]
    reader = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout is not None and reader.stderr is not None
    reader.stdout.read(2)
    reader.stdout.close()  # `| head -c 2`
    err = reader.stderr.read().decode()
    assert reader.wait(30) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_info_and_tokenize_print_json(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", "--target", fake_server.target]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_id"] == "tiny/model" and info["target_modules"] == ["q_proj", "v_proj"]
    assert info["adapter_slot_memory_bytes"] == 1_327_104
    assert main(["tokenize", "--target", fake_server.target, "ab"]) == 0
    assert json.loads(capsys.readouterr().out) == {"count": 2, "ids": [97, 98], "tokens": ["a", "b"]}
    monkeypatch.setattr("sys.stdin", io.StringIO("ab"))
    assert main(["tokenize", "--target", fake_server.target, "-"]) == 0  # "-" reads stdin, as elsewhere
    assert json.loads(capsys.readouterr().out)["ids"] == [97, 98]


def test_unreachable_server_exits_one(dead_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--target", dead_target, "--timeout", "5"]) == 1
    assert "error: UNAVAILABLE:" in capsys.readouterr().err


def test_parent_cli_can_mount_generate(fake_server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    parent = argparse.ArgumentParser(prog="lorafleet")
    commands = parent.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate")
    add_generate_arguments(generate)
    generate.set_defaults(func=run_generate)
    args = parent.parse_args(["generate", "--target", fake_server.target, "--seed", "1", "hi"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == "echo hi\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--seed", "-1", "hi"], "seed must be in [0, 18446744073709551615], got -1"),
        (["generate", "--max-new-tokens", "3000000000", "hi"], "max_new_tokens must be in"),
        (["classify", "--top-k", "-1", "-a", "acme/x", "hi"], "top_k must be in [0, 4294967295], got -1"),
        (["generate", "\udcff"], "PROMPT is not valid UTF-8"),  # a non-UTF-8 argument byte, as Python reads it
    ],
)
def test_arguments_a_request_cannot_carry_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """They were tracebacks (exit 1, as if the server had failed)."""
    assert main([argv[0], "--target", "127.0.0.1:1", *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_non_utf8_stdin_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("caf\udce9"))  # surrogateescape of b"caf\xe9"
    assert main(["generate", "--target", "127.0.0.1:1", "-"]) == 2
    assert "stdin is not valid UTF-8" in capsys.readouterr().err


def test_ctrl_c_in_a_blocking_call_exits_130(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the streaming loop handled it; a blocking generate, info or a stdin read printed a traceback."""

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("lorafleet.client.LoraFleetClient.model_info", interrupted)
    assert main(["info", "--target", fake_server.target]) == 130
    assert "cancelled" in capsys.readouterr().err
