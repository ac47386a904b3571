"""`lorafleet keys` as a user runs it: create prints the key once, list never shows it, revoke."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lorafleet_server.cli import main
from lorafleet_server.tenants.errors import RevokedKey
from lorafleet_server.tenants.keys import PepperSource, load_keys, parse_key

LORAFLEET = [sys.executable, "-m", "lorafleet_server"]
KEY = re.compile(r"lf_[a-z2-7]{12}_[a-z2-7]{32}")


def keys(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    environ.update(env or {})
    return subprocess.run(
        [*LORAFLEET, "keys", *args], capture_output=True, text=True, timeout=120, check=False, env=environ
    )


def test_create_list_revoke(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    created = keys(
        "create", "--tenant", "acme", "--role", "tenant", "--expires-in", "30d", "--weight", "2", "--max-waiting",
        "4", "--max-running", "2", *data,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    lines = created.stdout.splitlines()
    assert len(lines) == 1 and KEY.fullmatch(lines[-1]), created.stdout
    key = lines[-1]
    key_id, secret = parse_key(key)
    assert key_id in created.stderr and "acme" in created.stderr and secret not in created.stderr
    path = tmp_path / "keys.json"
    record = load_keys(path, PepperSource(path).read()).authenticate(key, datetime.now(UTC))
    assert (record.tenant, record.role, record.weight, record.max_waiting, record.max_running) == (
        "acme", "tenant", 2.0, 4, 2,
    )  # fmt: skip
    assert record.expires is not None and record.expires - record.created == timedelta(days=30)

    admin = keys("create", "--tenant", "ops", "--role", "admin", *data)
    assert admin.returncode == 0, admin.stderr
    admin_key = admin.stdout.splitlines()[-1]

    listed = keys("list", *data)
    as_json = keys("list", "--json", *data)
    assert listed.returncode == 0 and as_json.returncode == 0
    hmacs = [e["secret_hmac"] for e in json.loads(path.read_text())["keys"]]
    for output in (listed.stdout + listed.stderr, as_json.stdout + as_json.stderr):
        for text in (key, secret, admin_key, parse_key(admin_key)[1], *hmacs):
            assert text not in output
    rows = json.loads(as_json.stdout)
    assert [(r["id"], r["tenant"], r["role"], r["status"]) for r in rows] == [
        (key_id, "acme", "tenant", "active"),
        (parse_key(admin_key)[0], "ops", "admin", "active"),
    ]
    assert rows[0]["weight"] == 2.0 and rows[0]["max_waiting"] == 4 and rows[1]["expires"] is None
    header, *table = listed.stdout.splitlines()
    assert header.split("\t")[:4] == ["id", "tenant", "role", "status"] and len(table) == 2
    assert table[0].startswith(f"{key_id}\tacme\ttenant\tactive\t")

    revoked = keys("revoke", key_id, *data)
    assert revoked.returncode == 0 and f"revoked API key {key_id}" in revoked.stdout
    again = keys("revoke", key_id, *data)
    assert again.returncode == 0 and "already revoked" in again.stdout
    with pytest.raises(RevokedKey):
        load_keys(path, PepperSource(path).read()).authenticate(key, datetime.now(UTC))
    assert json.loads(keys("list", "--json", *data).stdout)[0]["status"] == "revoked"

    unknown = keys("revoke", "aaaaaaaaaaaa", *data)
    assert unknown.returncode == 1 and "no key with id aaaaaaaaaaaa" in unknown.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tenant", "Acme Corp", "--role", "tenant"], "invalid tenant"),
        (["--tenant", "acme", "--role", "root"], "invalid choice"),
        (["--tenant", "acme"], "--role"),
        (["--tenant", "acme", "--role", "tenant", "--expires-in", "soon"], "invalid duration"),
        (["--tenant", "acme", "--role", "tenant", "--weight", "-1"], "invalid weight"),
        (["--tenant", "acme", "--role", "tenant", "--max-waiting", "0"], "invalid limit"),
        (["--tenant", "acme", "--role", "tenant", "--max-running", "x"], "invalid limit"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """In process (argparse refuses before anything runs); the subprocess tests above cover the rest."""
    with pytest.raises(SystemExit) as caught:
        main(["keys", "create", *args, "--data-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert caught.value.code == 2 and message in err
    assert out == "" and list(tmp_path.iterdir()) == []


def test_keys_file_from_the_environment_and_the_pepper_from_its_variable(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "k.json"
    env = {"LORAFLEET_KEYS_FILE": str(path), "LORAFLEET_KEYS_PEPPER": "s" * 48}
    created = keys("create", "--tenant", "acme", "--role", "tenant", env=env)
    assert created.returncode == 0, created.stderr
    assert path.exists() and not (tmp_path / "elsewhere" / "k.json.pepper").exists()
    ring = load_keys(path, ("s" * 48).encode())
    assert ring.authenticate(created.stdout.splitlines()[-1], datetime.now(UTC)).tenant == "acme"
    listed = keys("list", "--keys-file", str(path))  # the flag names the same file, no pepper needed
    assert listed.returncode == 0 and "acme" in listed.stdout
    broken = keys("list", "--keys-file", str(tmp_path / "broken.json"))
    assert broken.returncode == 0 and broken.stdout == ""  # no file: no keys
    (tmp_path / "broken.json").write_text("{")
    broken = keys("list", "--keys-file", str(tmp_path / "broken.json"))
    assert broken.returncode == 1 and "not valid JSON" in broken.stderr


@pytest.mark.parametrize("command", [["create", "--tenant", "acme", "--role", "tenant"], ["list"], ["list", "--json"]])
def test_keys_commands_load_neither_torch_nor_the_model_stack(tmp_path: Path, command: list[str]) -> None:
    """An operator's `lorafleet keys ...` is a file edit: it used to import torch (~1 s) on the way."""
    probe = (
        "import sys\n"
        "from lorafleet_server.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'grpc', 'boto3', 'numpy') if m in sys.modules)\n"
        "print('loaded:', heavy, file=sys.stderr)\n"
        "raise SystemExit(rc)\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    done = subprocess.run(
        [sys.executable, "-c", probe, "keys", *command, "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=environ,
    )
    assert done.returncode == 0, done.stderr
    assert "loaded: []" in done.stderr, done.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_key_that_cannot_be_printed_is_revoked_not_left_active(tmp_path: Path) -> None:
    """Found by an outside review: `keys create > /dev/full` exited 1 but left an active admin key whose
    secret nobody had, and as the first key it turned authentication on for an open server."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    with open("/dev/full", "w") as full:
        created = subprocess.run(
            [*LORAFLEET, "keys", "create", "--tenant", "acme", "--role", "admin", "--data-dir", str(tmp_path)],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
            env=environ,
        )
    assert created.returncode == 1 and "is revoked" in created.stderr, created.stderr
    listed = json.loads(keys("list", "--json", "--data-dir", str(tmp_path)).stdout)
    assert [entry["status"] for entry in listed] == ["revoked"]
