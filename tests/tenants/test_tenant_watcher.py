"""KeyFileWatcher: a changed file is picked up, a broken one keeps the last good keys."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lorafleet_server.tenants.errors import RevokedKey, UnknownKey
from lorafleet_server.tenants.keys import KeyFileWatcher, PepperSource, create_key, parse_key, revoke_key

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
LOGGER = "lorafleet_server.tenants.keys"


class Reloads:
    def __init__(self) -> None:
        self.seen: list[bool] = []
        self._lock = threading.Lock()

    def __call__(self, ok: bool) -> None:
        with self._lock:
            self.seen.append(ok)


def test_new_keys_work_after_a_change_and_revoked_ones_stop(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    source = PepperSource(path)
    reloads = Reloads()
    watcher = KeyFileWatcher(path, source, reloads)
    assert watcher.poll() is True  # no file yet: no keys
    assert len(watcher.ring) == 0 and reloads.seen == [True]
    assert watcher.poll() is False  # nothing changed: nothing read, nothing reported
    first = create_key(path, source, tenant="acme", role="tenant", now=NOW)
    with pytest.raises(UnknownKey):
        watcher.authenticate(first.key, NOW)  # not polled yet
    assert watcher.poll() is True
    assert watcher.authenticate(first.key, NOW).tenant == "acme"
    second = create_key(path, source, tenant="beta", role="admin", now=NOW)
    assert watcher.poll() is True
    assert watcher.authenticate(second.key, NOW).role == "admin"
    revoke_key(path, first.record.key_id, NOW + timedelta(minutes=1))
    assert watcher.poll() is True
    with pytest.raises(RevokedKey):
        watcher.authenticate(first.key, NOW + timedelta(minutes=2))
    assert watcher.authenticate(second.key, NOW).tenant == "beta"
    assert reloads.seen == [True, True, True, True]
    path.unlink()  # a missing file means no keys
    assert watcher.poll() is True
    with pytest.raises(UnknownKey):
        watcher.authenticate(second.key, NOW)


def test_a_broken_file_keeps_the_last_good_ring(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.json"
    source = PepperSource(path)
    new = create_key(path, source, tenant="acme", role="tenant", now=NOW)
    _, secret = parse_key(new.key)
    reloads = Reloads()
    watcher = KeyFileWatcher(path, source, reloads)
    watcher.poll()
    good = watcher.ring
    text = path.read_text()
    path.write_text(text.replace('"role": "tenant"', '"role": "root"'))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert watcher.poll() is False
        assert watcher.poll() is False  # the same broken file is reported once
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "keys[0]" in message and "'role'" in message and "last good keys (1)" in message
    assert secret not in caplog.text and new.key not in caplog.text and new.record.secret_hmac not in caplog.text
    assert reloads.seen == [True, False]
    assert watcher.ring is good
    assert watcher.authenticate(new.key, NOW).tenant == "acme"  # still served from the last good ring
    path.write_text("{ not json")
    assert watcher.poll() is False and reloads.seen == [True, False, False]
    path.write_text(text)  # fixed: loads again
    assert watcher.poll() is True and reloads.seen == [True, False, False, True]
    assert watcher.authenticate(new.key, NOW).tenant == "acme"


def test_a_missing_or_changed_pepper_keeps_the_last_good_ring(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    source = PepperSource(path)
    new = create_key(path, source, tenant="acme", role="tenant", now=NOW)
    reloads = Reloads()
    watcher = KeyFileWatcher(path, source, reloads)
    watcher.poll()
    pepper = source.path.read_text()
    source.path.unlink()
    assert watcher.poll() is False
    source.path.write_text("f" * 64 + "\n")  # another pepper: the file's pepper id does not match
    assert watcher.poll() is False
    assert watcher.authenticate(new.key, NOW).tenant == "acme"
    source.path.write_text(pepper)
    assert watcher.poll() is True
    assert reloads.seen == [True, False, False, True]


def test_the_background_thread_picks_up_changes(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    source = PepperSource(path)
    watcher = KeyFileWatcher(path, source)
    others = set(threading.enumerate())  # a running server (a session-scoped e2e one) has its own watcher
    watcher.start(poll_seconds=0.02)
    try:
        with pytest.raises(RuntimeError, match="already running"):
            watcher.start(0.02)
        new = create_key(path, source, tenant="acme", role="tenant", now=NOW)
        deadline = time.monotonic() + 10
        while watcher.ring.get(new.record.key_id) is None:
            assert time.monotonic() < deadline, "the watcher never loaded the new key"
            time.sleep(0.01)
        assert watcher.authenticate(new.key, NOW).tenant == "acme"
    finally:
        watcher.stop()
    assert not [t for t in threading.enumerate() if t.name == "keys-watch" and t not in others]
    with pytest.raises(ValueError, match="poll_seconds"):
        watcher.start(0)


def test_start_loads_before_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    source = PepperSource(path)
    new = create_key(path, source, tenant="acme", role="tenant", now=NOW)
    watcher = KeyFileWatcher(path, source)
    watcher.start(poll_seconds=3600)
    try:
        assert watcher.authenticate(new.key, NOW).tenant == "acme"
    finally:
        watcher.stop()


def test_a_revocation_is_applied_even_when_the_reload_fails(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`keys revoke` needs no pepper, so an emergency revocation can be written while the pepper is
    missing (or replaced): the reload then failed and the revoked key kept working, the only sign an
    ERROR line. Taking access away needs no pepper to apply either."""
    path = tmp_path / "keys.json"
    source = PepperSource(path)
    leaked = create_key(path, source, tenant="acme", role="admin", now=NOW)
    other = create_key(path, source, tenant="beta", role="tenant", now=NOW)
    watcher = KeyFileWatcher(path, source)
    watcher.poll()
    source.path.unlink()  # the pepper is gone
    revoke_key(path, leaked.record.key_id, NOW + timedelta(minutes=1))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert watcher.poll() is False  # not reloaded: no pepper
    with pytest.raises(RevokedKey):
        watcher.authenticate(leaked.key, NOW + timedelta(minutes=2))
    assert watcher.authenticate(other.key, NOW).tenant == "beta"  # the rest stays as it was
    assert leaked.record.key_id in caplog.text and "takes access away" in caplog.text


def test_an_expiry_moved_sooner_applies_when_the_reload_fails_and_one_moved_later_does_not(tmp_path: Path) -> None:
    """What a mutation review found no test held: the failed reload's narrowing compares expiries, and
    only the sooner one takes access away (a later one is an extension: it waits for a good load)."""
    import json

    from lorafleet_server.tenants.errors import ExpiredKey
    from lorafleet_server.tenants.keys import format_timestamp

    path = tmp_path / "keys.json"
    source = PepperSource(path)
    sooner = create_key(path, source, tenant="acme", role="tenant", now=NOW, expires=NOW + timedelta(days=30))
    later = create_key(path, source, tenant="beta", role="tenant", now=NOW, expires=NOW + timedelta(days=30))
    watcher = KeyFileWatcher(path, source)
    watcher.poll()
    source.path.unlink()  # the pepper is gone: the next reload fails
    doc = json.loads(path.read_text())
    for entry in doc["keys"]:
        days = {sooner.record.key_id: timedelta(hours=1), later.record.key_id: timedelta(days=60)}[entry["id"]]
        entry["expires"] = format_timestamp(NOW + days)
    path.write_text(json.dumps(doc))
    assert watcher.poll() is False
    with pytest.raises(ExpiredKey):
        watcher.authenticate(sooner.key, NOW + timedelta(hours=2))
    with pytest.raises(ExpiredKey):  # still its old expiry, not the file's later one
        watcher.authenticate(later.key, NOW + timedelta(days=31))
    assert watcher.authenticate(later.key, NOW + timedelta(days=29)).tenant == "beta"


def test_a_read_that_fails_is_tried_again_at_the_next_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A read the system failed (too many open files) marked the file as seen: a revocation in it
    waited for the file's next change."""
    path = tmp_path / "keys.json"
    source = PepperSource(path)
    key = create_key(path, source, tenant="acme", role="tenant", now=NOW)
    watcher = KeyFileWatcher(path, source)
    watcher.poll()
    revoke_key(path, key.record.key_id, NOW + timedelta(minutes=1))
    real_open = Path.open
    failures = [OSError(24, "Too many open files")] * 3  # two polls: a load each, and a read for revocations

    def flaky_open(self: Path, *args: object, **kwargs: object) -> object:
        if self == path and failures:
            raise failures.pop()
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", flaky_open)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert watcher.poll() is False
        assert watcher.poll() is False
    assert caplog.text.count("Too many open files") == 1  # reported once
    assert watcher.poll() is True  # the third read works: the file had not changed meanwhile
    with pytest.raises(RevokedKey):
        watcher.authenticate(key.key, NOW + timedelta(minutes=2))


def test_a_placeholder_keys_file_locks_nobody_out(tmp_path: Path) -> None:
    """A keys file replaced by an empty placeholder (a deployment's example Secret applied over the
    real one) does not load with the real pepper gone: the last good keys stay, none taken away."""
    path = tmp_path / "keys.json"
    source = PepperSource(path)
    key = create_key(path, source, tenant="acme", role="tenant", now=NOW)
    watcher = KeyFileWatcher(path, source)
    watcher.poll()
    path.write_text('{"version": 1, "pepper_id": null, "keys": []}')
    source.path.write_text("REPLACE_ME")
    assert watcher.poll() is False
    assert watcher.authenticate(key.key, NOW).tenant == "acme"


def test_loose_file_modes_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A pepper anyone may read lets a local user forge keys; a keys file others may write lets a tenant
    make its key an admin's. Both are written 0600; nothing said when a copy widened them."""
    path = tmp_path / "keys.json"
    source = PepperSource(path)
    create_key(path, source, tenant="acme", role="tenant", now=NOW)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        KeyFileWatcher(path, source).poll()
    assert "chmod 600" not in caplog.text
    path.chmod(0o666)
    source.path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        KeyFileWatcher(path, source).poll()
    assert f"{path} (mode 0666)" in caplog.text and f"{source.path} (mode 0644)" in caplog.text
    # Each loose bit on its own: group write of the keys file; group write of the pepper. Group read
    # of the pepper is fine (a Kubernetes fsGroup makes a 0400 Secret 0440).
    for keys_mode, pepper_mode, warned in ((0o620, 0o600, path), (0o600, 0o660, source.path), (0o600, 0o640, None)):
        path.chmod(keys_mode)
        source.path.chmod(pepper_mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            KeyFileWatcher(path, source).poll()
        assert ("chmod 600" in caplog.text) is (warned is not None), (oct(keys_mode), oct(pepper_mode), caplog.text)
        if warned is not None:
            assert f"{warned} (mode" in caplog.text
