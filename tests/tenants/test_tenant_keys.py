"""API keys in memory: the format, the HMAC, and every reason authentication refuses a key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest

from lorafleet_server.tenants.errors import (
    AuthenticationError,
    ExpiredKey,
    InvalidKeyRecord,
    MalformedKey,
    MissingKey,
    RevokedKey,
    UnknownKey,
    WrongKeyPrefix,
)
from lorafleet_server.tenants.keys import (
    KEY_CHARS,
    KeyRecord,
    KeyRing,
    format_key,
    format_timestamp,
    generate_key_id,
    generate_secret,
    hash_secret,
    parse_duration,
    parse_key,
    parse_timestamp,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
PEPPER = b"p" * 64


def make_key(pepper: bytes = PEPPER, **fields: object) -> tuple[str, KeyRecord]:
    key_id, secret = generate_key_id(), generate_secret()
    values: dict[str, object] = {"tenant": "acme", "role": "tenant", "created": NOW - timedelta(days=1)}
    values.update(fields)
    record = KeyRecord(key_id=key_id, secret_hmac=hash_secret(pepper, secret), **values)  # type: ignore[arg-type]
    return format_key(key_id, secret), record


def test_key_format_and_parse_round_trip() -> None:
    ids = {generate_key_id() for _ in range(200)}
    assert len(ids) == 200
    for _ in range(50):
        key_id, secret = generate_key_id(), generate_secret()
        assert len(key_id) == 12 and len(secret) == 32
        assert set(key_id + secret) <= set("abcdefghijklmnopqrstuvwxyz234567")
        key = format_key(key_id, secret)
        assert len(key) == KEY_CHARS and key.startswith("lf_") and key.count("_") == 2
        assert parse_key(key) == (key_id, secret)


@pytest.mark.parametrize(
    ("text", "error", "reason"),
    [
        (None, MissingKey, "missing"),
        ("", MissingKey, "missing"),
        ("sk_abcdefghijkl_" + "a" * 32, WrongKeyPrefix, "wrong_prefix"),
        ("Bearer lf_abcdefghijkl_" + "a" * 32, WrongKeyPrefix, "wrong_prefix"),
        ("LF_ABCDEFGHIJKL_" + "A" * 32, WrongKeyPrefix, "wrong_prefix"),
        ("lf_abcdefghijkl_" + "a" * 31, MalformedKey, "malformed"),  # too short
        ("lf_abcdefghijkl_" + "a" * 33, MalformedKey, "malformed"),  # too long
        ("lf_abcdefghijkl-" + "a" * 32, MalformedKey, "malformed"),  # no separator
        ("lf_abcdefghijk1_" + "a" * 32, MalformedKey, "malformed"),  # '1' is not base32
        ("lf_abcdefghijkl_" + "A" * 32, MalformedKey, "malformed"),  # upper case secret
        ("lf_abcdefghijkl_" + "a" * 30 + "_a", MalformedKey, "malformed"),  # '_' inside the secret
        ("lf_" + "x" * 10_000, MalformedKey, "malformed"),
    ],
)
def test_parse_errors_say_which_and_never_echo(text: str | None, error: type[AuthenticationError], reason: str) -> None:
    with pytest.raises(error) as caught:
        parse_key(text)
    assert caught.value.reason == reason
    assert isinstance(caught.value, AuthenticationError)
    if text:
        assert text not in str(caught.value)
        assert "a" * 16 not in str(caught.value) and "A" * 16 not in str(caught.value)


def test_only_the_hmac_is_kept_and_it_depends_on_the_pepper() -> None:
    key, record = make_key()
    _, secret = parse_key(key)
    assert secret not in repr(record) and record.secret_hmac not in repr(record)
    assert secret not in str(record.to_json())
    assert record.secret_hmac == hash_secret(PEPPER, secret) != hash_secret(b"q" * 64, secret)
    assert KeyRing((record,), PEPPER).authenticate(key, NOW) == record
    with pytest.raises(UnknownKey):  # the same secret under another pepper does not authenticate
        KeyRing((record,), b"q" * 64).authenticate(key, NOW)


def test_every_authenticate_failure_has_its_reason() -> None:
    good_key, good = make_key()
    revoked_key, revoked = make_key(revoked=NOW - timedelta(hours=1))
    expired_key, expired = make_key(expires=NOW - timedelta(seconds=1))
    ring = KeyRing((good, revoked, expired), PEPPER)
    assert ring.authenticate(good_key, NOW) is good
    unknown_id = format_key(generate_key_id(), generate_secret())
    wrong_secret = format_key(good.key_id, generate_secret())
    cases: list[tuple[str | None, type[AuthenticationError], str]] = [
        (None, MissingKey, "missing"),
        ("", MissingKey, "missing"),
        ("xx_" + good_key[3:], WrongKeyPrefix, "wrong_prefix"),
        (good_key[:-1], MalformedKey, "malformed"),
        (unknown_id, UnknownKey, "unknown_key"),
        (wrong_secret, UnknownKey, "unknown_key"),
        (revoked_key, RevokedKey, "revoked"),
        (expired_key, ExpiredKey, "expired"),
    ]
    for text, error, reason in cases:
        with pytest.raises(error) as caught:
            ring.authenticate(text, NOW)
        assert caught.value.reason == reason
        message = str(caught.value)
        if text:
            assert parse_secret_or_none(text) is None or parse_secret_or_none(text) not in message
            assert text not in message
    # Unknown id and wrong secret read the same, so a caller cannot probe which ids exist.
    with pytest.raises(UnknownKey) as a:
        ring.authenticate(unknown_id, NOW)
    with pytest.raises(UnknownKey) as b:
        ring.authenticate(wrong_secret, NOW)
    assert str(a.value) == str(b.value)
    assert b.value.key_id == good.key_id  # ... while the server's log can still name the id tried
    # Revoked or expired is only said to the holder of the secret.
    with pytest.raises(UnknownKey):
        ring.authenticate(format_key(revoked.key_id, generate_secret()), NOW)
    with pytest.raises(UnknownKey):
        ring.authenticate(format_key(expired.key_id, generate_secret()), NOW)


def parse_secret_or_none(text: str) -> str | None:
    try:
        return parse_key(text)[1]
    except AuthenticationError:
        return None


def test_expiry_boundary_and_revocation_wins() -> None:
    expires = NOW + timedelta(hours=1)
    key, record = make_key(expires=expires)
    ring = KeyRing((record,), PEPPER)
    assert ring.authenticate(key, expires - timedelta(microseconds=1)) is record
    with pytest.raises(ExpiredKey, match=format_timestamp(expires)):
        ring.authenticate(key, expires)
    both = dataclasses.replace(record, revoked=NOW)
    with pytest.raises(RevokedKey):
        KeyRing((both,), PEPPER).authenticate(key, expires + timedelta(days=1))
    assert both.status(NOW) == "revoked" and record.status(NOW) == "active" and record.status(expires) == "expired"


def test_a_tenants_limits_are_the_smallest_its_active_keys_set() -> None:
    """The engine counts a tenant's requests; the requesting key's own limit let a second key of the
    tenant (a rotation's new key, made without the flags) queue and run without any."""
    limited_key, limited = make_key(max_waiting=2, max_running=4)
    free_key, free = make_key()
    other_key, other = make_key(tenant="beta")
    old_key, old = make_key(max_running=1, revoked=NOW - timedelta(hours=1))  # revoked: no longer counts
    ring = KeyRing((limited, free, other, old), PEPPER)
    for key in (limited_key, free_key):
        got = ring.authenticate(key, NOW)
        assert (got.tenant, got.max_waiting, got.max_running) == ("acme", 2, 4)
    assert ring.authenticate(free_key, NOW).key_id == free.key_id
    assert (ring.authenticate(other_key, NOW).max_waiting, ring.authenticate(other_key, NOW).max_running) == (
        None,
        None,
    )
    assert old_key
    # Two keys that both set limits: the smaller of each applies (a mutation test found the loosest
    # could win unnoticed: only one key set limits above).
    tight_key, tight = make_key(max_waiting=5, max_running=1)
    ring = KeyRing((limited, tight), PEPPER)
    for key in (limited_key, tight_key):
        got = ring.authenticate(key, NOW)
        assert (got.max_waiting, got.max_running) == (2, 1)


def test_an_empty_ring_knows_no_key() -> None:
    with pytest.raises(UnknownKey):
        KeyRing().authenticate(format_key(generate_key_id(), generate_secret()), NOW)
    with pytest.raises(ValueError, match="timezone"):
        KeyRing().authenticate("lf_x", datetime(2026, 1, 1))


def test_duplicate_ids_are_refused() -> None:
    _, record = make_key()
    with pytest.raises(Exception, match="duplicate key id"):
        KeyRing((record, record), PEPPER)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tenant": "Acme"}, "tenant"),
        ({"tenant": ""}, "tenant"),
        ({"role": "root"}, "role"),
        ({"weight": 0}, "weight"),
        ({"weight": -1.5}, "weight"),
        ({"weight": float("inf")}, "weight"),
        ({"weight": True}, "weight"),
        ({"max_waiting": 0}, "max_waiting"),
        ({"max_running": -1}, "max_running"),
        ({"max_running": 2.5}, "max_running"),
        ({"created": datetime(2026, 1, 1)}, "created"),  # naive
        ({"expires": "2026-01-01T00:00:00Z"}, "expires"),
    ],
)
def test_record_fields_are_checked(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidKeyRecord) as caught:
        make_key(**fields)
    assert caught.value.field == field


def test_record_values_are_normalised() -> None:
    _, record = make_key(weight=2, created=datetime(2026, 12, 1, 13, 0, tzinfo=timezone(timedelta(hours=1))))
    assert record.weight == 2.0 and isinstance(record.weight, float)
    assert record.created == datetime(2026, 12, 1, 12, 0, tzinfo=UTC) and record.created.tzinfo is UTC
    assert "secret_hmac" not in record.describe(NOW)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("3600s", 3600), ("1s", 1)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0d", "-1d", "1.5h", "10", "d", "1w", "1 d", "99999999999d", "36501d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_timestamps() -> None:
    assert format_timestamp(NOW) == "2026-12-01T12:00:00Z"
    assert parse_timestamp("2026-12-01T13:00:00+01:00") == NOW
    assert parse_timestamp(format_timestamp(NOW + timedelta(microseconds=5))) == NOW + timedelta(microseconds=5)
    for bad in ("2026-12-01T12:00:00", "yesterday", "2026-13-01T00:00:00Z"):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


def test_the_keys_module_needs_neither_grpc_nor_torch() -> None:
    code = (
        "import sys, lorafleet_server.tenants.keys, lorafleet_server.tenants.errors\n"
        "bad = [m for m in ('grpc', 'torch', 'lorafleet_proto') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
