"""Configuration is read in one place: flag > environment > config file > default."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet_server.config import ServerConfig, parse_config


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


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"LORAFLEET_QUANTIZATION": "fp8"}, "quantization"),
        (["--max-batch-size", "0"], {}, "max_batch_size"),
        (["--port", "70000"], {}, "port"),
        (["--default-max-new-tokens", "50", "--max-new-tokens", "10"], {}, "default_max_new_tokens"),
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
