"""A third fictional company with a labelled intent dataset (synthetic: no real people, no personal data).

**Larkspur Mobile** (tenant ``larkspur``, head adapter ``intents``): a phone carrier that routes every
incoming customer message to one of six queues. Its classifier head is trained on pooled features of the
frozen base (``lorafleet train --method classifier``) and served by ``Classify``; the demo compares its
held-out macro-F1 with the prompt-only base (the base asked to answer with the label).

Each intent has training templates and held-out templates (different wording, never in training),
filled with the same small vocabularies.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

TENANT = "larkspur"
ADAPTER = "intents"
REFERENCE = f"{TENANT}/{ADAPTER}"

PLANS = ("Basic 5", "Unlimited Plus", "Family Share", "Travel 20")
DEVICES = ("Pixel", "iPhone", "Galaxy", "Moto", "tablet", "smartwatch")
PLACES = ("Lisbon", "the north side", "downtown", "my village", "the airport", "Madrid", "our office")
MONTHS = ("March", "April", "May", "June", "last month", "this month")

# intent -> (training templates, held-out templates); {plan} {device} {place} {month} are filled in.
INTENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "billing": (
        (
            "Why is my bill for {month} so much higher than usual?",
            "I was charged twice for {month}, please refund one payment.",
            "There is a fee on my invoice I don't recognise.",
            "Can you explain the extra charges on my {month} statement?",
            "My direct debit took the wrong amount in {month}.",
            "I need a copy of my invoice for {month}.",
        ),
        (
            "The amount you took from my card in {month} is wrong.",
            "What is this mystery surcharge on my account?",
            "Please send me the receipt for {month}, my accountant needs it.",
        ),
    ),
    "plan_change": (
        (
            "I want to upgrade to {plan}.",
            "How do I switch from my current plan to {plan}?",
            "Can I add more data to my plan?",
            "Is {plan} cheaper than what I have now?",
            "Please move my line to the {plan} plan from next month.",
            "I'd like to downgrade to a smaller plan.",
        ),
        (
            "Put me on {plan} starting with the next billing cycle.",
            "My data runs out every month, what bigger bundle do you have?",
            "What would it cost to go to {plan}?",
        ),
    ),
    "outage": (
        (
            "There is no signal at all in {place} since this morning.",
            "My calls keep dropping in {place}.",
            "Mobile internet is down in {place}, is there an outage?",
            "I can't make calls anywhere in {place} today.",
            "The network has been very slow in {place} all week.",
            "Is something wrong with your masts near {place}?",
        ),
        (
            "Zero bars on my phone around {place} for hours now.",
            "Nobody in {place} can get online, what's going on with the network?",
            "Coverage in {place} disappeared overnight.",
        ),
    ),
    "cancel": (
        (
            "I want to cancel my contract.",
            "How do I close my account with you?",
            "Please terminate my line at the end of {month}.",
            "I'm leaving Larkspur, what do I need to do to cancel?",
            "Can I end my contract early without a penalty?",
            "Stop my service, I am moving abroad.",
        ),
        (
            "I no longer want to be a customer, shut down my number.",
            "What is the exit fee if I quit before the term ends?",
            "Please end my subscription after {month}.",
        ),
    ),
    "device": (
        (
            "My {device} won't connect to the network after the update.",
            "How do I set up voicemail on my new {device}?",
            "The SIM card is not recognised by my {device}.",
            "My {device} screen cracked, do you repair phones?",
            "How do I activate the eSIM on my {device}?",
            "My {device} battery drains very fast since I got it.",
        ),
        (
            "The {device} I bought from you keeps restarting by itself.",
            "I can't get mobile data working on the {device}, what settings do I need?",
            "My {device} says no SIM inserted even though there is one.",
        ),
    ),
    "roaming": (
        (
            "Will my phone work when I travel to {place} next week?",
            "How much does roaming cost outside the country?",
            "I got a huge roaming charge after my holiday.",
            "Do I need to turn on roaming before flying?",
            "Is {plan} valid abroad?",
            "My phone has no service since I landed abroad.",
        ),
        (
            "Going overseas in {month}, can I use my data there?",
            "What are your international rates for calls from abroad?",
            "Abroad right now and my phone can't find a network.",
        ),
    ),
}


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        plan=rng.choice(PLANS), device=rng.choice(DEVICES), place=rng.choice(PLACES), month=rng.choice(MONTHS)
    )


def training_rows(seed: int = 0, per_template: int = 4) -> list[dict[str, Any]]:
    """``per_template`` distinct fillings of each training template; every third one as a chat turn."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for label, (templates, _) in INTENTS.items():
        for template in templates:
            seen: set[str] = set()
            for _ in range(per_template * 4):
                text = _fill(template, rng)
                if text in seen:
                    continue
                seen.add(text)
                rows.append(_row(text, label, chat=len(rows) % 3 == 0))
                if len(seen) == per_template:
                    break
    rng.shuffle(rows)
    return rows


def held_out_rows(seed: int = 0, per_template: int = 3) -> list[dict[str, Any]]:
    """The held-out wordings (never in training), filled ``per_template`` times each."""
    rng = random.Random(seed + 1)
    rows: list[dict[str, Any]] = []
    for label, (_, templates) in INTENTS.items():
        for template in templates:
            texts = {_fill(template, rng) for _ in range(per_template * 4)}
            rows += [_row(text, label, chat=False) for text in sorted(texts)[:per_template]]
    return rows


def _row(text: str, label: str, chat: bool) -> dict[str, Any]:
    if chat:
        return {"messages": [{"role": "user", "content": text}], "label": label}
    return {"text": text, "label": label}


def write_datasets(root: Path, seed: int = 0) -> dict[str, Path]:
    """``train.jsonl`` (classifier training data, held-out split inside) and ``heldout.jsonl`` under
    ``root/larkspur``; both deterministic for a seed."""
    out = Path(root) / TENANT
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl"}
    for name, rows in (("train", training_rows(seed)), ("heldout", held_out_rows(seed))):
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return paths
