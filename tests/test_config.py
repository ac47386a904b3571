"""Configuration is read in one place: flag > environment > config file > default."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from lorafleet_server.config import ServerConfig, add_server_arguments, parse_config, unknown_environment
from lorafleet_server.engine.types import EngineConfig


def test_defaults() -> None:
    cfg = parse_config([], environ={})
    assert cfg == ServerConfig()
    assert cfg.address == "127.0.0.1:50051"
    assert cfg.store_root == Path("data/adapters")


def test_precedence_flag_env_file(tmp_path: Path) -> None:
    file = tmp_path / "lorafleet.toml"
    file.write_text('[server]\nport = 7000\nmax_batch_size = 4\nquantization = "nf4"\n')
    env = {"LORAFLEET_PORT": "7001", "LORAFLEET_MAX_LORA_RANK": "16"}
    cfg = parse_config(["--config", str(file), "--port", "7002"], environ=env)
    assert cfg.port == 7002  # flag wins
    assert cfg.max_lora_rank == 16  # env
    assert cfg.max_batch_size == 4 and cfg.quantization == "nf4"  # file
    assert parse_config(["--config", str(file)], environ=env).port == 7001


def test_kernel_cache_dir_defaults_to_the_data_dir_and_may_be_shared(tmp_path: Path) -> None:
    assert parse_config(["--data-dir", str(tmp_path)], environ={}).kernels_dir == tmp_path / "kernels"
    shared = tmp_path / "shared-kernels"
    by_flag = parse_config(["--data-dir", str(tmp_path), "--kernel-cache-dir", str(shared)], environ={})
    by_env = parse_config([], environ={"LORAFLEET_KERNEL_CACHE_DIR": str(shared)})
    assert by_flag.kernels_dir == by_env.kernels_dir == shared


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"LORAFLEET_QUANTIZATION": "fp8"}, "quantization"),
        (["--max-batch-size", "0"], {}, "max_batch_size"),
        (["--port", "70000"], {}, "port"),
        (["--default-max-new-tokens", "50", "--max-new-tokens", "10"], {}, "default_max_new_tokens"),
        (["--linear-threads", "-1"], {}, "linear_threads must be >= 0"),
        (["--adapter-rescan-seconds", "-1"], {}, "adapter_rescan_seconds must be >= 0"),
        ([], {"LORAFLEET_LINEAR_KERNEL": "mkl"}, "linear_kernel"),
        # a negative tenant limit started or admitted nothing, while health said SERVING
        ([], {"LORAFLEET_MAX_RUNNING_PER_TENANT": "-1"}, "max_running_per_tenant must be >= 0"),
        (["--max-waiting-per-tenant", "-1"], {}, "max_waiting_per_tenant must be >= 0"),
        (["--host-cache-bytes", "-1"], {}, "host_cache_bytes must be >= 0"),
        (["--max-adapter-bytes", "0"], {}, "max_adapter_bytes must be > 0"),
        # it goes out in every call's metadata, where these made every call fail INTERNAL
        (["--replica-id", "r\u00e9plica"], {}, "replica_id must be printable ASCII"),
        (["--replica-id", "a b"], {}, "replica_id must be printable ASCII"),
    ],
)
def test_bad_values_are_refused(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_config(argv, environ=env)


def test_unknown_file_keys_are_refused(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text("[server]\nprot = 1\n")
    with pytest.raises(ValueError, match="prot"):
        parse_config(["--config", str(file)], environ={})


def test_every_flag_has_help_and_literal_choices() -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(ServerConfig):
        assert f.metadata.get("help"), f"ServerConfig.{f.name} has no help"
        assert f.name in actions
    assert actions["quantization"].choices == ("auto", "none", "nf4", "int8")
    assert actions["lora_impl"].choices == ("auto", "native", "dense", "token", "grouped", "gather")
    assert actions["attention_kernel"].choices == ("auto", "native", "torch")
    assert actions["log_format"].choices == ("text", "json")
    # The engine's limits are declared once, on EngineConfig, and reach the engine unchanged.
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert engine_fields <= {f.name for f in dataclasses.fields(ServerConfig)}
    cfg = parse_config(["--max-batch-size", "4", "--max-step-tokens", "64"], environ={})
    assert cfg.engine == EngineConfig(max_batch_size=4, max_step_tokens=64)


def test_badly_typed_env_value_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="max_waiting must be of type int, got 'many'"):
        parse_config([], environ={"LORAFLEET_MAX_WAITING": "many"})


def test_bool_fields_are_switches_with_env_and_file_values(tmp_path: Path) -> None:
    assert parse_config([], environ={}).insecure_no_auth is False
    assert parse_config(["--insecure-no-auth"], environ={}).insecure_no_auth is True
    for word, value in (
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("false", False),
        ("0", False),
        (" False ", False),
    ):
        assert parse_config([], environ={"LORAFLEET_INSECURE_NO_AUTH": word}).insecure_no_auth is value, word
    file = tmp_path / "lorafleet.toml"
    file.write_text("[server]\ninsecure_no_auth = true\n")
    assert parse_config(["--config", str(file)], environ={}).insecure_no_auth is True
    # The flag (given) wins over the environment; unset, the environment wins over the file.
    assert parse_config(["--insecure-no-auth"], environ={"LORAFLEET_INSECURE_NO_AUTH": "0"}).insecure_no_auth
    assert not parse_config(["--config", str(file)], environ={"LORAFLEET_INSECURE_NO_AUTH": "false"}).insecure_no_auth
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    with pytest.raises(SystemExit):  # a switch takes no value
        parser.parse_args(["--insecure-no-auth", "yes"])


@pytest.mark.parametrize("word", ["yes", "on", "2", "", "truthy"])
def test_a_bool_env_value_other_than_true_false_1_0_is_refused(word: str) -> None:
    with pytest.raises(ValueError, match="insecure_no_auth must be true, false, 1 or 0"):
        parse_config([], environ={"LORAFLEET_INSECURE_NO_AUTH": word})


def test_a_toml_bool_is_not_a_number(tmp_path: Path) -> None:
    file = tmp_path / "lorafleet.toml"
    file.write_text("[server]\nport = true\n")
    with pytest.raises(ValueError, match="port must be of type int"):
        parse_config(["--config", str(file)], environ={})


def test_tls_and_keys_settings(tmp_path: Path) -> None:
    cfg = parse_config(["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"], environ={})
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) == (Path("c.pem"), Path("k.pem"), Path("ca.pem"))
    assert parse_config([], environ={}).keys_poll_seconds == 2.0
    assert parse_config(["--keys-poll-seconds", "0.5"], environ={}).keys_poll_seconds == 0.5
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        parse_config(["--tls-cert", "c.pem"], environ={})
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        parse_config([], environ={"LORAFLEET_TLS_KEY": "k.pem"})
    with pytest.raises(ValueError, match=r"tls_client_ca .* needs tls_cert"):
        parse_config(["--tls-client-ca", "ca.pem"], environ={})
    with pytest.raises(ValueError, match="keys_poll_seconds must be > 0"):
        parse_config(["--keys-poll-seconds", "0"], environ={})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("port = 50051.5", "port must be of type int, got 50051.5"),  # int() truncated it
        ("max_batch_size = 8.0", "max_batch_size must be of type int"),
        ("replica_id = true", "replica_id must be of type str"),  # became the text "True"
        ("host = 127", "host must be of type str"),
        ("data_dir = 1", "data_dir must be of type Path"),
        ("drain_seconds = inf", "drain_seconds must be a finite number, got inf"),  # a drain that never ends
        ("shutdown_grace_seconds = nan", "shutdown_grace_seconds must be a finite number"),
        ("port = [1]", "port must be of type int"),
    ],
)
def test_a_toml_value_must_have_the_settings_type(tmp_path: Path, toml: str, message: str) -> None:
    file = tmp_path / "lorafleet.toml"
    file.write_text(f"[server]\n{toml}\n")
    with pytest.raises(ValueError, match=message):
        parse_config(["--config", str(file)], environ={})


def test_a_toml_int_may_be_given_for_a_float_setting(tmp_path: Path) -> None:
    file = tmp_path / "lorafleet.toml"
    file.write_text("[server]\ndrain_seconds = 3\nkeys_poll_seconds = 0.5\n")
    cfg = parse_config(["--config", str(file)], environ={})
    assert (cfg.drain_seconds, cfg.keys_poll_seconds) == (3.0, 0.5)


@pytest.mark.parametrize("word", ["inf", "-inf", "nan", "Infinity"])
def test_non_finite_seconds_from_the_environment_are_refused(word: str) -> None:
    with pytest.raises(ValueError, match="drain_seconds must be a finite number"):
        parse_config([], environ={"LORAFLEET_DRAIN_SECONDS": word})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[sever]\nport = 7000\n", r"only a \[server\] table, it has: sever"),  # every setting was ignored
        ("port = 7000\n", r"only a \[server\] table, it has: port"),  # forgot the table
        ("server = 1\n", r"must be a table"),
        ("[server]\nport = \n", "is not valid TOML"),
        ("[server]\nmax_batch_sise = 4\n", r"max_batch_sise \(did you mean max_batch_size\?\)"),
    ],
)
def test_a_config_file_holding_anything_but_a_server_table_is_refused(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "lorafleet.toml"
    file.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_config(["--config", str(file)], environ={})


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read the config file .*missing\.toml: No such file"):
        parse_config(["--config", str(tmp_path / "missing.toml")], environ={})
    with pytest.raises(ValueError, match="cannot read the config file"):
        parse_config([], environ={"LORAFLEET_CONFIG": str(tmp_path / "missing.toml")})


def test_unknown_lorafleet_variables_are_named_with_a_hint() -> None:
    environ = {
        "LORAFLEET_PORT": "1",
        "LORAFLEET_DRAIN_SECOND": "3",  # misspelled: silently ignored before
        "LORAFLEET_API_KEY": "k",  # the client's
        "LORAFLEET_TARGET": "x",
        "LORAFLEET_KEYS_PEPPER": "p",
        "LORAFLEET_CONFIG": "c",
        "LORAFLEET_ZZZ": "1",
        "OTHER": "1",
    }
    assert unknown_environment(environ) == [
        "LORAFLEET_DRAIN_SECOND (did you mean LORAFLEET_DRAIN_SECONDS?)",
        "LORAFLEET_ZZZ",
    ]
    assert unknown_environment({f"LORAFLEET_{f.name.upper()}": "" for f in dataclasses.fields(ServerConfig)}) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "9000", "--http-port", "9000"], "port and http_port are both 9000"),
        (["--metrics-port", "50051"], "port and metrics_port are both 50051"),
        (["--metrics-port", "8000"], "metrics_port and http_port are both 8000"),
    ],
)
def test_two_listeners_on_one_port_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_config(argv, environ={})
    parse_config(["--port", "0", "--metrics-port", "0", "--http-port", "0"], environ={})  # any free ports


def test_a_subcommand_lists_the_settings_it_reads_and_accepts_the_rest(capsys: pytest.CaptureFixture[str]) -> None:
    """Every subcommand's --help listed all ~55 server settings (a README walkthrough found `adapters
    list --help` unreadable). Each lists the ones it reads now; the rest still parse, as the same
    settings do from LORAFLEET_* or --config."""
    from lorafleet_server.cli import build_parser

    parser = build_parser("adapters")
    with pytest.raises(SystemExit):
        parser.parse_args(["adapters", "list", "--help"])
    listing = capsys.readouterr().out
    assert "--adapter-store" in listing and "--data-dir" in listing and "lorafleet serve --help" in listing
    assert "--max-batch-size" not in listing and "--tls-cert" not in listing
    args = parser.parse_args(["adapters", "list", "--max-batch-size", "4", "--data-dir", "d"])
    assert (args.max_batch_size, args.data_dir) == (4, Path("d"))
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    assert "--max-batch-size" in capsys.readouterr().out  # serve lists them all


def test_the_c_compiler_is_the_flag_then_ours_then_cc() -> None:
    """Read here only: the native kernels take the compiler the config names (model/native.py reads no
    environment)."""
    assert parse_config([], environ={}).c_compiler is None  # cc or gcc on the PATH
    assert parse_config([], environ={"CC": "clang"}).c_compiler == "clang"
    both = {"CC": "clang", "LORAFLEET_C_COMPILER": "/opt/gcc-14/bin/gcc"}
    assert parse_config([], environ=both).c_compiler == "/opt/gcc-14/bin/gcc"
    assert parse_config(["--c-compiler", "gcc-13"], environ=both).c_compiler == "gcc-13"


def test_a_service_builds_every_native_kernel_with_the_configured_compiler(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every kernel the service builds goes through ``c_compiler``: with cc and gcc hidden from the
    kernels, one call site that forgot it would fall back to torch (or refuse to start) unseen."""
    import shutil

    from enginelib import tiny_service

    from lorafleet_server.model import native
    from lorafleet_server.model.cpu import cpu_features

    real = native.find_compiler()
    if real is None:
        pytest.skip("no C compiler on this machine")
    calls = tmp_path / "calls"
    wrapper = tmp_path / "my-cc"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    which = shutil.which
    monkeypatch.setattr(native.shutil, "which", lambda name: None if name in ("cc", "gcc") else which(name))
    service = tiny_service(
        tiny_model_dir, tmp_path / "adapters", c_compiler=str(wrapper), kernel_cache_dir=tmp_path / "kernels"
    )
    try:
        built = {Path(word).name for line in calls.read_text().splitlines() for word in line.split()}
        expected = {"attention.c", "lora.c", "transpose.c", "layers.c"}
        if "avx2" in cpu_features().flags:  # the fp32 base's Linears: native timed against oneDNN and torch
            expected.add("linear_f32.c")
        assert expected <= built, sorted(built)
        info = service.info
        assert (info.attention_kernel, info.lora_kernel) == ("native", "native")
    finally:
        service.engine.shutdown(0.0)
