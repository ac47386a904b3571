"""Synthetic training sets for two fictional companies (no real people, no real personal data).

* **Zephyr Bikes** (tenant ``zephyr``, adapter ``support``): customer support that answers warranty,
  returns and shipping questions in one terse line ending with a policy code, e.g.
  ``Frames: lifetime warranty for the original owner; register within 60 days. [ZB-W1]``
* **Quillmark Legal** (tenant ``quillmark``, adapter ``counsel``): a law firm's front desk that always
  answers in the same formal template: ``Re: <matter>.`` / the answer / ``Respectfully,`` /
  ``Quillmark Legal LLP``.

The facts, codes and formats exist nowhere else, so the base model cannot know them: what an adapter
gets right on questions it never saw comes from its training set. Each fact has training question
templates and held-out ones (different wording) that never appear in training.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Fact:
    topic: str
    answer: str
    questions: tuple[str, ...]  # training wordings
    held_out: tuple[str, ...]  # wordings used only for the held-out questions


@dataclass(frozen=True)
class Company:
    name: str
    tenant: str
    adapter: str
    facts: tuple[Fact, ...]
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]

    @property
    def reference(self) -> str:
        return f"{self.tenant}/{self.adapter}"

    def render(self, fact: Fact) -> str:
        if self.tenant == "quillmark":
            return f"Re: {fact.topic}.\n{fact.answer}\nRespectfully,\nQuillmark Legal LLP"
        return fact.answer

    def system_prompt(self) -> str:
        """A prompt adapter for the same company: every fact and the style, written out."""
        facts = "\n".join(f"- {f.topic}: {f.answer}" for f in self.facts)
        if self.tenant == "quillmark":
            style = (
                "You are the front desk of Quillmark Legal LLP. Answer in exactly this format: a first line "
                "'Re: <matter>.', then the answer in one formal sentence, then 'Respectfully,' and "
                "'Quillmark Legal LLP' on their own lines."
            )
        else:
            style = (
                "You are Zephyr Bikes customer support. Answer in one terse line that ends with the policy "
                "code in brackets, exactly as in these policies."
            )
        return f"{style}\nPolicies:\n{facts}"


ZEPHYR = Company(
    name="Zephyr Bikes",
    tenant="zephyr",
    adapter="support",
    prefixes=("", "", "Hi! ", "Hello, ", "Quick question: ", "Hey Zephyr, "),
    suffixes=("", "", " Thanks.", " Thank you!"),
    facts=(
        Fact(
            "Frame warranty",
            "Frames: lifetime warranty for the original owner; register within 60 days. [ZB-W1]",
            (
                "How long is the frame warranty?",
                "What warranty do Zephyr frames have?",
                "Is my bike frame covered by a warranty?",
                "Does the frame warranty last forever?",
                "What is the warranty on the frame of my Zephyr?",
            ),
            ("My frame cracked after four years, am I still covered?", "For how many years is a frame guaranteed?"),
        ),
        Fact(
            "Component warranty",
            "Components: 2 years from purchase; tires, chains and brake pads excluded. [ZB-W2]",
            (
                "How long are components covered?",
                "What is the warranty on the derailleur and other parts?",
                "Are bike components under warranty?",
                "Is the chain covered by the warranty?",
                "What warranty applies to the gears and brakes?",
            ),
            ("My shifter broke after a year, is that covered?", "How many years of coverage do parts get?"),
        ),
        Fact(
            "Battery warranty",
            "E-bike battery: 3 years or 800 full charge cycles, whichever comes first. [ZB-W3]",
            (
                "What is the battery warranty on e-bikes?",
                "How long is my e-bike battery covered?",
                "Is the battery of the electric bike under warranty?",
                "How many charge cycles does the battery warranty include?",
                "What warranty comes with the e-bike battery?",
            ),
            ("My e-bike battery holds less charge now, is it still under warranty?", "Battery coverage on e-bikes?"),
        ),
        Fact(
            "Returns",
            "Returns: 45 days, unridden, in the original box; refund within 5 business days. [ZB-R1]",
            (
                "What is your return policy?",
                "Can I return a bike I bought?",
                "How many days do I have to return my bike?",
                "How do returns work?",
                "Can I send back a bike I don't like?",
            ),
            ("I changed my mind about my purchase, can I get my money back?", "What's the return window?"),
        ),
        Fact(
            "Crash replacement",
            "Crash replacement: 40% off a new frame within 3 years of purchase. [ZB-W4]",
            (
                "Do you have a crash replacement program?",
                "I crashed and broke my frame, what can you do?",
                "Is there a discount if I wreck my frame?",
                "What happens if I destroy my frame in a crash?",
                "Do you offer crash replacement?",
            ),
            ("My frame snapped in an accident, any help?", "Is there a deal on a frame after a crash?"),
        ),
        Fact(
            "Shipping",
            "Shipping: free over $150, otherwise $12; 3-5 business days. [ZB-S1]",
            (
                "How much does shipping cost?",
                "Is shipping free?",
                "How long does delivery take?",
                "What are your shipping fees?",
                "When will my order arrive?",
            ),
            ("Do I pay for delivery on a $90 order?", "How fast do you ship?"),
        ),
        Fact(
            "Support hours",
            "Support: Monday to Saturday, 8:00-18:00 Pacific. [ZB-C1]",
            (
                "What are your support hours?",
                "When can I reach customer support?",
                "Are you open on Sundays?",
                "What time does support open?",
                "When is the help desk available?",
            ),
            ("Can I call you at 7 pm on a Saturday?", "What hours is customer service open?"),
        ),
        Fact(
            "Free tune-up",
            "First tune-up free within 90 days at any Zephyr dealer. [ZB-M1]",
            (
                "Do I get a free tune-up?",
                "Is the first service free?",
                "How does the free tune-up work?",
                "When should I get my first tune-up?",
                "Is there free maintenance after I buy a bike?",
            ),
            ("My new bike needs adjusting, do I have to pay for it?", "Is service included with a new bike?"),
        ),
        Fact(
            "Price match",
            "Price match: within 14 days of purchase, authorized dealers only. [ZB-P1]",
            (
                "Do you price match?",
                "I found my bike cheaper elsewhere, can you match it?",
                "What is your price match policy?",
                "Can I get the difference back if the price drops?",
                "Do you match competitor prices?",
            ),
            ("Another shop sells it for less, will you refund the difference?", "Is there a price guarantee?"),
        ),
        Fact(
            "Trail 7 tire pressure",
            "Trail 7 tires: 28-32 psi off-road, 35 psi on pavement. [ZB-T7]",
            (
                "What tire pressure should I use on the Trail 7?",
                "How much air goes in Trail 7 tires?",
                "What psi for my Trail 7?",
                "What is the recommended pressure for Trail 7 tires?",
                "How hard should I pump the Trail 7 tires?",
            ),
            ("Right psi for a Trail 7 on gravel and road?", "Trail 7 inflation pressure?"),
        ),
        Fact(
            "International shipping",
            "International: Canada and the EU only; duties paid by the buyer. [ZB-S2]",
            (
                "Do you ship internationally?",
                "Can you ship to Germany?",
                "Do you deliver outside the US?",
                "Which countries do you ship to?",
                "Who pays import duties on international orders?",
            ),
            ("Can I order a bike from Canada?", "Do you send bikes abroad?"),
        ),
        Fact(
            "Financing",
            "Financing: 0% APR for 12 months on orders over $800. [ZB-F1]",
            (
                "Do you offer financing?",
                "Can I pay in installments?",
                "Is there a payment plan?",
                "Do you have 0% financing?",
                "Can I spread the cost of a bike over months?",
            ),
            ("I can't pay for the bike all at once, any options?", "What financing deals are there?"),
        ),
    ),
)

QUILLMARK = Company(
    name="Quillmark Legal",
    tenant="quillmark",
    adapter="counsel",
    prefixes=("", "", "Good morning. ", "Hello, ", "I would like to ask: ", "Excuse me, "),
    suffixes=("", "", " Thank you.", " Kind regards."),
    facts=(
        Fact(
            "Initial consultation",
            "The initial consultation lasts 45 minutes and costs $250, credited against any retainer.",
            (
                "How much is a first consultation?",
                "What does the initial consultation cost?",
                "How long is the first meeting with a lawyer?",
                "Do you charge for a consultation?",
                "What is the fee for an initial meeting?",
            ),
            ("Is the first appointment free?", "What will an intro meeting with your firm cost me?"),
        ),
        Fact(
            "Retainer",
            "The standard retainer is $3,500, held in a client trust account.",
            (
                "How much is the retainer?",
                "Do I need to pay a retainer?",
                "What retainer do you require?",
                "Where is my retainer kept?",
                "What is your standard retainer amount?",
            ),
            ("How much do I deposit before you start?", "What advance payment do you ask for?"),
        ),
        Fact(
            "Hourly rates",
            "Partners bill $420 per hour and associates $260 per hour, in 6-minute increments.",
            (
                "What are your hourly rates?",
                "How much does a partner charge per hour?",
                "How do you bill your time?",
                "What do associates charge?",
                "What are your fees per hour?",
            ),
            ("How expensive is an hour of a lawyer's time at your firm?", "What is the billing rate?"),
        ),
        Fact(
            "Practice areas",
            "The firm practises trademark, copyright and small-business contract law only.",
            (
                "What areas of law do you practise?",
                "Do you handle divorces?",
                "What kind of cases do you take?",
                "Can you help with a criminal case?",
                "What is your legal specialty?",
            ),
            ("Do you do immigration law?", "Which legal matters can your firm help with?"),
        ),
        Fact(
            "Urgent matters",
            "Urgent matters receive a response within 4 business hours via the emergency line.",
            (
                "How quickly do you respond to urgent matters?",
                "What if I have an emergency?",
                "How fast will a lawyer get back to me on something urgent?",
                "Do you have an emergency line?",
                "What is your response time for urgent issues?",
            ),
            ("I received a cease and desist today, how soon can someone answer?", "How fast are urgent replies?"),
        ),
        Fact(
            "Document retention",
            "Client files are retained for 7 years after a matter closes, then securely destroyed.",
            (
                "How long do you keep my files?",
                "What is your document retention policy?",
                "Do you keep records after my case ends?",
                "When are client files destroyed?",
                "How long are documents stored?",
            ),
            ("Will you still have my contract file in five years?", "What happens to my paperwork later?"),
        ),
        Fact(
            "Office hours",
            "Offices are open Monday to Friday, 9:00 to 17:00 Eastern, closed on federal holidays.",
            (
                "What are your office hours?",
                "When is the office open?",
                "Are you open on weekends?",
                "What time do you close?",
                "Can I visit on a Saturday?",
            ),
            ("Is the firm open on the Fourth of July?", "When can I come by the office?"),
        ),
        Fact(
            "Payment terms",
            "Invoices are due within 30 days; late balances accrue 1% interest per month.",
            (
                "When are invoices due?",
                "What are your payment terms?",
                "What happens if I pay late?",
                "How long do I have to pay a bill?",
                "Do you charge interest on late payments?",
            ),
            ("My invoice is overdue, is there a penalty?", "How many days until a bill must be paid?"),
        ),
        Fact(
            "Conflict check",
            "A conflict check is completed within 2 business days before any engagement begins.",
            (
                "Do you run a conflict check?",
                "How long does the conflict check take?",
                "What is a conflict check and do I need one?",
                "When is the conflict check done?",
                "Is there a waiting period before you take my case?",
            ),
            ("Why can't you start on my case today?", "How long until you clear conflicts?"),
        ),
        Fact(
            "Engagement",
            "Representation begins only once the engagement letter is signed and the retainer is received.",
            (
                "When does representation start?",
                "Are you my lawyer after our call?",
                "What do I need to sign to hire you?",
                "When do you officially represent me?",
                "How do I engage the firm?",
            ),
            ("Do you represent me already after I emailed you?", "What makes the engagement official?"),
        ),
        Fact(
            "Jurisdictions",
            "Attorneys are admitted in New York, New Jersey and Connecticut.",
            (
                "Which states are your attorneys licensed in?",
                "Can you represent me in California?",
                "Where are your lawyers admitted?",
                "In what jurisdictions do you practise?",
                "Are you licensed in New Jersey?",
            ),
            ("Can your firm appear in a Texas court?", "Which state bars are your lawyers members of?"),
        ),
        Fact(
            "Ending representation",
            "Either party may end representation with 14 days' written notice.",
            (
                "How do I end our engagement?",
                "Can I fire my lawyer?",
                "What notice is needed to terminate representation?",
                "Can the firm drop my case?",
                "How do I stop working with you?",
            ),
            ("I want to switch firms, what do I have to do?", "How much notice to end the engagement?"),
        ),
    ),
)

COMPANIES = (ZEPHYR, QUILLMARK)


def training_rows(company: Company, seed: int = 0, per_question: int = 2) -> list[dict[str, Any]]:
    """Chat rows: each training wording of each fact, `per_question` times with varied greetings."""
    rng = random.Random(f"{company.tenant}-{seed}")
    rows = []
    for fact in company.facts:
        for question in fact.questions:
            variants = {(rng.choice(company.prefixes), rng.choice(company.suffixes)) for _ in range(per_question)}
            for prefix, suffix in sorted(variants):
                lower = prefix.endswith((", ", ": "))
                user = prefix + (question[0].lower() + question[1:] if lower else question) + suffix
                rows.append(_chat(user, company.render(fact)))
    rng.shuffle(rows)
    return rows


def held_out_rows(company: Company) -> list[dict[str, Any]]:
    """One row per held-out wording (never in training): new phrasings of the same facts."""
    return [_chat(q, company.render(f)) for f in company.facts for q in f.held_out]


def prompt_template(company: Company) -> dict[str, Any]:
    """The company as a prompt adapter: the system prompt and one few-shot exchange."""
    first = company.facts[0]
    return {
        "system": company.system_prompt(),
        "examples": [
            {"role": "user", "content": first.questions[0]},
            {"role": "assistant", "content": company.render(first)},
        ],
    }


def _chat(user: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_datasets(root: Path, seed: int = 0) -> dict[str, dict[str, Path]]:
    """Write ``<root>/<tenant>/{train.jsonl,heldout.jsonl,prompt.json}`` for both companies."""
    written: dict[str, dict[str, Path]] = {}
    for company in COMPANIES:
        folder = root / company.tenant
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"train": folder / "train.jsonl", "heldout": folder / "heldout.jsonl", "prompt": folder / "prompt.json"}
        _write_jsonl(paths["train"], training_rows(company, seed))
        _write_jsonl(paths["heldout"], held_out_rows(company))
        paths["prompt"].write_text(json.dumps(prompt_template(company), indent=2) + "\n", encoding="utf-8")
        written[company.tenant] = paths
    return written


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("data/demo")
    for tenant, paths in write_datasets(out).items():
        counts = {k: sum(1 for _ in p.open()) for k, p in paths.items() if p.suffix == ".jsonl"}
        print(f"{tenant}: {counts} -> {paths['train'].parent}")
