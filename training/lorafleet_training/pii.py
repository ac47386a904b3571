"""A PII scan of training data: emails, phone numbers, payment cards, US SSNs, IBANs, IP addresses,
and secrets (credentials an adapter could learn and repeat to anyone who asks).

Each detector pairs a pattern with a validity check, so plain numbers (years, prices, version numbers,
order ids) are not flagged: cards need 13-19 digits, a known network prefix and the Luhn check; SSNs
need the ``AAA-GG-SSSS`` shape and a valid area/group/serial; IBANs need the country's length and the
mod-97 check; phone numbers need a ``+`` country code or the North American shape with separators;
IPv4 needs four octets <= 255 outside a version string; IPv6 must parse. Secrets are private-key
blocks, tokens in the documented formats of common providers (AWS, GitHub, GitLab, Slack, Stripe,
Google, OpenAI-style ``sk-``, JWTs), and a value assigned to a credential word (``password: ...``,
``DB_PASSWORD=...``, ``api_key=...``) that mixes letters and digits or is all digits (a placeholder such
as ``YOUR_API_KEY``, a path or a variable is not flagged).

Reports never hold a found value: each finding has its line, field, kind, span and a masked preview.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lorafleet_training.data import Example
from lorafleet_training.errors import PiiFound

SCANNER = "lorafleet-pii/2"  # /2: secrets are a kind
MODES = ("refuse", "redact", "allow")
KINDS = ("email", "phone", "payment_card", "ssn", "iban", "ipv4", "ipv6", "secret")
PLACEHOLDERS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "payment_card": "[CARD_NUMBER]",
    "ssn": "[SSN]",
    "iban": "[IBAN]",
    "ipv4": "[IP_ADDRESS]",
    "ipv6": "[IP_ADDRESS]",
    "secret": "[SECRET]",
}
MAX_RECORDED_FINDINGS = 100


@dataclass(frozen=True)
class Finding:
    line: int  # 1-based line of the example in its file
    field: str  # e.g. "messages[1].content", "prompt", "completion"
    kind: str
    start: int  # span in the field's text, in characters
    end: int
    preview: str  # masked: never the full value

    def to_dict(self, preview: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "line": self.line,
            "field": self.field,
            "kind": self.kind,
            "span": [self.start, self.end],
        }
        if preview:
            data["preview"] = self.preview
        return data

    def __str__(self) -> str:
        where = f"line {self.line}, {self.field}" if self.line else self.field
        return f"{where} [{self.start}:{self.end}]: {self.kind} {self.preview}"


@dataclass(frozen=True)
class PiiReport:
    examples_scanned: int
    findings: tuple[Finding, ...]
    mode: str | None = None  # the policy applied: refuse, redact or allow (None: scan only)
    source: str | None = None  # the file scanned, when known

    @property
    def clean(self) -> bool:
        return not self.findings

    def counts(self) -> dict[str, int]:
        counter = Counter(f.kind for f in self.findings)
        return {kind: counter[kind] for kind in KINDS if counter[kind]}

    def describe(self, limit: int = 50) -> str:
        if self.clean:
            return f"PII scan: no findings in {self.examples_scanned} examples"
        counts = ", ".join(f"{kind}: {n}" for kind, n in self.counts().items())
        where = f" of {self.source}" if self.source else ""
        lines = [f"PII scan{where}: {len(self.findings)} finding(s) in {self.examples_scanned} examples ({counts})"]
        lines += [f"  {f}" for f in self.findings[:limit]]
        if len(self.findings) > limit:
            lines.append(f"  ... and {len(self.findings) - limit} more")
        if self.mode == "refuse":
            lines.append(
                "refusing to train on personal data: remove it, or rerun with --pii redact (replace each span "
                "with a typed placeholder such as [EMAIL]) or --pii allow (train on it; recorded in the manifest)"
            )
        return "\n".join(lines)

    def to_record(self, previews: bool = False) -> dict[str, Any]:
        """The JSON-ready summary for a manifest (locations only unless `previews`)."""
        return {
            "scanner": SCANNER,
            "mode": self.mode,
            "examples_scanned": self.examples_scanned,
            "findings": len(self.findings),
            "by_kind": self.counts(),
            "locations": [f.to_dict(previews) for f in self.findings[:MAX_RECORDED_FINDINGS]],
            "locations_truncated": len(self.findings) > MAX_RECORDED_FINDINGS,
        }


@dataclass(frozen=True)
class Span:
    kind: str
    start: int
    end: int


# ------------------------------------------------------------------------------------------ detection


def detect(text: str) -> list[Span]:
    """Non-overlapping PII spans of `text`, in order (a longer or higher-priority match wins)."""
    candidates: list[tuple[int, int, int, str]] = []
    for priority, (kind, finder) in enumerate(_DETECTORS):
        for start, end in finder(text):
            candidates.append((start, -(end - start), priority, kind))
    candidates.sort()
    spans: list[Span] = []
    taken_until = -1
    for start, neg_len, _, kind in candidates:
        end = start - neg_len
        if start < taken_until:
            continue
        spans.append(Span(kind, start, end))
        taken_until = end
    return spans


def scan(examples: Sequence[Example]) -> PiiReport:
    findings = []
    for example in examples:
        for field, text in example.texts():
            for span in detect(text):
                value = text[span.start : span.end]
                findings.append(
                    Finding(example.line, field, span.kind, span.start, span.end, mask_value(span.kind, value))
                )
    return PiiReport(examples_scanned=len(examples), findings=tuple(findings))


def redact_text(text: str, spans: Sequence[Span] | None = None) -> str:
    """`text` with every PII span (``detect``'s, unless given) replaced by its typed placeholder.

    Built in one pass: splicing span by span copied the text once per span (5 s for a 1 MB line).
    """
    pieces: list[str] = []
    at = 0
    for span in detect(text) if spans is None else spans:
        pieces += [text[at : span.start], PLACEHOLDERS[span.kind]]
        at = span.end
    pieces.append(text[at:])
    return "".join(pieces)


def apply_policy(examples: Sequence[Example], mode: str, source: str | None = None) -> tuple[list[Example], PiiReport]:
    """Scan, then refuse (raise PiiFound), redact (return redacted copies) or allow (return as is)."""
    if mode not in MODES:
        raise ValueError(f"PII mode must be one of {MODES}, got {mode!r}")
    found = scan(examples)
    report = PiiReport(found.examples_scanned, found.findings, mode, source)
    if report.clean or mode == "allow":
        return list(examples), report
    if mode == "refuse":
        raise PiiFound(report)
    flagged = {f.line for f in report.findings}
    redacted = [
        e.with_texts({field: redact_text(text) for field, text in e.texts()}) if e.line in flagged else e
        for e in examples
    ]
    return redacted, report


# ------------------------------------------------------------------------------------------ detectors

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![\w-])"
)


def _emails(text: str) -> Iterator[tuple[int, int]]:
    for m in _EMAIL.finditer(text):
        yield m.start(), m.end()


# Digit groups joined by single spaces or dashes; windows of groups are tried so a neighbouring number
# glued on by a space does not hide a card.
_DIGIT_RUN = re.compile(r"(?<![\w.,+-])\d+(?:[ -]\d+)*(?![\w]|[.,]\d)")
_GROUP = re.compile(r"\d+")


def _group_windows(match: re.Match[str], min_digits: int, max_digits: int) -> Iterator[tuple[int, int, str]]:
    """(start, end, digits) of contiguous windows of the run's digit groups, longest first."""
    groups = [(g.start() + match.start(), g.end() + match.start(), g.group()) for g in _GROUP.finditer(match.group())]
    windows = []
    for i in range(len(groups)):
        digits = ""
        for j in range(i, len(groups)):
            digits += groups[j][2]
            if len(digits) > max_digits:
                break
            if len(digits) >= min_digits:
                windows.append((groups[i][0], groups[j][1], digits))
    windows.sort(key=lambda w: (-(w[1] - w[0]), w[0]))
    return iter(windows)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_network_ok(digits: str) -> bool:
    """Prefix and length some card network issues (Visa, Mastercard, Amex, Discover, Diners, JCB, UnionPay,
    Maestro); random 13-19 digit numbers that pass Luhn mostly fail this."""
    n, p2, p4 = len(digits), int(digits[:2]), int(digits[:4])
    if digits[0] == "4":  # Visa
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:  # Mastercard
        return n == 16
    if p2 in (34, 37):  # American Express
        return n == 15
    if p4 == 6011 or 644 <= int(digits[:3]) <= 649 or p2 == 65:  # Discover
        return 16 <= n <= 19
    if 300 <= int(digits[:3]) <= 305 or p2 in (36, 38, 39):  # Diners Club
        return 14 <= n <= 19
    if 3528 <= p4 <= 3589 or p2 == 62:  # JCB, UnionPay
        return 16 <= n <= 19
    if p2 in (50, 56, 57, 58) or 60 <= p2 <= 69:  # Maestro and other 6-series
        return n >= 13
    return False


def _cards(text: str) -> Iterator[tuple[int, int]]:
    for m in _DIGIT_RUN.finditer(text):
        used_until = -1
        for start, end, digits in _group_windows(m, 13, 19):
            if start < used_until:
                continue
            if _card_network_ok(digits) and luhn_ok(digits):
                yield start, end
                used_until = end


_SSN = re.compile(r"(?<![\w-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\w-])")
_SSN_KEYWORD = re.compile(r"(?i)\b(?:ssn|social security(?: number| no\.?)?)\b[^\d\n]{0,20}(\d{9})(?!\d)")


def ssn_ok(area: str, group: str, serial: str) -> bool:
    return area not in {"000", "666"} and not area.startswith("9") and group != "00" and serial != "0000"


def _ssns(text: str) -> Iterator[tuple[int, int]]:
    for m in _SSN.finditer(text):
        if ssn_ok(m.group(1), m.group(3), m.group(4)):
            yield m.start(), m.end()
    for m in _SSN_KEYWORD.finditer(text):
        digits = m.group(1)
        if ssn_ok(digits[:3], digits[3:5], digits[5:]):
            yield m.start(1), m.end(1)


IBAN_LENGTHS = {
    "AD": 24,
    "AE": 23,
    "AL": 28,
    "AT": 20,
    "AZ": 28,
    "BA": 20,
    "BE": 16,
    "BG": 22,
    "BH": 22,
    "BR": 29,
    "BY": 28,
    "CH": 21,
    "CR": 22,
    "CY": 28,
    "CZ": 24,
    "DE": 22,
    "DK": 18,
    "DO": 28,
    "EE": 20,
    "EG": 29,
    "ES": 24,
    "FI": 18,
    "FO": 18,
    "FR": 27,
    "GB": 22,
    "GE": 22,
    "GI": 23,
    "GL": 18,
    "GR": 27,
    "GT": 28,
    "HR": 21,
    "HU": 28,
    "IE": 22,
    "IL": 23,
    "IQ": 23,
    "IS": 26,
    "IT": 27,
    "JO": 30,
    "KW": 30,
    "KZ": 20,
    "LB": 28,
    "LC": 32,
    "LI": 21,
    "LT": 20,
    "LU": 20,
    "LV": 21,
    "MC": 27,
    "MD": 24,
    "ME": 22,
    "MK": 19,
    "MR": 27,
    "MT": 31,
    "MU": 30,
    "NL": 18,
    "NO": 15,
    "PK": 24,
    "PL": 28,
    "PS": 29,
    "PT": 25,
    "QA": 29,
    "RO": 24,
    "RS": 22,
    "SA": 24,
    "SC": 31,
    "SE": 24,
    "SI": 19,
    "SK": 24,
    "SM": 27,
    "ST": 25,
    "SV": 28,
    "TL": 23,
    "TN": 24,
    "TR": 26,
    "UA": 29,
    "VA": 22,
    "VG": 24,
    "XK": 20,
}
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{1,4}){3,8})(?![A-Za-z0-9])")


def iban_ok(compact: str) -> bool:
    country = compact[:2]
    expected = IBAN_LENGTHS.get(country)
    if expected is not None and len(compact) != expected:
        return False
    if expected is None and not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def _ibans(text: str) -> Iterator[tuple[int, int]]:
    for m in _IBAN.finditer(text):
        raw = m.group()
        # try the whole match, then without trailing space-separated groups (a word glued on)
        cuts = [len(raw)] + [i for i in range(len(raw) - 1, 4, -1) if raw[i] == " "]
        for cut in cuts:
            if iban_ok(raw[:cut].replace(" ", "")):
                yield m.start(), m.start() + cut
                break


# Each group atomic: a run of digits is not re-split into other group lengths when the end does not
# fit (that backtracking cost ~80 ms per KB of crafted digits).
_INTL_PHONE = re.compile(r"(?<![\w+])\+\d{1,3}(?>[ .-]?\(?\d{1,4}\)?){2,7}(?!\w)")
_NANP_PHONE = re.compile(
    r"(?<![\w+.-])(?:\+?1[ .-]?)?(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4}(?![\w-]|[.,]\d)"
)


def _phones(text: str) -> Iterator[tuple[int, int]]:
    for m in _INTL_PHONE.finditer(text):
        raw = m.group()
        # a trailing number glued on by a space can push the digit count over E.164's 15: trim groups
        ends = [len(raw)] + [i for i in range(len(raw) - 1, 2, -1) if raw[i] in " .-" and raw[i - 1].isdigit()]
        for end in ends:
            digits = sum(ch.isdigit() for ch in raw[:end])
            if 8 <= digits <= 15 and raw[:end].count("(") == raw[:end].count(")"):
                yield m.start(), m.start() + end
                break
    for m in _NANP_PHONE.finditer(text):
        yield m.start(), m.end()


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
_VERSION_WORD = re.compile(r"(?i)(?:\b(?:version|ver\.?|release|build|firmware|v)\s*)$")


def _ipv4s(text: str) -> Iterator[tuple[int, int]]:
    for m in _IPV4.finditer(text):
        if _VERSION_WORD.search(text[max(0, m.start() - 12) : m.start()]):
            continue  # "version 1.2.3.4" is a version, not an address
        yield m.start(), m.end()


# A run of the characters an address is written with (an IPv4 tail included), at most 64: one pass
# over the text. (Three overlapping stars around two colons backtracked cubically: a line of
# "ab:ab:...g" took 25 s at 3,000 characters.) What the run holds is checked in code.
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f:.]{2,64}")


def _ipv6s(text: str) -> Iterator[tuple[int, int]]:
    for m in _IPV6.finditer(text):
        candidate = m.group().rstrip(".")  # a sentence's full stop after it
        end = m.start() + len(candidate)
        if candidate.count(":") < 2 or (end < len(text) and (text[end].isalnum() or text[end] in "_:")):
            continue  # no address, or part of a longer word
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        hex_digits = sum(ch in "0123456789abcdefABCDEF" for ch in candidate)
        groups = [g for g in candidate.split(":") if g]
        if hex_digits >= 4 and len(groups) >= 2:  # not "::", "::1" or "a::b"-like identifiers
            yield m.start(), end


# Private keys: the whole PEM block when its END line follows (within a bound), else the header and
# the base64 body after it. The next END is searched once per position, not once per BEGIN (a line of
# many BEGIN headers stays linear).
_PEM_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----")
_PEM_END = re.compile(r"-----END (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----")
_PEM_BODY = re.compile(r"[A-Za-z0-9+/=\s:,-]{0,20000}")
MAX_PEM_CHARS = 20_000
# Provider tokens by their documented prefixes; each alternative starts with a literal, so one pass.
_TOKEN = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}"  # GitHub
    r"|glpat-[A-Za-z0-9_-]{20,64}"  # GitLab
    r"|xox[abprs]-[A-Za-z0-9-]{10,250}"  # Slack
    r"|(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,247}"  # Stripe secret and restricted keys
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|sk-(?:proj-|ant-api\d\d-)?[A-Za-z0-9_-]{32,250}"  # OpenAI / Anthropic style
    r"|eyJ[A-Za-z0-9_-]{8,4096}\.eyJ[A-Za-z0-9_-]{8,4096}\.[A-Za-z0-9_-]{8,4096}"  # JWT
    r")(?![A-Za-z0-9_-])"
)
# A credential word, also as the end of a longer name (DB_PASSWORD, OPENAI_API_KEY), then ':' or '='. Not
# "passwd" / "pwd": /etc/passwd lines and the shell's PWD=/home/... are no secrets.
_ASSIGNED = re.compile(
    r"(?i)(?:(?<![A-Za-z0-9])(?:password|passphrase|secret|client[_-]?secret|secret[_-]?key|private[_-]?key"
    r"|api[_-]?key|access[_-]?key|auth[_-]?token|access[_-]?token)\b[\"']?[ \t]{0,3}[:=]|\bbearer[ \t])"
    r"[ \t]{0,3}[\"']?([^\s\"'`,;]{8,200})"
)


def _secrets(text: str) -> Iterator[tuple[int, int]]:
    end_match: re.Match[str] | None = None
    searched_from = -1
    covered_until = -1
    for m in _PEM_BEGIN.finditer(text):
        if m.start() < covered_until:
            continue  # inside the block (or body) just found
        if searched_from < 0 or (end_match is not None and end_match.start() < m.end()):
            end_match = _PEM_END.search(text, m.end())
            searched_from = m.end()
        if end_match is not None and end_match.start() - m.end() <= MAX_PEM_CHARS:
            covered_until = end_match.end()
        else:
            body = _PEM_BODY.match(text, m.end())
            covered_until = body.end() if body else m.end()
        yield m.start(), covered_until
    for m in _TOKEN.finditer(text):
        yield m.start(), m.end()
    for m in _ASSIGNED.finditer(text):
        value = m.group(1)
        if value[0] in "/~$<{[(":  # a path, a variable or a placeholder, not a value
            continue
        digits = sum(ch.isdigit() for ch in value)
        if (digits and any(ch.isalpha() for ch in value)) or digits == len(value):
            yield m.start(1), m.end(1)


_DETECTORS: tuple[tuple[str, Callable[[str], Iterator[tuple[int, int]]]], ...] = (
    ("secret", _secrets),
    ("email", _emails),
    ("iban", _ibans),
    ("ipv6", _ipv6s),
    ("payment_card", _cards),
    ("ssn", _ssns),
    ("phone", _phones),
    ("ipv4", _ipv4s),
)


def mask_value(kind: str, value: str) -> str:
    """A preview of a found value that never shows it whole."""
    digits = "".join(ch for ch in value if ch.isdigit())
    if kind == "email":
        local, _, domain = value.partition("@")
        return f"{local[:1]}***@***.{domain.rsplit('.', 1)[-1]}"
    if kind == "payment_card":
        return f"****{digits[-4:]} ({len(digits)} digits)"
    if kind == "phone":
        return f"***{digits[-2:]} ({len(digits)} digits)"
    if kind == "ssn":
        return "***-**-****"
    if kind == "iban":
        return f"{value[:2]}** ({len(value.replace(' ', ''))} chars)"
    if kind == "ipv4":
        return value.split(".", 1)[0] + ".*.*.*"
    if kind == "ipv6":
        return value.split(":", 1)[0] + ":***"
    if kind == "secret":
        return f"*** ({len(value)} chars)"
    return "***"
