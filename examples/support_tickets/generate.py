"""Generate the support-ticket triage demo data set (deterministic for a seed).

Each record is a short customer ticket and the JSON a triage system should return:
``{"category":...,"priority":...,"product":...}``. Every label is inferable from the ticket text:
the category from what the ticket is about, the priority from its urgency cue, the product from its
name or a common alias. Held-out tickets never share their exact text with training tickets.

    python examples/support_tickets/generate.py --n-train 1500 --n-heldout 200 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

CATEGORIES = ("billing", "technical", "account", "shipping", "feature_request")
PRIORITIES = ("low", "medium", "high", "urgent")
PRODUCTS = (
    "mobile app",
    "web dashboard",
    "api",
    "desktop app",
    "router",
    "smart watch",
    "headphones",
)

SYSTEM_PROMPT = (
    f"Ticket to JSON. category: {'|'.join(CATEGORIES)}; priority: {'|'.join(PRIORITIES)}; "
    f"product: {'|'.join(PRODUCTS)}"
)

ALIASES: dict[str, tuple[str, ...]] = {
    "mobile app": ("mobile app", "iPhone app", "Android app", "phone app", "mobile app"),
    "web dashboard": ("web dashboard", "dashboard", "online dashboard", "web dashboard"),
    "api": ("API", "REST API", "api", "public API"),
    "desktop app": ("desktop app", "Windows app", "Mac app", "desktop client"),
    "router": ("router", "wifi router", "mesh router", "router"),
    "smart watch": ("smart watch", "smartwatch", "watch", "smart watch"),
    "headphones": ("headphones", "wireless headphones", "headset", "headphones"),
}

SOFTWARE = ("mobile app", "web dashboard", "api", "desktop app")
HARDWARE = ("router", "smart watch", "headphones")

# category -> (products it can be about, priorities it can have, templates)
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "billing": (
        PRODUCTS,
        PRIORITIES,
        (
            "I was charged twice for my {p} this month (order {order}).",
            "My card was billed ${amount} for the {p} but I cancelled last week.",
            "Invoice {inv} for the {p} shows the wrong amount, I want a refund.",
            "Why did the {p} plan go up to ${amount}? I never agreed to a price change.",
            "Payment for the {p} keeps failing with my Visa card even though it is valid.",
            "Please refund the ${amount} charge for the {p}, it was a mistake.",
            "The {p} receipt for {month} is missing our VAT number.",
        ),
    ),
    "technical": (
        PRODUCTS,
        PRIORITIES,
        (
            "The {p} keeps crashing since the last update.",
            "I get error {err} every time I use the {p}.",
            "The {p} stopped working after version {ver}.",
            "My {p} keeps disconnecting every few minutes.",
            "The {p} is extremely slow and freezes constantly.",
            "Since {day} the {p} won't sync anything, error {err}.",
        ),
    ),
    "account": (
        ("mobile app", "web dashboard", "api", "desktop app", "router"),
        PRIORITIES,
        (
            "I can't log in to the {p}, it says my password is wrong even after a reset.",
            "Please change the email on my {p} account to {email}.",
            "My {p} account got locked after too many login attempts.",
            "How do I delete my {p} account and all my data?",
            "Two-factor codes for the {p} login never arrive.",
            "Can you add my colleague {name2} as an admin on our {p} account?",
            "I forgot the username for my {p} account.",
        ),
    ),
    "shipping": (
        HARDWARE,
        PRIORITIES,
        (
            "My {p} order {order} still hasn't arrived after {days} days.",
            "The {p} I received was damaged in the box.",
            "Tracking for order {order} ({p}) hasn't updated since {day}.",
            "I got the wrong color {p}, I ordered black.",
            "Can I change the delivery address for my {p} order {order}?",
            "The package with my {p} says delivered but it is not here.",
        ),
    ),
    "feature_request": (
        PRODUCTS,
        ("low", "medium", "high"),
        (
            "It would be great if the {p} had {feature}.",
            "Please add {feature} to the {p}.",
            "Feature idea: {feature} in the {p}.",
            "Any plans to bring {feature} to the {p}?",
            "I'd love to see {feature} in the {p}.",
        ),
    ),
}

FEATURES = (
    "a dark mode",
    "CSV export",
    "support for Spanish",
    "more color themes",
    "a Slack integration",
    "custom alerts",
    "a scheduling option",
    "offline mode",
)

CUES: dict[str, tuple[str, ...]] = {
    "urgent": (
        "URGENT: this is down for all our users right now!",
        "This is an emergency, please respond immediately.",
        "Critical issue, our whole company is affected right now.",
        "We are losing money every minute, escalate this now!",
    ),
    "high": (
        "Please fix this ASAP.",
        "I need this sorted out today.",
        "This is blocking my work, please hurry.",
        "Need help as soon as possible.",
    ),
    "medium": (
        "Could you look into it this week?",
        "Please take a look in the next few days.",
        "Not critical, but it is annoying.",
        "A reply sometime this week would be good.",
    ),
    "low": (
        "No rush at all.",
        "Whenever you get a chance.",
        "Just a minor thing, low priority.",
        "Not urgent, just curious.",
    ),
}

GREETINGS = ("", "", "", "Hi,", "Hello,", "Hey support,", "Hi team,")
SIGNOFFS = ("", "", "", "Thanks, {name}", "- {name}", "Regards, {name}", "thx")
DISTRACTORS = (
    "I also use your {p2}, no problems there.",
    "This is about the {p}, not the {p2}.",
    "My {p2} is fine, only the {p} has this.",
)
NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Greg", "Hiro", "Ines", "Jonas", "Kemi")
MONTHS = ("January", "March", "May", "July", "September", "November")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "yesterday", "last week")
ERRORS = ("E42", "500", "403", "TIMEOUT", "0x80070005", "ERR_SYNC", "401")


def _typo(text: str, rng: random.Random) -> str:
    """Swap two adjacent letters inside one longer word, as a hurried typist would."""
    words = text.split(" ")
    spots = [i for i, w in enumerate(words) if len(w) >= 6 and w.isalpha()]
    if not spots:
        return text
    i = rng.choice(spots)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def make_ticket(rng: random.Random) -> tuple[str, dict[str, str]]:
    """One ticket text and its labels."""
    category = rng.choice(CATEGORIES)
    products, priorities, templates = TEMPLATES[category]
    product = rng.choice(products)
    priority = rng.choice(priorities)
    name = rng.choice(NAMES)
    fills = {
        "p": rng.choice(ALIASES[product]),
        "order": f"#{rng.randint(10000, 99999)}",
        "inv": f"INV-{rng.randint(1000, 9999)}",
        "amount": f"{rng.randint(5, 300)}.{rng.choice(('00', '99', '49'))}",
        "month": rng.choice(MONTHS),
        "err": rng.choice(ERRORS),
        "ver": f"{rng.randint(2, 9)}.{rng.randint(0, 12)}",
        "day": rng.choice(DAYS),
        "days": str(rng.randint(5, 21)),
        "email": f"{name.lower()}{rng.randint(1, 99)}@example.com",
        "name2": rng.choice([n for n in NAMES if n != name]),
        "feature": rng.choice(FEATURES),
    }
    issue = rng.choice(templates).format(**fills)
    body = [issue, rng.choice(CUES[priority])]
    if rng.random() < 0.35:
        body.reverse()
    if rng.random() < 0.2:
        other = rng.choice([p for p in PRODUCTS if p != product])
        body.insert(rng.randint(0, len(body)), rng.choice(DISTRACTORS).format(p2=other, **fills))
    parts = [rng.choice(GREETINGS), *body, rng.choice(SIGNOFFS).format(name=name)]
    text = " ".join(p for p in parts if p)
    if rng.random() < 0.25:
        text = _typo(text, rng)
    if rng.random() < 0.1:
        text = text.lower()
    return text, {"category": category, "priority": priority, "product": product}


def to_record(text: str, labels: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    answer = json.dumps(
        {k: labels[k] for k in ("category", "priority", "product")}, separators=(",", ":")
    )
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": text},
            {"role": "assistant", "content": answer},
        ]
    }


def normalized(text: str) -> str:
    """Lower-cased words only: tickets equal under this count as the same ticket."""
    return " ".join(re.findall(r"\w+", text.lower()))


def generate(n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Held-out tickets first, then training tickets; no two tickets share their normalized text,
    so no held-out ticket is a training ticket up to case and punctuation."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: list[list[dict]] = [[], []]
    for split, n in zip(splits, (n_heldout, n_train), strict=True):
        attempts = 0
        while len(split) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise RuntimeError(f"could not draw {n} unique tickets; lower the counts")
            text, labels = make_ticket(rng)
            key = normalized(text)
            if key in seen:
                continue
            seen.add(key)
            split.append(to_record(text, labels))
    heldout, train = splits
    train_texts = {normalized(r["messages"][1]["content"]) for r in train}
    assert not any(normalized(r["messages"][1]["content"]) in train_texts for r in heldout)
    return train, heldout


def write_jsonl(path: Path, records: list[dict]) -> None:
    lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_text("".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-heldout", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args(argv)
    train, heldout = generate(args.n_train, args.n_heldout, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} train and {len(heldout)} held-out records to {args.out_dir}")


if __name__ == "__main__":
    main()
