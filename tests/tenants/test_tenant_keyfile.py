"""The keys file: strict validation, the pepper, atomic locked writes, create and revoke."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lorafleet_server.config import keys_pepper, parse_config
from lorafleet_server.tenants import keys as keys_module
from lorafleet_server.tenants.errors import (
    InvalidKeyRecord,
    KeyFileError,
    KeyIdNotFound,
    KeysError,
    PepperError,
    RevokedKey,
    UnknownKey,
)
from lorafleet_server.tenants.keys import (
    KeyFile,
    KeyRing,
    PepperSource,
    create_key,
    load_keys,
    parse_key,
    pepper_id,
    read_key_file,
    revoke_key,
    save_keys,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
HMAC = "ab" * 32
_DROP = object()  # entry(field=_DROP) leaves the field out


def entry(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "abcdefghijkl",
        "tenant": "acme",
        "role": "tenant",
        "secret_hmac": HMAC,
        "created": "2026-12-01T00:00:00Z",
        "expires": None,
        "revoked": None,
        "weight": None,
        "max_waiting": None,
        "max_running": None,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not _DROP}


class _Raw(str):
    """A number written into the JSON text as is."""


def document(*entries: dict[str, Any], **top: Any) -> bytes:
    doc: dict[str, Any] = {"version": 1, "keys": list(entries)}
    doc.update(top)
    text = json.dumps(doc, default=str)
    for e in entries:
        for value in e.values() if isinstance(e, dict) else ():
            if isinstance(value, _Raw):
                text = text.replace(json.dumps(value), value)
    return text.encode()


BAD_FILES: list[tuple[str, bytes, str]] = [
    ("not json", b"{", "not valid JSON"),
    ("not utf-8", b'{"version": 1, "keys": ["\xff"]}', "not UTF-8"),
    ("array at the top", b"[]", "must be a JSON object, got an array"),
    ("unknown top field", document(extra=1), "unknown field 'extra'"),
    ("no version", b'{"keys": []}', "field 'version' must be 1"),
    ("version 2", document(version=2), "field 'version' must be 1, got 2"),
    ("version true", document(version=True), "field 'version' must be 1"),
    ("keys an object", document(keys={}), "field 'keys' must be an array, got an object"),
    ("no keys", b'{"version": 1}', "field 'keys' must be an array, got null"),
    ("bad pepper id", document(pepper_id="xyz"), "field 'pepper_id' must be 16 lowercase hex"),
    ("entry not an object", document("lf_key"), "keys[0] must be an object, got a string"),
    (
        "unknown entry field",
        document(entry(secret="s")),
        "keys[0] (id abcdefghijkl): field 'secret' is not a key field",
    ),
    ("missing tenant", document(entry(tenant=_DROP)), "field 'tenant' is missing"),
    ("missing created", document(entry(created=_DROP)), "field 'created' is missing"),
    ("bad tenant", document(entry(tenant="Acme Corp")), "field 'tenant' is invalid: invalid tenant 'Acme Corp'"),
    ("tenant a number", document(entry(tenant=7)), "field 'tenant' must be a string, got a number"),
    ("bad role", document(entry(role="root")), "field 'role' must be one of tenant, admin, got 'root'"),
    ("bad id", document(entry(id="ABC")), "keys[0]: field 'id' must be 12 characters of [a-z2-7]"),
    ("id a list", document(entry(id=[1])), "keys[0]: field 'id' must be a string, got an array"),
    ("short hmac", document(entry(secret_hmac="ab")), "field 'secret_hmac' must be 64 lowercase hex"),
    ("upper-case hmac", document(entry(secret_hmac="AB" * 32)), "field 'secret_hmac' must be 64 lowercase hex"),
    ("created not a time", document(entry(created="yesterday")), "field 'created' is not an ISO-8601 time"),
    ("created naive", document(entry(created="2026-12-01T00:00:00")), "field 'created' has no UTC offset"),
    ("created null", document(entry(created=None)), "field 'created' must be an ISO-8601 time string, got null"),
    ("expires a number", document(entry(expires=5)), "field 'expires' must be an ISO-8601 time string, got a number"),
    ("revoked bad", document(entry(revoked="2026-02-30T00:00:00Z")), "field 'revoked' is not an ISO-8601 time"),
    ("weight zero", document(entry(weight=0)), "field 'weight' must be a finite number > 0"),
    ("weight negative", document(entry(weight=-2.5)), "field 'weight' must be a finite number > 0"),
    ("weight a string", document(entry(weight="2")), "field 'weight' must be a number > 0 or null, got a string"),
    ("weight a boolean", document(entry(weight=True)), "field 'weight' must be a number > 0 or null, got a boolean"),
    ("weight NaN", document(entry(weight=float("nan"))), "NaN is not a JSON number"),
    ("weight infinite", document(entry(weight=float("inf"))), "Infinity is not a JSON number"),
    ("weight 1e400", document(entry(weight=_Raw("1e400"))), "field 'weight' must be a finite number > 0"),
    ("weight a huge integer", document(entry(weight=10**400)), "field 'weight' must be a finite number > 0"),
    ("a number of 5000 digits", b'{"version": 1, "keys": [' + b"9" * 5000 + b"]}", "not a usable JSON document"),
    ("max_waiting zero", document(entry(max_waiting=0)), "field 'max_waiting' must be an integer > 0 or null, got 0"),
    ("max_waiting float", document(entry(max_waiting=1.5)), "field 'max_waiting' must be an integer > 0"),
    ("max_running negative", document(entry(max_running=-1)), "field 'max_running' must be an integer > 0"),
    ("max_running boolean", document(entry(max_running=True)), "field 'max_running' must be an integer > 0"),
    (
        "duplicate ids",
        document(entry(), entry(tenant="other")),
        "keys[1] (id abcdefghijkl): field 'id' repeats an earlier key's id",
    ),
    (
        "repeated field",
        b'{"version": 1, "keys": [{"id": "abcdefghijkl", "tenant": "a", "tenant": "b"}]}',
        "key 'tenant' is given twice in one object",
    ),
    ("deeply nested", b"[" * 100_000 + b"]" * 100_000, "keys file"),
]


@pytest.mark.parametrize(("data", "message"), [(d, m) for _, d, m in BAD_FILES], ids=[n for n, _, _ in BAD_FILES])
def test_bad_files_are_refused_naming_the_entry_and_field(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(data)
    with pytest.raises(KeyFileError) as caught:
        load_keys(path, b"p" * 64)
    text = str(caught.value)
    assert text.startswith(f"keys file {path}: ")
    assert message in text
    assert HMAC not in text and "AB" * 32 not in text


def test_a_valid_file_loads_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    full = entry(
        expires="2027-01-01T00:00:00+01:00", revoked=None, weight=2, max_waiting=8, max_running=2, role="admin"
    )
    path.write_bytes(document(full, entry(id="bcdefghijklm", created="2026-12-01T00:00:00.123456Z")))
    ring = load_keys(path, b"p" * 64)
    first = ring.records[0]
    assert (first.role, first.weight, first.max_waiting, first.max_running) == ("admin", 2.0, 8, 2)
    assert first.expires == datetime(2026, 12, 31, 23, 0, tzinfo=UTC)
    assert ring.get("bcdefghijklm") is ring.records[1]
    # What is written reads back the same.
    save_keys(path, ring.records, b"p" * 64)
    assert load_keys(path, b"p" * 64).records == ring.records


def test_a_missing_file_means_no_keys(tmp_path: Path) -> None:
    assert len(load_keys(tmp_path / "absent.json", b"p" * 64)) == 0
    assert read_key_file(tmp_path / "absent.json") == KeyFile()


def test_an_unreadable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "keys.json").mkdir()
    with pytest.raises(KeyFileError, match="cannot read it"):
        load_keys(tmp_path / "keys.json", b"p" * 64)


def test_create_stores_only_the_hmac_and_a_pepper_file_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "data" / "keys.json"
    source = PepperSource(path)
    new = create_key(path, source, tenant="acme", role="tenant", now=NOW, expires=NOW + timedelta(days=30))
    key_id, secret = parse_key(new.key)
    assert new.key not in repr(new) and secret not in repr(new)
    stored = path.read_text()
    assert secret not in stored and new.key not in stored
    assert json.loads(stored)["keys"][0]["id"] == key_id
    for file in (path, source.path, tmp_path / "data" / "keys.json.lock"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    pepper = source.read()
    assert len(source.path.read_text().strip()) == 64
    assert json.loads(stored)["pepper_id"] == pepper_id(pepper)
    ring = load_keys(path, pepper)
    assert ring.authenticate(new.key, NOW) == new.record
    # The file without its pepper: the same secret under another pepper does not authenticate.
    with pytest.raises(UnknownKey):
        KeyRing(ring.records, b"another pepper, not the one used!").authenticate(new.key, NOW)
    with pytest.raises(PepperError, match="another pepper"):
        load_keys(path, b"another pepper, not the one used!")
    # A second key reuses the pepper.
    second = create_key(path, source, tenant="beta", role="admin", now=NOW, weight=0.5, max_running=3)
    assert source.read() == pepper
    ring = load_keys(path, pepper)
    assert len(ring) == 2 and ring.authenticate(second.key, NOW).tenant == "beta"


def test_the_pepper_may_come_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    assert keys_pepper({"LORAFLEET_KEYS_PEPPER": "x" * 40}) == "x" * 40
    assert keys_pepper({}) is None and keys_pepper({"LORAFLEET_KEYS_PEPPER": ""}) is None
    source = PepperSource(path, keys_pepper({"LORAFLEET_KEYS_PEPPER": "x" * 40}))
    assert "x" * 40 not in repr(source)
    new = create_key(path, source, tenant="acme", role="tenant", now=NOW)
    assert not source.path.exists()
    assert load_keys(path, ("x" * 40).encode()).authenticate(new.key, NOW).tenant == "acme"
    with pytest.raises(PepperError, match="at least 32"):
        PepperSource(path, "short").read()
    # Keys written with the environment's pepper are not silently checked with a new pepper file.
    with pytest.raises(PepperError, match="does not exist"):
        create_key(path, PepperSource(path), tenant="acme", role="tenant", now=NOW)
    assert not PepperSource(path).path.exists()


def test_bad_fields_write_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    for fields in ({"tenant": "Bad Name"}, {"weight": 0.0}, {"max_waiting": 0}, {"role": "root"}):
        args: dict[str, Any] = {"tenant": "acme", "role": "tenant", **fields}
        with pytest.raises(InvalidKeyRecord):
            create_key(path, PepperSource(path), now=NOW, **args)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_create_refuses_a_broken_file_and_leaves_it(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"version": 1, "keys": [1]}')
    with pytest.raises(KeyFileError):
        create_key(path, PepperSource(path), tenant="acme", role="tenant", now=NOW)
    assert path.read_text() == '{"version": 1, "keys": [1]}'


def test_revoke(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    source = PepperSource(path)
    new = create_key(path, source, tenant="acme", role="tenant", now=NOW)
    later = NOW + timedelta(hours=1)
    record, changed = revoke_key(path, new.record.key_id, later)
    assert changed and record.revoked == later
    mtime = path.stat().st_mtime_ns
    again, changed = revoke_key(path, new.record.key_id, later + timedelta(hours=1))
    assert not changed and again.revoked == later and path.stat().st_mtime_ns == mtime
    with pytest.raises(RevokedKey):
        load_keys(path, source.read()).authenticate(new.key, later)
    with pytest.raises(KeyIdNotFound, match="no key with id aaaaaaaaaaaa"):
        revoke_key(path, "aaaaaaaaaaaa", later)
    with pytest.raises(KeyIdNotFound, match="does not exist"):
        revoke_key(tmp_path / "none" / "keys.json", "aaaaaaaaaaaa", later)
    assert not (tmp_path / "none").exists()
    with pytest.raises(KeyIdNotFound, match="not a key id") as caught:
        revoke_key(path, new.key, later)  # a whole key pasted by mistake is not echoed
    assert new.key not in str(caught.value)


def test_a_keys_file_reached_through_a_symlink_is_written_where_it_lives(tmp_path: Path) -> None:
    """Found by an outside review: `keys revoke` through a linked path replaced the link with a file
    of its own and said "revoked", while the real file the servers read kept the key active."""
    shared = tmp_path / "shared" / "keys.json"
    source = PepperSource(shared)
    new = create_key(shared, source, tenant="acme", role="tenant", now=NOW)
    link = tmp_path / "admin" / "keys.json"
    link.parent.mkdir()
    link.symlink_to(shared)
    _, changed = revoke_key(link, new.record.key_id, NOW + timedelta(hours=1))
    assert changed and link.is_symlink()
    with pytest.raises(RevokedKey):
        load_keys(shared, source.read()).authenticate(new.key, NOW + timedelta(hours=2))
    assert (shared.parent / (shared.name + ".lock")).exists() and not (link.parent / (link.name + ".lock")).exists()


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys.json"
    source = PepperSource(path)
    create_key(path, source, tenant="acme", role="tenant", now=NOW)
    before = path.read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(keys_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk on fire"):
        create_key(path, source, tenant="acme", role="tenant", now=NOW)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json", "keys.json.lock", "keys.json.pepper"]


def test_save_keys_refuses_duplicates_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    new = create_key(path, PepperSource(path), tenant="acme", role="tenant", now=NOW)
    before = path.read_bytes()
    with pytest.raises(KeysError, match="duplicate"):
        save_keys(path, (new.record, new.record), PepperSource(path).read())
    assert path.read_bytes() == before


CREATOR = """
import sys, time
from datetime import UTC, datetime
from pathlib import Path
from lorafleet_server.tenants.keys import PepperSource, create_key

path, gate, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
(gate.parent / f"ready-{sys.argv[4]}").touch()  # imported and ready: the parent opens the gate once all are
while not gate.exists():
    time.sleep(0.001)
for _ in range(count):
    print(create_key(path, PepperSource(path), tenant="acme", role="tenant", now=datetime.now(UTC)).key, flush=True)
"""


def test_parallel_creates_from_several_processes_lose_no_key(tmp_path: Path) -> None:
    """Starting together on a file that does not exist yet: one pepper is created, every key is kept."""
    path = tmp_path / "keys.json"
    gate = tmp_path / "sync" / "go"
    gate.parent.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CREATOR, str(path), str(gate), "5", str(i)], stdout=subprocess.PIPE, text=True
        )
        for i in range(4)
    ]
    # all four start together however long their start-up takes on busy cores (a start 1.5 s ahead
    # could pass before they had imported, and the creates then ran one after another)
    deadline = time.monotonic() + 120
    while len(list(gate.parent.glob("ready-*"))) < 4:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a creator did not start"
        time.sleep(0.01)
    gate.touch()
    printed: list[str] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        printed += out.split()
    assert len(printed) == 20
    ring = load_keys(path, PepperSource(path).read())
    assert len(ring) == 20
    assert {ring.authenticate(key, datetime.now(UTC)).key_id for key in printed} == {r.key_id for r in ring.records}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_config_keys_file_default_flag_and_env(tmp_path: Path) -> None:
    assert parse_config([], environ={}).keys_path == Path("data/keys.json")
    assert parse_config(["--data-dir", str(tmp_path)], environ={}).keys_path == tmp_path / "keys.json"
    assert parse_config([], environ={"LORAFLEET_KEYS_FILE": "/etc/lf/keys.json"}).keys_path == Path("/etc/lf/keys.json")
    assert parse_config(["--keys-file", "k.json"], environ={"LORAFLEET_KEYS_FILE": "x"}).keys_path == Path("k.json")
