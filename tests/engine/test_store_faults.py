"""What the serving side does when the store on disk is not what a publish leaves behind.

The store itself never shows a reader a partial version or a partial ``latest`` (staging + rename,
temp file + replace). Other writers can (a copy into place, a crash mid-write, a damaged disk): the
version watcher and the tiers must neither serve such a version nor crash, and what happens to a
version damaged after it was loaded is defined here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from enginelib import generate, request, submit, tiny_service
from safetensors.torch import load_file, save_file

from lorafleet_adapters.errors import AdapterFormatError, AdapterIncompatible, AdapterNotFound, StoreUnavailable
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_adapters.ref import AdapterKey, AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.app import Service
from lorafleet_server.edge.status import status_for
from lorafleet_server.engine.admin import AdapterAdmin
from lorafleet_server.engine.stream import EngineStream

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def adapters(peft_adapter: Any) -> list[Path]:
    return [peft_adapter(seed=200 + i, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]) for i in range(3)]


@pytest.fixture
def service(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Service]:
    svc = tiny_service(tiny_model_dir, tmp_path / "store")
    yield svc
    svc.engine.shutdown(10)


def metric(svc: Service, name: str) -> float:
    return svc.metrics.registry.get_sample_value(name) or 0.0


def tokens(svc: Service, adapter: str) -> tuple[str, list[int]]:
    sink = generate(svc.engine, request(PROMPT, adapter=adapter, max_new_tokens=6))
    return sink.summary.adapter, sink.token_ids


def test_a_half_published_version_is_neither_served_nor_refused(
    service: Service, adapters: list[Path], tmp_path: Path
) -> None:
    spec = service.base.spec
    service.store.import_peft(adapters[0], "acme", "bot", spec)
    v1 = tokens(service, "acme/bot")
    assert v1[0] == "acme/bot@1"
    # A complete version 2 elsewhere, then copied into place the way a plain copy does it: the files
    # first, the manifest last, with `latest` already naming version 2.
    elsewhere = AdapterStore(tmp_path / "elsewhere")
    elsewhere.import_peft(adapters[0], "acme", "bot", spec)
    source = elsewhere.version_dir(elsewhere.import_peft(adapters[1], "acme", "bot", spec))
    target = service.store.root / "acme" / "bot" / "versions" / "2"
    target.mkdir()
    for path in source.iterdir():
        if path.name != "manifest.json":
            shutil.copy(path, target / path.name)
    (service.store.root / "acme" / "bot" / "latest").write_text("2\n")

    result = service.engine.adapters.versions.refresh()  # the poller's pass
    assert (result.swaps, result.failures) == ((), ())  # not a version yet: nothing to swap to, nothing refused
    assert tokens(service, "acme/bot") == v1
    with pytest.raises(AdapterNotFound):
        service.engine.submit(request(PROMPT, adapter="acme/bot@2"), lambda _e: None)
    assert metric(service, "lorafleet_adapter_swap_failures_total") == 0

    shutil.copy(source / "manifest.json", target / "manifest.json")  # the copy completes
    result = service.engine.adapters.versions.refresh()
    assert [(s.from_version, s.to_version) for s in result.swaps] == [(1, 2)]
    served, v2 = tokens(service, "acme/bot")
    assert served == "acme/bot@2" and v2 != v1[1]


@pytest.mark.parametrize("content", ["", "\n", "2\n\x00", "\x00\x00"])
def test_a_truncated_latest_pointer_keeps_the_served_version_and_crashes_nothing(
    service: Service, adapters: list[Path], content: str
) -> None:
    spec = service.base.spec
    service.store.import_peft(adapters[0], "acme", "bot", spec)
    service.store.import_peft(adapters[1], "acme", "bot", spec)
    served = tokens(service, "acme/bot")
    assert served[0] == "acme/bot@2"
    (service.store.root / "acme" / "bot" / "latest").write_text(content)  # a writer died mid-write

    result = service.engine.adapters.versions.refresh()  # the poller's pass: logs, moves nothing
    assert (result.swaps, result.failures) == ((), ())
    assert tokens(service, "acme/bot") == served
    # A name this server has not served yet cannot be resolved through the broken pointer: refused, not guessed.
    service.store.import_peft(adapters[2], "acme", "fresh", spec)
    (service.store.root / "acme" / "fresh" / "latest").write_text(content)
    with pytest.raises(AdapterNotFound, match="corrupt"):
        service.engine.submit(request(PROMPT, adapter="acme/fresh"), lambda _e: None)
    assert generate(service.engine, request(PROMPT, adapter="acme/fresh@1", max_new_tokens=2)).summary.adapter == (
        "acme/fresh@1"
    )
    # The next publish repairs the pointer (store.py) and the watcher moves on to it.
    assert service.store.import_peft(adapters[2], "acme", "bot", spec).version == 3
    result = service.engine.adapters.versions.refresh()
    assert [(s.adapter, s.from_version, s.to_version) for s in result.swaps] == [("acme/bot", 2, 3)]
    assert tokens(service, "acme/bot")[0] == "acme/bot@3"


def test_a_version_damaged_after_loading_keeps_serving_from_memory_and_is_refused_when_read_again(
    tiny_model_dir: Path, tmp_path: Path, adapters: list[Path], tiny_spec: Any
) -> None:
    """Defined behaviour: a version is verified when it is read from the store. What the tiers already
    hold keeps serving (it was verified, and versions are immutable); once it has left host memory,
    reading it again checks the files and refuses it (FAILED_PRECONDITION to clients)."""
    probe = AdapterStore(tmp_path / "probe")
    nbytes = probe.load(probe.import_peft(adapters[0], "acme", "x", tiny_spec), tiny_spec).nbytes
    # One device slot and host memory for one adapter: a second adapter pushes the first out of both.
    svc = tiny_service(tiny_model_dir, tmp_path / "store", max_loaded_adapters=1, host_cache_bytes=nbytes * 3 // 2)
    try:
        key = svc.store.import_peft(adapters[0], "acme", "bot", svc.base.spec)
        svc.store.import_peft(adapters[1], "acme", "other", svc.base.spec)
        before = tokens(svc, "acme/bot")
        weights = svc.store.version_dir(key) / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-64])  # damaged on disk

        assert tokens(svc, "acme/bot") == before  # the device slot still holds the verified weights
        assert svc.engine.run(lambda: svc.engine.adapters.unload(key)) is True  # off the device...
        assert tokens(svc, "acme/bot") == before  # ...back from host memory, not from the store
        assert tokens(svc, "acme/other")[0] == "acme/other@1"  # pushes bot out of the slot and host memory
        assert not svc.engine.adapters.on_host(key)
        assert svc.engine.run(svc.engine.adapters.slot_snapshot).keys() == {AdapterKey("acme", "other", 1)}

        failures = metric(svc, "lorafleet_adapter_load_failures_total")
        sink, _ = submit(svc.engine, request(PROMPT, adapter="acme/bot", max_new_tokens=6))
        with pytest.raises(AdapterFormatError, match="checksum mismatch"):
            sink.wait().summary  # noqa: B018
        assert metric(svc, "lorafleet_adapter_load_failures_total") == failures + 1
        with pytest.raises(AdapterFormatError, match="checksum mismatch"):
            svc.store.load(key, svc.base.spec)  # a fresh server reading the store refuses it too
        assert tokens(svc, "acme/other")[0] == "acme/other@1"  # the others are unaffected
    finally:
        svc.engine.shutdown(10)


def test_a_store_that_stops_answering_holds_only_the_requests_that_need_it(
    service: Service, adapters: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an outside review: with the S3 store stalled (it accepts connections, then sends
    nothing: ~47 s per call), a handful of requests for adapters the server did not hold took every
    thread that admits requests, and base-model requests and adapters at hand waited behind them.
    Now those requests wait on threads of their own, concurrent first uses of one name share one store
    read, and once the store has failed to answer the next ones are refused at once (UNAVAILABLE)."""
    spec = service.base.spec
    service.store.import_peft(adapters[0], "acme", "warm", spec)
    warm = tokens(service, "acme/warm")
    base = tokens(service, "")
    release = threading.Event()
    reads: Counter[str] = Counter()
    resolve, manifest = service.store.resolve, service.store.manifest

    def stalled(method: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def call(what: Any) -> Any:
            if "cold" not in str(what.name):
                return method(what)
            reads[str(what.name)] += 1
            assert release.wait(60), "never released"
            raise StoreUnavailable("adapter store s3://bucket: read timed out")

        return call

    monkeypatch.setattr(service.store, "resolve", stalled(resolve))
    monkeypatch.setattr(service.store, "manifest", stalled(manifest))
    stream = EngineStream(service.engine)

    async def text(req: Any) -> tuple[str, list[int]]:
        ids: list[int] = []
        adapter = ""
        async for event in stream.events(req):
            ids += event.token_ids
            adapter = event.summary.adapter if event.summary is not None else adapter
        return adapter, ids

    async def scenario() -> list[BaseException | None]:
        # More cold requests than any shared pool has threads (the event loop's has at most 32).
        cold = [
            asyncio.ensure_future(stream.submit(request(PROMPT, adapter=f"acme/cold{i // 2}", rid=f"c{i}")))
            for i in range(40)
        ]
        await asyncio.sleep(0.5)
        served = await asyncio.wait_for(
            asyncio.gather(
                text(request(PROMPT, max_new_tokens=6)), text(request(PROMPT, adapter="acme/warm", max_new_tokens=6))
            ),
            30,
        )
        assert served == [base, warm]  # while the cold ones still wait on the store
        assert not any(c.done() for c in cold)
        release.set()
        return await asyncio.wait_for(asyncio.gather(*cold, return_exceptions=True), 60)  # type: ignore[return-value]

    unanswered = metric(service, "lorafleet_adapter_store_unavailable_total")
    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
    assert metric(service, "lorafleet_adapter_store_unavailable_total") - unanswered == sum(reads.values())
    # the store pool's 4 threads took two requests of cold0 and two of cold1: one read each, then refused
    assert reads == Counter({"cold0": 1, "cold1": 1}), reads
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="did not answer"):
        service.engine.submit(request(PROMPT, adapter="acme/cold99"), lambda _e: None)
    assert time.monotonic() - started < 1.0 and "cold99" not in reads
    assert tokens(service, "acme/warm") == warm  # what is at hand keeps serving, by name and by number
    assert service.engine.adapters.gate.tripped and tokens(service, "acme/warm@1") == warm


def test_a_name_first_used_after_a_version_this_server_cannot_serve_takes_the_one_before(
    service: Service, adapters: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an outside review: mid-upgrade, version 2 is built for another base. Replicas that
    served version 1 refuse it and keep 1; one that first served the name after the publish (restarted,
    scaled out) took the store's latest unchecked and answered every request with version 2's error.
    Now a first use takes the newest version this server can serve, and the next poll keeps it."""
    spec = service.base.spec
    service.store.import_peft(adapters[0], "acme", "bot", spec)
    other_base = dataclasses.replace(spec, fingerprint="sha256:" + "1" * 64)
    service.store.import_peft(adapters[1], "acme", "bot", other_base)
    failures = metric(service, "lorafleet_adapter_swap_failures_total")
    assert tokens(service, "acme/bot")[0] == "acme/bot@1"
    assert metric(service, "lorafleet_adapter_swap_failures_total") == failures + 1  # reported once
    result = service.engine.adapters.versions.refresh()
    assert (result.swaps, result.failures) == ((), ())  # refused already: not tried again
    assert tokens(service, "acme/bot")[0] == "acme/bot@1"
    sink, _ = submit(service.engine, request(PROMPT, adapter="acme/bot@2"))
    with pytest.raises(AdapterIncompatible, match="was built for base"):  # asked for by number: its error
        sink.wait().summary  # noqa: B018
    service.store.import_peft(adapters[2], "acme", "bot", spec)  # the next good publish is swapped to
    result = service.engine.adapters.versions.refresh()
    assert [(s.from_version, s.to_version) for s in result.swaps] == [(1, 3)]
    # A name with no version this server can serve is refused with the latest's error, from memory for
    # a few seconds (each request read its pointer and listed its versions).
    service.store.import_peft(adapters[0], "acme", "alien", other_base)
    reads: list[str] = []
    resolve = service.store.resolve
    monkeypatch.setattr(service.store, "resolve", lambda ref: (reads.append(str(ref)), resolve(ref))[1])
    for _ in range(3):
        with pytest.raises(AdapterIncompatible, match="alien@1 was built for base"):
            service.engine.submit(request(PROMPT, adapter="acme/alien"), lambda _e: None)
    assert reads == ["acme/alien"]
    # A prompt adapter's newest version whose template leaves no room in the context is passed over too.
    service.store.publish_prompt("acme", "brief", PromptTemplate("Be brief."), spec)
    service.store.publish_prompt("acme", "brief", PromptTemplate("word " * 300), spec)
    assert tokens(service, "acme/brief")[0] == "acme/brief@1"
    # Of several servable versions before the refused latest, the newest (a mutation test found the
    # oldest could be taken unnoticed: above, one version stood before it).
    for text in ("One.", "Two.", "word " * 300):
        service.store.publish_prompt("acme", "terse", PromptTemplate(text), spec)
    assert tokens(service, "acme/terse")[0] == "acme/terse@2"


def test_one_version_that_does_not_read_leaves_every_other_in_the_listing(
    service: Service, adapters: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Found by an outside review: a manifest that does not read (damaged, or a newer lorafleet's field
    mid-upgrade) made ListAdapters and GET /v1/models fail for every adapter of every tenant."""
    spec = service.base.spec
    service.store.import_peft(adapters[0], "acme", "faq", spec)
    service.store.import_peft(adapters[0], "zeta", "old", spec)
    service.store.import_peft(adapters[1], "zeta", "old", spec)
    manifest = service.store.version_dir(AdapterKey("zeta", "old", 1)) / "manifest.json"
    manifest.write_text(manifest.read_text().replace("{", '{"future_field": 1, ', 1))
    admin = AdapterAdmin(service.engine)
    listed = {(v.tenant, v.name): [x.version for x in v.versions] for v in admin.list("")}
    assert listed == {("acme", "faq"): [1], ("zeta", "old"): [2]}
    assert "zeta/old@1" in caplog.text and "future_field" in caplog.text
    assert [x.version for x in admin.get("zeta/old").versions] == [2]


def test_an_adapter_whose_weights_overflow_fails_its_own_requests_with_its_name(
    service: Service, adapters: list[Path], tmp_path: Path
) -> None:
    """Found by an outside review: finite but huge weights (1e30) pass every check, then make the logits
    NaN; the request failed as INTERNAL (a server bug to alerts and callers). Now FAILED_PRECONDITION
    naming the adapter; a base request beside it is unaffected."""
    hostile = tmp_path / "hostile"
    shutil.copytree(adapters[0], hostile)
    weights = hostile / "adapter_model.safetensors"
    tensors = {name: torch.full_like(t, 1e30) for name, t in load_file(weights).items()}
    save_file(tensors, weights)
    service.store.import_peft(hostile, "evil", "nan", service.base.spec)  # finite: accepted
    bad, _ = submit(service.engine, request(PROMPT, adapter="evil/nan", rid="bad"))
    good, _ = submit(service.engine, request(PROMPT, rid="good"))
    assert good.wait().summary.finish_reason is not None
    with pytest.raises(AdapterIncompatible, match=r"evil/nan@1 drove the model's output to NaN") as refused:
        bad.wait().summary  # noqa: B018
    assert status_for(refused.value) == grpc.StatusCode.FAILED_PRECONDITION


def test_listings_are_refused_at_once_while_the_store_does_not_answer(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an outside review: the listings behind /v1/models and ListAdapters went around the store
    gate, so each one held a thread of the event loop's shared pool for the whole timeout, all through
    an outage. They pass the gate: once a read has found the store not answering they are refused at
    once, and the first that gets an answer later opens it again. A listing's own failure does not
    close it for everyone (a second review: one tenant's folder that would not list refused every
    other tenant's reads for 5 s)."""
    manager = service.engine.adapters
    calls: Counter[str] = Counter()
    down = True
    listing, versions, resolve = service.store.list, service.store.versions, service.store.resolve

    def stalled(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            if down:
                raise StoreUnavailable("adapter store s3://bucket: read timed out")
            return method(*args, **kwargs)

        return call

    monkeypatch.setattr(service.store, "list", stalled("list", listing))
    monkeypatch.setattr(service.store, "versions", stalled("versions", versions))
    monkeypatch.setattr(service.store, "resolve", stalled("resolve", resolve))
    ref = AdapterRef("acme", "gone")
    for call in (manager.list_store, lambda: manager.store_versions(ref)):
        with pytest.raises(StoreUnavailable, match="timed out"):
            call()
    assert not manager.gate.tripped  # a listing's failure is its caller's, not every read's
    with pytest.raises(StoreUnavailable, match="timed out"):
        manager.store_latest(ref)  # a read: the store does not answer
    assert manager.gate.tripped
    for call in (manager.list_store, lambda: manager.store_versions(ref), lambda: manager.store_latest(ref)):
        with pytest.raises(StoreUnavailable, match="did not answer"):
            call()
    assert calls == Counter({"list": 1, "versions": 1, "resolve": 1})
    down = False
    monkeypatch.setattr(manager.gate, "_closed_until", time.monotonic() - 1)  # its retry time has come
    assert manager.list_store() == [] and not manager.gate.tripped  # the listing probes, and opens it
    assert manager.store_versions(ref) == ()
