from __future__ import annotations

import pytest

from lorafleet_adapters.errors import InvalidAdapterRef
from lorafleet_adapters.ref import AdapterKey, AdapterRef


@pytest.mark.parametrize(
    ("text", "tenant", "name", "version"),
    [
        ("acme/support", "acme", "support", None),
        ("acme/support@1", "acme", "support", 1),
        ("a/b@999999999", "a", "b", 999999999),
        ("t-1_x/n_2-y@42", "t-1_x", "n_2-y", 42),
        ("0/9", "0", "9", None),
        ("a" * 63 + "/" + "b" * 63 + "@12345", "a" * 63, "b" * 63, 12345),
    ],
)
def test_parse_valid(text: str, tenant: str, name: str, version: int | None) -> None:
    ref = AdapterRef.parse(text)
    assert (ref.tenant, ref.name, ref.version) == (tenant, name, version)
    assert str(ref) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "acme",
        "Acme/support",
        "acme/Support",
        "acme/support@",
        "acme/support@0",
        "acme/support@01",
        "acme/support@-1",
        "acme/support@+1",
        "acme/support@1000000000",
        "acme/support@1.0",
        "acme/support@latest",
        "acme/support@1@2",
        "../support",
        "acme/..",
        "acme/../x",
        "acme/sup/port",
        "/acme/support",
        "acme/support/",
        "acme//support",
        "acme\\support",
        "acme/sup\\port",
        "acme/sup\x00port",
        "acme/sup\nport",
        "acme/sup\tport",
        "acme/ support",
        " acme/support",
        "acme/support ",
        "acme/supp\u00f6rt",
        "acme/support\u200b",
        "_acme/support",
        "acme/-support",
        ".staging/x",
        "acme/" + "x" * 64,
        "a" * 63 + "/" + "b" * 63 + "@1234567890",
        "a" * 70 + "/" + "b" * 70,
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidAdapterRef):
        AdapterRef.parse(text)


def test_parse_rejects_non_string() -> None:
    with pytest.raises(InvalidAdapterRef, match="string"):
        AdapterRef.parse(b"acme/support")  # type: ignore[arg-type]


def test_messages_name_the_problem() -> None:
    with pytest.raises(InvalidAdapterRef, match="tenant"):
        AdapterRef.parse("Acme/x")
    with pytest.raises(InvalidAdapterRef, match="adapter name"):
        AdapterRef.parse("acme/X")
    with pytest.raises(InvalidAdapterRef, match="no version"):
        AdapterRef.parse("acme/x@")
    with pytest.raises(InvalidAdapterRef, match="140"):
        AdapterRef.parse("a/" + "b" * 150)


def test_key_str_and_validation() -> None:
    key = AdapterKey("acme", "support", 3)
    assert str(key) == "acme/support@3"
    assert key.ref == AdapterRef("acme", "support", 3)
    with pytest.raises(InvalidAdapterRef):
        AdapterKey("acme", "../etc", 1)
    with pytest.raises(InvalidAdapterRef):
        AdapterKey("acme", "x", 0)
    with pytest.raises(InvalidAdapterRef):
        AdapterKey("acme", "x", True)


def test_refs_are_hashable_values() -> None:
    assert AdapterRef.parse("a/b@2") == AdapterRef("a", "b", 2)
    assert len({AdapterKey("a", "b", 1), AdapterKey("a", "b", 1)}) == 1
