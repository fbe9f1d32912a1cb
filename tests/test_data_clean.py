"""Dedup (exact + MinHash near-dup) and the PII scan: detection, checksums, redaction."""

from __future__ import annotations

import random

import pytest

from loft.data.clean import dedup, find_pii, iban_ok, luhn_ok, redact, scan_pii
from loft.data.formats import Record

pytestmark = pytest.mark.unit


def rec(i: int, text: str) -> Record:
    return Record(file="f.jsonl", line=i, format="completion", data={"text": text})


def long_text(seed: int, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    return [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(n)
    ]


def test_exact_dups_on_normalised_content_keep_the_first() -> None:
    records = [rec(1, "hello world"), rec(2, "other"), rec(3, "hello   world"), rec(4, "other")]
    res = dedup(records, threshold=0.9)
    assert [r.line for r in res.kept] == [1, 2]
    assert (res.exact_dups, res.near_dups) == (2, 0)
    assert res.removed == ["f.jsonl:3", "f.jsonl:4"]


def test_near_duplicate_differing_in_one_word_is_removed() -> None:
    words = long_text(0)
    changed = list(words)
    changed[150] = "zzzzzz"
    records = [
        rec(1, " ".join(words)),
        rec(2, " ".join(long_text(1))),
        rec(3, " ".join(changed)),
        rec(4, " ".join(long_text(2))),
    ]
    res = dedup(records, threshold=0.9)
    assert [r.line for r in res.kept] == [1, 2, 4]
    assert (res.exact_dups, res.near_dups) == (0, 1)
    # deterministic: the same input gives the same answer
    assert [r.line for r in dedup(records, threshold=0.9).kept] == [1, 2, 4]


def test_distinct_texts_sharing_a_template_are_kept() -> None:
    records = [
        rec(i, f"Question {i}: what is {i} plus {i * 7}? {w}")
        for i, w in enumerate(["apple", "river", "stone", "cloud", "light"])
    ]
    res = dedup(records, threshold=0.9)
    assert len(res.kept) == 5 and res.near_dups == 0


def test_near_dup_can_be_switched_off() -> None:
    words = long_text(0)
    changed = [*words[:-1], "different"]
    res = dedup([rec(1, " ".join(words)), rec(2, " ".join(changed))], threshold=0.9, near=False)
    assert len(res.kept) == 2


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to jane.doe+x@mail.example.co.uk today", "email"),
        ("call +44 20 7946 0958 now", "phone"),
        ("call (555) 123-4567 now", "phone"),
        ("call 555.123.4567 now", "phone"),
        ("card 4111 1111 1111 1111 exp", "card"),
        ("card 4012-8888-8888-1881 exp", "card"),
        ("card 378282246310005 exp", "card"),
        ("iban GB82 WEST 1234 5698 7654 32 please", "iban"),
        ("iban DE89370400440532013000 please", "iban"),
        ("host 192.168.1.20 is down", "ip"),
        ("host 2001:db8::8a2e:370:7334 is down", "ip"),
        ("key sk-proj-abcdefghijklmnopqrstuvwx1234", "secret"),
        ("aws AKIAIOSFODNN7EXAMPLE here", "secret"),
        ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789", "secret"),
        ("config api_key=Zx8fQ2mN9pL4vR7tK1wY3bC6", "secret"),
        ('{"token": "f3a9c1e7b2d84a6f9e0c5b1d7a3e8f2c"}', "secret"),
    ],
)
def test_each_pii_kind_is_detected(text: str, kind: str) -> None:
    assert [k for k, _, _ in find_pii(text)] == [kind]


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 fails Luhn",
        "order 1234567890123456 fails Luhn",
        "all zeros 0000 0000 0000 0000",
        "iban GB82 WEST 1234 5698 7654 33 fails mod-97",
        "time 12:30:45 and version 1.2.3 and 999.1.1.1",
        "date 2024-01-15, pi 3.14159, ISBN 978-3-16-148410-0",
        "token=aaaaaaaaaaaaaaaaaaaaaaaa is low entropy",
        "email-ish user@localhost and not@tld",
    ],
)
def test_lookalikes_are_not_flagged(text: str) -> None:
    assert find_pii(text) == []


def test_checksums() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")
    assert iban_ok("gb82 west 1234 5698 7654 32")


def test_redact_replaces_each_kind_with_its_placeholder() -> None:
    text = (
        "Mail jane@example.com or call (555) 123-4567; card 4111 1111 1111 1111; "
        "IBAN GB82 WEST 1234 5698 7654 32 AND more; ip 10.0.0.1; key AKIAIOSFODNN7EXAMPLE."
    )
    new, kinds = redact(text)
    assert new == (
        "Mail [EMAIL] or call [PHONE]; card [CARD]; IBAN [IBAN] AND more; ip [IP]; key [SECRET]."
    )
    assert sorted(kinds) == ["card", "email", "iban", "ip", "phone", "secret"]


def test_scan_pii_counts_per_kind_with_locations_and_redacts_messages() -> None:
    chat = Record(
        file="c.jsonl",
        line=7,
        format="chat",
        data={
            "messages": [
                {"role": "user", "content": "I am bob@x.org, and a@b.io"},
                {"role": "assistant", "content": "Hi! 10.1.2.3"},
            ]
        },
    )
    records = [rec(1, "nothing here"), chat, rec(9, "c@d.com")]
    kept, report = scan_pii(records, mode="report")
    assert kept == records  # report mode changes nothing
    assert report["total"] == 4 and report["records"] == 2
    assert report["kinds"]["email"] == {
        "count": 3,
        "records": 2,
        "lines": ["c.jsonl:7", "f.jsonl:9"],
    }
    assert report["kinds"]["ip"] == {"count": 1, "records": 1, "lines": ["c.jsonl:7"]}
    redacted, _ = scan_pii(records, mode="redact")
    assert redacted[1].data["messages"][0]["content"] == "I am [EMAIL], and [EMAIL]"
    assert redacted[1].data["messages"][1]["content"] == "Hi! [IP]"
    assert redacted[2].data == {"text": "[EMAIL]"}
    assert chat.data["messages"][0]["content"] == "I am bob@x.org, and a@b.io"  # not mutated
    off, off_report = scan_pii(records, mode="off")
    assert off is records and off_report["total"] == 0
