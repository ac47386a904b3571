"""The store gate: after the store failed to answer, its calls are refused at once for a while, then
one call at a time finds out whether it answers again."""

from __future__ import annotations

import pytest

from lorafleet_adapters.errors import AdapterNotFound, StoreUnavailable
from lorafleet_server.engine.store_gate import StoreGate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fail(gate: StoreGate) -> None:
    with pytest.raises(StoreUnavailable, match="timed out"), gate.call("read x"):
        raise StoreUnavailable("read timed out")


def test_refused_at_once_after_a_failure_then_one_probe_at_a_time() -> None:
    clock = Clock()
    gate = StoreGate(retry_seconds=5.0, clock=clock)
    with gate.call("read x"):
        pass
    fail(gate)
    assert gate.tripped
    ran = []
    with pytest.raises(
        StoreUnavailable,
        match=r"cannot read y: the adapter store did not answer \(read timed out\); tried again in 5.0s",
    ):
        with gate.call("read y"):
            ran.append("y")
    clock.now += 5.0
    probe = gate.call("read z")
    probe.__enter__()  # the probe is in flight: another call is refused meanwhile
    with pytest.raises(StoreUnavailable, match="another call is trying it now"), gate.call("read w"):
        ran.append("w")
    probe.__exit__(None, None, None)  # it got an answer: open again
    assert not gate.tripped and ran == []
    with gate.call("read v"):
        ran.append("v")
    assert ran == ["v"]


def test_a_probe_that_fails_closes_the_gate_again_and_any_answer_opens_it() -> None:
    clock = Clock()
    gate = StoreGate(retry_seconds=2.0, clock=clock)
    fail(gate)
    clock.now += 2.0
    fail(gate)  # the probe: still no answer
    with pytest.raises(StoreUnavailable, match=r"tried again in 2\.0s"), gate.call("read y"):
        pass
    clock.now += 2.0
    with pytest.raises(AdapterNotFound), gate.call("read y"):  # "not found" is the store answering
        raise AdapterNotFound("no such adapter")
    assert not gate.tripped
    fail(gate)
    gate.answered()  # the watcher's poll read the store
    assert not gate.tripped


def test_it_tells_the_metrics_of_each_unanswered_call_and_each_answer_not_of_its_own_refusals() -> None:
    told: list[str] = []
    clock = Clock()
    gate = StoreGate(
        retry_seconds=5.0, clock=clock, on_failed=lambda: told.append("failed"), on_answered=lambda: told.append("ok")
    )
    with gate.call("read x"):
        pass
    fail(gate)
    with pytest.raises(StoreUnavailable, match="tried again"), gate.call("read y"):
        pass  # refused by the gate: the store was not asked
    clock.now += 5.0
    with pytest.raises(KeyError), gate.call("read z"):  # the probe fails by the caller's own bug: no verdict
        raise KeyError("z")
    assert gate.tripped
    with pytest.raises(AdapterNotFound), gate.call("read w"):  # the next probe: the store answers
        raise AdapterNotFound("no w")
    assert told == ["ok", "failed", "ok"] and not gate.tripped


def test_only_the_probes_own_outcome_ends_it_and_a_cache_answer_is_no_verdict() -> None:
    """Found by an outside review: another call's failure (or the watcher's) freed a second probe while
    the first still waited; and a call answered from the store's own caches (an S3 store's known
    versions, manifests, disk cache) reopened the gate mid-outage and refreshed the "last answered"
    gauge. ``round_trips`` (the store's count of requests sent) tells the two apart."""
    clock, sent, told = Clock(), [0], []
    gate = StoreGate(retry_seconds=5.0, clock=clock, round_trips=lambda: sent[0], on_answered=lambda: told.append("ok"))
    with pytest.raises(StoreUnavailable), gate.call("read x"):
        sent[0] += 1
        raise StoreUnavailable("read timed out")
    clock.now += 5.0
    probe = gate.call("read y")
    probe.__enter__()
    gate.failed("the watcher's poll timed out")  # not the probe's outcome
    clock.now += 5.0
    with pytest.raises(StoreUnavailable, match="another call is trying it now"), gate.call("read z"):
        pass
    probe.__exit__(None, None, None)  # answered without a request sent: from a cache
    assert gate.tripped and told == []
    with gate.call("read w"):  # the next probe, answered by the store itself
        sent[0] += 1
    assert not gate.tripped and told == ["ok"]


def test_a_call_that_does_not_trip_closes_the_gate_only_as_its_probe() -> None:
    """Listings (``trips=False``): a failure while the gate is open is their own caller's (a tenant's
    folder that does not list), counted as unanswered but refusing nobody else; refused while it is
    closed; as the probe, their failure keeps it closed, as any probe's."""
    clock = Clock()
    unanswered: list[int] = []
    gate = StoreGate(retry_seconds=5.0, clock=clock, on_failed=lambda: unanswered.append(1))
    with pytest.raises(StoreUnavailable, match="timed out"), gate.call("list", trips=False):
        raise StoreUnavailable("list timed out")
    assert not gate.tripped and len(unanswered) == 1
    fail(gate)
    with pytest.raises(StoreUnavailable, match="did not answer"), gate.call("list", trips=False):
        pass
    clock.now += 5.0
    with pytest.raises(StoreUnavailable, match="timed out"), gate.call("list", trips=False):
        raise StoreUnavailable("list timed out")  # the probe
    assert gate.tripped
    with pytest.raises(StoreUnavailable, match=r"tried again in 5.0s"), gate.call("read x"):
        pass


def test_a_probe_that_reached_the_store_then_failed_locally_reopens_the_gate() -> None:
    """A probe whose request reached the store, then failed on this host (OSError: writing the disk cache
    on a full disk) is the store answering: the gate opens (a mutation that gave it no verdict survived;
    requests needing the store were refused as "did not answer" while it was healthy)."""
    clock, sent = Clock(), [0]
    gate = StoreGate(retry_seconds=5.0, clock=clock, round_trips=lambda: sent[0])
    with pytest.raises(StoreUnavailable), gate.call("read x"):
        sent[0] += 1
        raise StoreUnavailable("read timed out")
    clock.now += 5.0
    with pytest.raises(OSError, match="No space"), gate.call("read y"):
        sent[0] += 1
        raise OSError(28, "No space left on device")
    assert not gate.tripped
    with pytest.raises(StoreUnavailable), gate.call("read z"):  # the store stops answering again
        raise StoreUnavailable("read timed out")
    clock.now += 5.0
    with pytest.raises(OSError), gate.call("read w"):  # failed before any request: no verdict
        raise OSError(28, "No space left on device")
    assert gate.tripped
