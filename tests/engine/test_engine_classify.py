"""Classify in the engine on the tiny model: a head on pooled features, batched, through a LoRA, wrong kinds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from classifierlib import labelled_rows, train_head, write_labelled
from enginelib import engine_held, request, submit, tiny_service
from transformers import AutoTokenizer

from lorafleet_adapters.errors import AdapterFormatError, AdapterIncompatible
from lorafleet_adapters.head import ClassifierHead, publish_head
from lorafleet_adapters.peft_format import BaseModelSpec
from lorafleet_adapters.prompt import PromptTemplate
from lorafleet_adapters.ref import AdapterRef
from lorafleet_adapters.store import AdapterStore
from lorafleet_server.app import Service
from lorafleet_server.engine.types import ChatTurn, ClassifyParams, GenerationRequest
from lorafleet_server.errors import WrongAdapterKind
from lorafleet_training.classifier import load_feature_model, pooled_features
from lorafleet_training.data import Example, Turn
from lorafleet_training.encoding import pad_id_of, prompt_ids
from lorafleet_training.publish import publish

TEXTS = (
    "Question about my refund and the invoice, please help",
    "Where is my parcel? The courier never came",
    "I cannot login, my password is locked",
    "The delivery box arrived broken",
)


@pytest.fixture(scope="module")
def published(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_spec: BaseModelSpec, peft_adapter: Any
) -> dict[str, Any]:
    """A store with a head on the base, a LoRA, a head on that LoRA's features and a prompt adapter."""
    root = tmp_path_factory.mktemp("classify")
    store = AdapterStore(root / "store")
    data = write_labelled(root / "intents.jsonl", labelled_rows(6))
    base_head = train_head(tiny_model_dir, tiny_spec, root / "head", data)
    publish(root / "head", store, tiny_spec)
    lora_dir = peft_adapter(seed=7, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    lora_key = store.import_peft(lora_dir, "acme", "support", tiny_spec)
    lora_head = train_head(
        tiny_model_dir,
        tiny_spec,
        root / "lora-head",
        data,
        adapter="acme/routed",
        features_from="acme/support",
        store=store,
    )
    publish(root / "lora-head", store, tiny_spec)
    store.publish_prompt("acme", "terse", PromptTemplate(system="Be terse."), tiny_spec)
    return {
        "store": store.root,
        "head": base_head.head,
        "lora_head": lora_head.head,
        "lora_dir": store.version_dir(lora_key),
    }


@pytest.fixture
def service(tiny_model_dir: Path, published: dict[str, Any]) -> Iterator[Service]:
    svc = tiny_service(tiny_model_dir, published["store"])
    yield svc
    svc.engine.shutdown(10)


def classify(text: str, adapter: str, top_k: int = 0, rid: str = "c") -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt=text,
        adapter=AdapterRef.parse(adapter),
        embed=True,
        classify=ClassifyParams(top_k=top_k),
    )


def reference_probs(
    model_dir: Path, head: ClassifierHead, texts: tuple[str, ...], lora_dir: Path | None
) -> torch.Tensor:
    """What training computes for these texts: HF (+PEFT) features -> the head. [texts, labels]"""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_feature_model(model_dir, lora_dir)
    ids = [prompt_ids(tokenizer, Example(line=1, completion="x", prompt=t)) for t in texts]
    return head.probabilities(pooled_features(model, ids, pad_id_of(tokenizer)))


@pytest.mark.parametrize("which", ["head", "lora_head"])
def test_classify_batch_equals_training_features(
    service: Service, tiny_model_dir: Path, published: dict[str, Any], which: str
) -> None:
    """Rows scored in one step give the probabilities training computes with HF (+PEFT) features."""
    adapter = "acme/intents" if which == "head" else "acme/routed"
    head: ClassifierHead = published[which]
    with engine_held(service.engine):  # all four start together and finish in one step
        sinks = [submit(service.engine, classify(t, adapter, rid=f"c{i}"))[0] for i, t in enumerate(TEXTS)]
    events = [s.wait().events[-1] for s in sinks]
    expected = reference_probs(tiny_model_dir, head, TEXTS, published["lora_dir"] if which == "lora_head" else None)
    for event, want in zip(events, expected, strict=True):
        assert event.error is None and event.labels is not None and event.summary is not None
        assert event.summary.adapter == f"{adapter}@1"
        got = {s.label: s.probability for s in event.labels}
        assert set(got) == set(head.labels)
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-5)
        probs = [s.probability for s in event.labels]
        assert probs == sorted(probs, reverse=True)
        for label, p in zip(head.labels, want.tolist(), strict=True):
            assert got[label] == pytest.approx(p, abs=2e-4)


def test_lora_features_differ_from_base_features(tiny_model_dir: Path, published: dict[str, Any]) -> None:
    """The LoRA head really reads the LoRA's features (else the test above could not tell them apart)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [prompt_ids(tokenizer, Example(line=1, completion="x", prompt=TEXTS[0]))]
    on_lora = pooled_features(load_feature_model(tiny_model_dir, published["lora_dir"]), ids, pad_id_of(tokenizer))
    on_base = pooled_features(load_feature_model(tiny_model_dir, None), ids, pad_id_of(tokenizer))
    assert (on_lora - on_base).abs().max() > 1e-2


def test_top_k_and_chat_messages(service: Service) -> None:
    req = GenerationRequest(
        request_id="m",
        messages=(ChatTurn("user", TEXTS[1]),),
        adapter=AdapterRef.parse("acme/intents"),
        embed=True,
        classify=ClassifyParams(top_k=2),
    )
    event = submit(service.engine, req)[0].wait().events[-1]
    assert event.labels is not None and len(event.labels) == 2


def test_wrong_adapter_kinds_are_refused_naming_the_kind(service: Service) -> None:
    with pytest.raises(WrongAdapterKind, match=r"kind 'head'.*call Classify"):
        service.engine.submit(request("hi", adapter="acme/intents"), lambda _e: None)
    with pytest.raises(WrongAdapterKind, match=r"kind 'head'.*Embed"):
        service.engine.submit(request("hi", adapter="acme/intents", embed=True), lambda _e: None)
    with pytest.raises(WrongAdapterKind, match=r"kind 'lora'.*Classify takes a 'head'"):
        service.engine.submit(classify("hi", "acme/support"), lambda _e: None)
    with pytest.raises(WrongAdapterKind, match="kind 'prompt'"):
        service.engine.submit(classify("hi", "acme/terse"), lambda _e: None)


def test_head_of_another_tenants_lora_is_refused_at_publish(
    published: dict[str, Any], tiny_spec: BaseModelSpec
) -> None:
    head: ClassifierHead = published["lora_head"]
    with pytest.raises(AdapterFormatError, match="another tenant"):
        publish_head(AdapterStore(published["store"]), "zeta", "stolen", head, tiny_spec)


def test_a_head_reads_features_of_a_lora_only(
    published: dict[str, Any], tiny_spec: BaseModelSpec, service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """features_from naming a head (or the head itself) is refused at publish; one planted in the store
    is refused by the server's check, which recursed without end on a head naming itself."""
    store = AdapterStore(published["store"])
    head: ClassifierHead = published["lora_head"]
    itself = store.resolve(AdapterRef("acme", "routed"))
    with pytest.raises(AdapterFormatError, match=r"features_from acme/routed@1 is a head, not a LoRA adapter"):
        publish_head(store, "acme", "chained", replace(head, features_from=itself), tiny_spec)
    manager = service.engine.adapters
    monkeypatch.setattr(manager, "head", lambda _key, *_: replace(head, features_from=itself))
    with pytest.raises(AdapterFormatError, match="is a head, not a LoRA"):
        manager.verify(itself)


def test_example_turns_encode_like_the_server(service: Service, tiny_model_dir: Path) -> None:
    """Training encodes a chat example exactly as the engine encodes a Classify request's messages."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = Example(line=1, completion="x", turns=(Turn("user", TEXTS[0]),))
    assert prompt_ids(tokenizer, example) == service.engine.encode_prompt(None, (ChatTurn("user", TEXTS[0]),))


def test_a_head_of_another_hidden_size_is_refused_at_publish_and_by_the_watcher(
    tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec, published: dict[str, Any]
) -> None:
    """Found by an outside review: a head reading 32 features on a 64-wide base passed every check, so
    the watcher swapped a working head's name to it and every Classify of the name failed."""
    good: ClassifierHead = published["head"]
    assert tiny_spec.hidden_size == good.hidden_size
    narrow = ClassifierHead(good.labels, torch.randn(len(good.labels), 32), torch.zeros(len(good.labels)))
    store = AdapterStore(tmp_path / "store")
    publish_head(store, "acme", "intent", good, tiny_spec)
    with pytest.raises(AdapterIncompatible, match="reads 32 features; this base has hidden size"):
        publish_head(store, "acme", "intent", narrow, tiny_spec)
    svc = tiny_service(tiny_model_dir, store.root)
    try:
        before = submit(svc.engine, classify(TEXTS[0], "acme/intent"))[0].wait().summary
        no_shapes = replace(tiny_spec, target_shapes={})  # a publisher that could not tell: planted as version 2
        publish_head(store, "acme", "intent", narrow, no_shapes)
        result = svc.engine.adapters.refresh()
        assert not result.swaps and [f.version for f in result.failures] == [2]
        after = submit(svc.engine, classify(TEXTS[0], "acme/intent"))[0].wait().summary
        assert after.adapter == before.adapter == "acme/intent@1"
    finally:
        svc.engine.shutdown(10)


def test_a_head_is_fitted_on_the_features_of_the_quantized_base_it_is_served_on(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Found by an outside review: heads were fitted on unquantized fp32 features whatever the base was
    served as; under NF4 (CUDA's default) a head flipped 24 of its 136 training answers. Training now
    computes features in the served precision and records it; the engine serves exactly that head."""
    from lorafleet_server.model.loader import base_spec_from_files
    from lorafleet_training.classifier import feature_precision, fit_head, load_labelled
    from lorafleet_training.encoding import all_prompt_ids

    spec = base_spec_from_files(tiny_model_dir, "nf4", max_lora_rank=32)
    store = AdapterStore(tmp_path / "store")
    data = write_labelled(tmp_path / "intents.jsonl", labelled_rows(6))
    trained = train_head(tiny_model_dir, spec, tmp_path / "head", data, eval_data=data)  # all of it trains
    assert trained.record["base"]["features"] == {"quantization": "nf4", "dtype": "float32"}
    publish(tmp_path / "head", store, spec)
    svc = tiny_service(tiny_model_dir, store.root, quantization="nf4")
    try:
        assert svc.base.spec.quantization == "nf4"
        with engine_held(svc.engine):
            sinks = [submit(svc.engine, classify(t, "acme/intents", rid=f"q{i}"))[0] for i, t in enumerate(TEXTS)]
        events = [s.wait().events[-1] for s in sinks]
    finally:
        svc.engine.shutdown(10)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [prompt_ids(tokenizer, Example(line=1, completion="x", prompt=t)) for t in TEXTS]
    precision = feature_precision(tiny_model_dir, spec, "cpu", "float32")
    quantized = pooled_features(load_feature_model(tiny_model_dir, None, precision), ids, pad_id_of(tokenizer))
    unquantized = pooled_features(load_feature_model(tiny_model_dir, None), ids, pad_id_of(tokenizer))
    assert (quantized - unquantized).abs().max() > 1e-2  # NF4's features are not fp32's: the test can tell
    head: ClassifierHead = trained.head
    # the head is the fit of NF4 features (fit_head is deterministic): refit on them, same weights
    examples = load_labelled(data)
    features = pooled_features(
        load_feature_model(tiny_model_dir, None, precision), all_prompt_ids(tokenizer, examples), pad_id_of(tokenizer)
    )
    refit = fit_head(features, [e.completion for e in examples], list(head.labels), 1.0, 2000, 1)
    assert torch.equal(refit.weight, head.weight) and torch.equal(refit.bias, head.bias)
    for event, want in zip(events, head.probabilities(quantized).tolist(), strict=True):
        assert event.error is None and event.labels is not None
        got = {s.label: s.probability for s in event.labels}
        for label, p in zip(head.labels, want, strict=True):
            assert got[label] == pytest.approx(p, abs=2e-4)


def test_a_head_fitted_on_another_quantization_is_refused_at_publish_and_by_the_server(
    tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec
) -> None:
    """An unquantized head in a store an NF4 base serves (or the reverse) would serve other features
    than it was fitted on: publish refuses it, and a server refuses a version whose manifest says so
    (one published before the check, or by hand); `adapters stale` lists it for retraining."""
    from lorafleet_adapters.manifest import built_for, check_servable
    from lorafleet_training.publish import stale

    data = write_labelled(tmp_path / "intents.jsonl", labelled_rows(4))
    train_head(tiny_model_dir, tiny_spec, tmp_path / "head", data)
    store = AdapterStore(tmp_path / "store")
    nf4 = replace(tiny_spec, quantization="nf4")
    with pytest.raises(AdapterIncompatible, match=r"features of a none base.*--quantization nf4"):
        publish(tmp_path / "head", store, nf4)
    key = publish(tmp_path / "head", store, tiny_spec)
    manifest = store.manifest(key)
    assert built_for(manifest, tiny_spec) and not built_for(manifest, nf4)
    with pytest.raises(AdapterIncompatible, match="features of the none base; this server's base is nf4"):
        check_servable(key, manifest, nf4)
    assert stale(store, nf4) == ([(key, "quantization none (this base: nf4)")], [])


def test_a_head_trained_before_features_were_recorded_counts_as_unquantized(
    tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec
) -> None:
    """Before training computed features as the server does, it always used the unquantized base, while
    the manifest recorded the publishing base's quantization: such a head in an NF4 store was served
    on NF4 features, undetected (the diff review). Its record has no `features`: publish reads that as
    unquantized, and `adapters stale` / `retrain --stale` list the published version by its record."""
    from lorafleet_adapters.manifest import check_servable
    from lorafleet_training.publish import RECORD_FILE, read_training_record, stale
    from lorafleet_training.retrain import stale_latest

    data = write_labelled(tmp_path / "intents.jsonl", labelled_rows(4))
    nf4 = replace(tiny_spec, quantization="nf4")
    train_head(tiny_model_dir, tiny_spec, tmp_path / "head", data)
    record = read_training_record(tmp_path / "head")
    del record["base"]["features"]  # as a record written before the field
    (tmp_path / "head" / RECORD_FILE).write_text(json.dumps(record))
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(AdapterIncompatible, match="features of a none base, and this command's base is nf4"):
        publish(tmp_path / "head", store, nf4)
    # published as before the check (the manifest takes the publishing base's quantization)
    head = ClassifierHead.read(tmp_path / "head")
    key = publish_head(store, "acme", "old", head, nf4, record_path=tmp_path / "head" / RECORD_FILE)
    manifest = store.manifest(key)
    check_servable(key, manifest, nf4)  # its manifest says nf4: served
    assert stale(store, nf4) == ([(key, "quantization none (this base: nf4)")], [])
    assert [k for k, _ in stale_latest(store, nf4, None)[0]] == [key]
    # a damaged head version is reported as unreadable; it stopped the whole listing (the second diff review)
    with (store.version_dir(key) / "head.json").open("a") as damaged:
        damaged.write(" ")
    listed, unreadable = stale(store, nf4)
    assert listed == [] and [(k, "checksum" in why) for k, why in unreadable] == [(key, True)]


def test_a_head_is_published_only_beside_the_lora_it_was_trained_on(
    tmp_path: Path, tiny_model_dir: Path, tiny_spec: BaseModelSpec, peft_adapter: Any
) -> None:
    """Found by an outside review: a head kept only its LoRA's name and version, so published into
    another store it read whatever LoRA had that name there, in silence. The record keeps the LoRA's
    file checksums and publish compares them with the LoRA the target store holds."""
    trained_against, other = AdapterStore(tmp_path / "a"), AdapterStore(tmp_path / "b")
    trained_against.import_peft(peft_adapter(seed=7, r=8, target_modules=["q_proj"]), "acme", "support", tiny_spec)
    other.import_peft(peft_adapter(seed=8, r=8, target_modules=["q_proj"]), "acme", "support", tiny_spec)
    data = write_labelled(tmp_path / "intents.jsonl", labelled_rows(4))
    train_head(tiny_model_dir, tiny_spec, tmp_path / "head", data, features_from="acme/support", store=trained_against)
    with pytest.raises(AdapterIncompatible, match=r"acme/support@1 in .* is not the LoRA this head was trained"):
        publish(tmp_path / "head", other, tiny_spec)
    assert other.list("acme")[0].name == "support" and len(other.list("acme")) == 1  # nothing published
    key = publish(tmp_path / "head", trained_against, tiny_spec)
    assert trained_against.manifest(key).kind == "head"
