"""`lorafleet adapters import|list|stale` and `publish-prompt` against an S3 bucket (a real SeaweedFS).

The commands run in-process through ``lorafleet_server.cli.main``, with the endpoint and credentials
in the environment the boto3 way, as after ``. .fleet/env``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from seaweedlib import SeaweedFS

from lorafleet_adapters.backend import StoreSettings, open_store
from lorafleet_adapters.ref import AdapterKey
from lorafleet_server.cli import main

BUCKET = "cli"


@pytest.fixture
def env(seaweed_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path) -> list[str]:
    for name, value in seaweed_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LORAFLEET_ADAPTER_STORE", f"s3://{BUCKET}/{tmp_path.name}")
    return ["--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "data")]


def test_import_list_publish_prompt_stale_on_a_bucket(
    env: list[str], peft_adapter: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = peft_adapter(seed=500, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    assert main(["adapters", "import", str(src), "acme/support", *env]) == 0
    assert main(["adapters", "import", str(src), "acme/support", *env]) == 0
    out = capsys.readouterr().out
    assert "published acme/support@1\n" in out and "published acme/support@2\n" in out
    examples = tmp_path / "shots.json"
    examples.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]))
    rc = main(["publish-prompt", "zephyr/brief", "--system", "Be brief.", "--examples", str(examples), *env])
    assert rc == 0
    assert f"into s3://{BUCKET}/{tmp_path.name}" in capsys.readouterr().out
    assert main(["adapters", "list", *env]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "acme/support\tlatest=2\tversions=1,2",
        "zephyr/brief\tlatest=1\tversions=1",
    ]
    assert main(["adapters", "stale", *env]) == 0
    assert capsys.readouterr().out == ""  # all built for this base
    # What the CLI published, a replica reads and verifies.
    store = open_store(StoreSettings(f"s3://{BUCKET}/{tmp_path.name}", cache_dir=tmp_path / "replica"))
    assert store.load_prompt(AdapterKey("zephyr", "brief", 1)).system == "Be brief."
    # `stale --store` reads another store than the server's: an empty prefix of the same bucket.
    assert main(["adapters", "stale", "--store", f"s3://{BUCKET}/elsewhere", *env]) == 0


def test_bad_store_settings_fail_with_a_clear_error(
    env: list[str], seaweed_server: SeaweedFS, peft_adapter: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    src = peft_adapter(seed=501, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    with pytest.raises(SystemExit) as exit_info:  # refused while the configuration is read
        main(["adapters", "list", "--adapter-store", "s3://Bad_Bucket/x", *env])
    assert exit_info.value.code == 2
    assert "not a valid bucket name" in capsys.readouterr().err
    assert main(["adapters", "import", str(src), "acme/x", "--adapter-store", "s3://no-such-bucket/x", *env]) == 1
    assert "the bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    rc = main(["adapters", "list", "--s3-endpoint-url", "http://127.0.0.1:1", *env])
    assert rc == 1
    assert "http://127.0.0.1:1" in capsys.readouterr().err


def test_store_flag_takes_the_endpoint_flag(
    seaweed_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Found by an outside review: `--store s3://...` re-opened the store without `--s3-endpoint-url`,
    so publish, publish-prompt, retrain and stale went to AWS's endpoint (after the first open, with the
    flag, had checked the right one)."""
    endpoint = seaweed_server.endpoint_url
    for name, value in seaweed_server.env().items():
        if name != "AWS_ENDPOINT_URL":
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    args = ["--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "data"), "--s3-endpoint-url", endpoint]
    location = f"s3://{BUCKET}/{tmp_path.name}-flag"
    assert main(["publish-prompt", "acme/brief", "--system", "Be brief.", "--store", location, *args]) == 0
    store = open_store(StoreSettings(location, s3_endpoint_url=endpoint, cache_dir=tmp_path / "replica"))
    assert store.load_prompt(AdapterKey("acme", "brief", 1)).system == "Be brief."
