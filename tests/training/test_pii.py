from __future__ import annotations

import json
import time

import pytest

from lorafleet_training.data import Example, Turn
from lorafleet_training.errors import PiiFound
from lorafleet_training.pii import apply_policy, detect, iban_ok, luhn_ok, redact_text, scan, ssn_ok

# (text, kind, the value that must be found)
PLANTED = [
    ("Write to jane.doe+billing@example.co.uk for a refund.", "email", "jane.doe+billing@example.co.uk"),
    ("Email: ops@mail.zephyr-bikes.test", "email", "ops@mail.zephyr-bikes.test"),
    ("Call me on (415) 555-0132 after six.", "phone", "(415) 555-0132"),
    ("Her cell is 212-555-0187.", "phone", "212-555-0187"),
    ("Toll free 1-800-555-0199 any time", "phone", "1-800-555-0199"),
    ("London office: +44 20 7946 0958", "phone", "+44 20 7946 0958"),
    ("Paris: +33 1 23 45 67 89.", "phone", "+33 1 23 45 67 89"),
    ("US: +1 (312) 555-0142", "phone", "+1 (312) 555-0142"),
    ("Card 4111 1111 1111 1111 exp 12/29", "payment_card", "4111 1111 1111 1111"),
    ("Paid with 5555-5555-5555-4444.", "payment_card", "5555-5555-5555-4444"),
    ("Amex 3782 822463 10005 on file", "payment_card", "3782 822463 10005"),
    ("number 6011111111111117 please", "payment_card", "6011111111111117"),
    ("Card 4111 1111 1111 1111 2 times", "payment_card", "4111 1111 1111 1111"),
    ("SSN 536-22-1947 on the form", "ssn", "536-22-1947"),
    ("social security number: 536221947", "ssn", "536221947"),
    ("IBAN DE89 3704 0044 0532 0130 00 for wires", "iban", "DE89 3704 0044 0532 0130 00"),
    ("Send to GB82WEST12345698765432.", "iban", "GB82WEST12345698765432"),
    ("FR14 2004 1010 0505 0001 3M02 606 ABC", "iban", "FR14 2004 1010 0505 0001 3M02 606"),
    ("The server 203.0.113.54 refused it", "ipv4", "203.0.113.54"),
    ("from 10.0.0.1:8080", "ipv4", "10.0.0.1"),
    ("client 2001:db8:85a3::8a2e:370:7334 connected", "ipv6", "2001:db8:85a3::8a2e:370:7334"),
    ("link-local fe80::1ff:fe23:4567:890a.", "ipv6", "fe80::1ff:fe23:4567:890a"),
    ("my key is AKIAIOSFODNN7EXAMPLE, rotate it", "secret", "AKIAIOSFODNN7EXAMPLE"),
    ("push with ghp_" + "a1B2" * 9 + " today", "secret", "ghp_" + "a1B2" * 9),
    ("OPENAI_KEY sk-proj-" + "Ab3_" * 10 + ".", "secret", "sk-proj-" + "Ab3_" * 10),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "secret", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("xoxb-123456789012-abcdefABCDEF is the bot", "secret", "xoxb-123456789012-abcdefABCDEF"),
    ("maps AIzaSyD-abcdefghijklmnopqrstuvwxyz12345", "secret", "AIzaSyD-abcdefghijklmnopqrstuvwxyz12345"),
    (
        "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.dozjgNryP4J3jVmNHl0w5N",
        "secret",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.dozjgNryP4J3jVmNHl0w5N",
    ),
    ("the wifi password: Summer2024! ok", "secret", "Summer2024!"),
    ('{"api_key": "abc123def456ghi"}', "secret", "abc123def456ghi"),
    ("export DB_PASSWORD=hunter2hunter2", "secret", "hunter2hunter2"),
    ("OPENAI_API_KEY=abc123def456 in .env", "secret", "abc123def456"),
    ("the password = 12345678 works", "secret", "12345678"),
    (
        "k: -----BEGIN RSA PRIVATE KEY-----\nMIIEpAIB\nab==\n-----END RSA PRIVATE KEY-----\nthanks",
        "secret",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIB\nab==\n-----END RSA PRIVATE KEY-----",
    ),
    (
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1r\n(cut).",
        "secret",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1r\n",
    ),
]

CLEAN = [
    "Our warranty covers frames for 10 years from 2019-04-01; the store opened in 1998.",
    "The Trail 7 costs $1,299.99 (was $1,499.00); shipping is 4.95 EUR.",
    "Upgrade to version 2.14.3 or v1.2.3.4; see section 4.2.1 of the policy, RFC 2616 and ISO 8601.",
    "Order ZB-2024-000123 shipped; order #100234987 is pending; ticket 5512 is closed.",
    "Tracking 1Z999AA10123456784, ISBN 978-3-16-148410-0, part number 4711-0815.",
    "Open 09:00-17:30, Monday to Friday; the meeting is at 10:30:45 UTC.",
    "Ratios of 3:2 and 16:9; MAC 00:1A:2B:3C:4D:5E is not in scope; C++ uses std::vector.",
    "Invoice total 1234567.89; quantity 1000000; serial 5555-5555-5555-4443x.",
    "Pay within 30 days. Fees: 2.5% per month. Temperature 21.5 C. Coordinates 52.5200, 13.4050.",
    "Model numbers 100-200-3000 and 123-456-7890 are internal codes.",
    "A 16-digit reference 1234 5678 9012 3456 fails the Luhn check.",
    "Invalid SSNs: 000-12-3456, 666-12-3456, 912-12-3456, 123-00-4567, 123-45-0000.",
    "Invalid IBAN DE89 3704 0044 0532 0130 01 (bad check digits).",
    "Quillmark Legal LLP, Suite 400, 12 Harbor Street; reply within 14 days per clause 7(b).",
    "Reset your password: click the link we sent. Password requirements: 8 characters, one digit.",
    "Set api_key: YOUR_API_KEY_HERE; password = ********; the secret ingredient is love.",
    "Bearer tokens expire after one hour; we use scikit-learn (sk-learn) and a public key.",
    "grep alice /etc/passwd: alice:x:1001:1001; PWD=/home/ubuntu2; password: $DB_PASS2 from the vault.",
]


@pytest.mark.parametrize(("text", "kind", "value"), PLANTED)
def test_planted_pii_is_found(text: str, kind: str, value: str) -> None:
    spans = detect(text)
    assert [(s.kind, text[s.start : s.end]) for s in spans] == [(kind, value)]


def test_clean_text_has_no_findings() -> None:
    for text in CLEAN:
        assert detect(text) == [], text


def test_validity_checks() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert ssn_ok("536", "22", "1947")
    for bad in (
        ("000", "12", "3456"),
        ("666", "12", "3456"),
        ("900", "12", "3456"),
        ("123", "00", "4567"),
        ("123", "45", "0000"),
    ):
        assert not ssn_ok(*bad)
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE89370400440532013001")
    assert not iban_ok("DE8937040044053201300")  # Germany's IBAN is 22 characters


def _examples() -> list[Example]:
    return [
        Example(line=1, turns=(Turn("user", "My email is jane.doe@example.com"),), completion="Noted."),
        Example(line=2, prompt="Clean prompt about order ZB-1001", completion="Ships in 3 days."),
        Example(line=3, prompt="Card?", completion="Use 4111 1111 1111 1111 or call (415) 555-0132."),
    ]


def test_scan_reports_locations_and_never_the_value() -> None:
    report = scan(_examples())
    assert report.counts() == {"email": 1, "phone": 1, "payment_card": 1}
    assert [(f.line, f.field, f.kind) for f in report.findings] == [
        (1, "messages[0].content", "email"),
        (3, "completion", "payment_card"),
        (3, "completion", "phone"),
    ]
    card = report.findings[1]
    assert (card.start, card.end) == (4, 23)
    rendered = report.describe() + json.dumps(report.to_record(previews=True))
    for secret in ("jane.doe@example.com", "jane.doe", "4111 1111 1111 1111", "555-0132"):
        assert secret not in rendered
    assert "****1111" in card.preview


def test_refuse_is_the_policy_that_raises() -> None:
    with pytest.raises(PiiFound) as info:
        apply_policy(_examples(), "refuse")
    assert info.value.report.mode == "refuse"
    assert "line 1, messages[0].content" in str(info.value) and "--pii redact" in str(info.value)


def test_redact_replaces_spans_with_typed_placeholders() -> None:
    redacted, report = apply_policy(_examples(), "redact")
    assert report.mode == "redact" and len(report.findings) == 3
    assert redacted[0].turns == (Turn("user", "My email is [EMAIL]"),)
    assert redacted[1] == _examples()[1]
    assert redacted[2].completion == "Use [CARD_NUMBER] or call [PHONE]."
    assert scan(redacted).clean
    assert redact_text("ip 203.0.113.54 / fe80::1ff:fe23:4567:890a") == "ip [IP_ADDRESS] / [IP_ADDRESS]"


def test_allow_keeps_data_and_records_the_choice() -> None:
    kept, report = apply_policy(_examples(), "allow")
    assert kept == _examples()
    record = report.to_record()
    assert record["mode"] == "allow" and record["findings"] == 3 and record["by_kind"]["email"] == 1
    assert "preview" not in record["locations"][0]


def test_crafted_lines_are_scanned_in_linear_time() -> None:
    """Inputs that made the IPv6 and phone patterns backtrack (25 s and ~1 s before; a line may be
    1 MB): a bound ~100x above what they take now, far below what they took."""
    for text in ("ab:" * 3000 + "g", "+1" + " 1234" * 2000 + "x", "+" + "1" * 100_000 + "a"):
        started = time.perf_counter()
        redact_text(text)
        assert time.perf_counter() - started < 1.0, text[:20]
    # ~1 MB lines of many findings, against a plain line of the same length timed just before (the
    # machine's load scales both): splicing each finding in alone made the first two 10-40x slower.
    for text in (
        "-----BEGIN PRIVATE KEY-----." * 40_000,
        "a@b.co " * 150_000,
        "-----BEGIN PRIVATE KEY-----" * 40_000,  # a body match per header: 2 s
        "eyJ" + "a" * 500_000 + ".eyJ" + "b" * 500_000,
        "password=" * 110_000,
    ):
        plain = ("hello world, 12 " * (len(text) // 16 + 1))[: len(text)]
        started = time.perf_counter()
        redact_text(plain)
        baseline = time.perf_counter() - started
        started = time.perf_counter()
        redact_text(text)
        assert time.perf_counter() - started < 4 * baseline + 0.1, text[:20]
    assert redact_text("fe80::1ff:fe23:4567:890a. or ::ffff:192.0.2.1, not std::vector") == (
        "[IP_ADDRESS]. or [IP_ADDRESS], not std::vector"
    )
