"""Cleaning: exact and near-duplicate removal (MinHash LSH) and a PII scan with optional redaction.

Deterministic: MinHash uses a fixed seed and records are visited in file order, so the first
occurrence of a duplicate is always the one kept. PII matches are never stored in reports, only
their kind, count and record locations.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loft.data.formats import Record, canonical_json, record_text

NUM_PERM = 128
MINHASH_SEED = 1
SHINGLE = 3
PII_EXAMPLES = 5

# ---------------------------------------------------------------------------------------- dedup


def _dedup_key(data: dict[str, Any]) -> str:
    """Normalised content: canonical JSON with whitespace runs collapsed."""
    return hashlib.sha256(" ".join(canonical_json(data).split()).encode()).hexdigest()


def shingles(text: str, k: int = SHINGLE) -> set[bytes]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < k:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i : i + k]).encode() for i in range(len(words) - k + 1)}


@dataclass
class DedupResult:
    kept: list[Record]
    exact_dups: int
    near_dups: int
    removed: list[str] = field(default_factory=list)  # locations of removed records (first few)


def dedup(records: list[Record], *, threshold: float, near: bool = True) -> DedupResult:
    """Drop exact duplicates (normalised content), then near duplicates (MinHash LSH, Jaccard of
    word 3-gram shingles >= ``threshold``). The first occurrence is kept."""
    seen: set[str] = set()
    unique: list[Record] = []
    removed: list[str] = []
    for r in records:
        key = _dedup_key(r.data)
        if key in seen:
            removed.append(r.loc)
            continue
        seen.add(key)
        unique.append(r)
    exact = len(records) - len(unique)
    if not near or len(unique) < 2:
        return DedupResult(unique, exact, 0, removed[:PII_EXAMPLES])

    from datasketch import MinHash, MinHashLSH

    # LSH only proposes candidates; a lower band threshold weighted against false negatives keeps
    # recall high near ``threshold``, and the MinHash Jaccard estimate makes the final call.
    lsh = MinHashLSH(threshold=max(0.5, threshold - 0.2), num_perm=NUM_PERM, weights=(0.2, 0.8))
    hashes: dict[int, MinHash] = {}
    kept: list[Record] = []
    for i, r in enumerate(unique):
        sh = shingles(record_text(r.data))
        if not sh:
            kept.append(r)
            continue
        m = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED)
        m.update_batch(sorted(sh))
        if any(hashes[j].jaccard(m) >= threshold for j in lsh.query(m)):
            removed.append(r.loc)
            continue
        lsh.insert(i, m)
        hashes[i] = m
        kept.append(r)
    return DedupResult(kept, exact, len(unique) - len(kept), removed[:PII_EXAMPLES])


def remove_overlap(eval_records: list[Record], train: list[Record]) -> tuple[list[Record], int]:
    """Drop eval records whose normalised content also appears in train (leakage)."""
    keys = {_dedup_key(r.data) for r in train}
    kept = [r for r in eval_records if _dedup_key(r.data) not in keys]
    return kept, len(eval_records) - len(kept)


# ------------------------------------------------------------------------------------------ PII

PII_KINDS = ("secret", "email", "iban", "card", "ip", "phone")
PLACEHOLDERS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "card": "[CARD]",
    "iban": "[IBAN]",
    "ip": "[IP]",
    "secret": "[SECRET]",
}

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}\b"
)
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,5}"  # +44 20 7946 0958
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"  # (555) 123-4567
    r"|\d{3}[ .-]\d{3}[ .-]\d{4}"  # 555-123-4567
    r")(?![\w-])"
)
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_TOKEN_SECRETS = re.compile(
    r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style
    r"|AKIA[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,}"  # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{40,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r")"
)
_KEYED_SECRET = re.compile(
    r"(?i)\b(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?key|auth[_-]?token|token|password|"
    r"passwd|pwd)\b[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9_\-/+=.]{16,})"
)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "").upper()
    if not (15 <= len(s) <= 34 and s[:2].isalpha() and s[2:4].isdigit() and s.isalnum()):
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def entropy(s: str) -> float:
    counts = Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


def _card_spans(text: str) -> list[tuple[int, int]]:
    out = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1:
            out.append(m.span())
    return out


def _iban_spans(text: str) -> list[tuple[int, int]]:
    out = []
    for m in _IBAN.finditer(text):
        chars = [(i, c) for i, c in enumerate(m.group()) if c != " "]
        for n in range(len(chars), 14, -1):  # the regex may swallow a trailing capitalised word
            if iban_ok("".join(c for _, c in chars[:n])):
                out.append((m.start(), m.start() + chars[n - 1][0] + 1))
                break
    return out


def _ip_spans(text: str) -> list[tuple[int, int]]:
    out = []
    for m in _IPV4.finditer(text):
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        out.append(m.span())
    for m in _IPV6.finditer(text):
        cand = m.group()
        if sum(c.isalnum() for c in cand) < 3:
            continue
        try:
            ipaddress.IPv6Address(cand)
        except ValueError:
            continue
        out.append(m.span())
    return out


def _secret_spans(text: str) -> list[tuple[int, int]]:
    out = [m.span() for m in _TOKEN_SECRETS.finditer(text)]
    for m in _KEYED_SECRET.finditer(text):
        value = m.group(1)
        has_mix = any(c.isdigit() for c in value) and any(c.isalpha() for c in value)
        if has_mix and entropy(value) >= 3.0:
            out.append(m.span(1))
    return out


def _regex(pattern: re.Pattern[str]) -> Callable[[str], list[tuple[int, int]]]:
    return lambda text: [m.span() for m in pattern.finditer(text)]


_FINDERS: dict[str, Callable[[str], list[tuple[int, int]]]] = {
    "secret": _secret_spans,
    "email": _regex(_EMAIL),
    "iban": _iban_spans,
    "card": _card_spans,
    "ip": _ip_spans,
    "phone": _regex(_PHONE),
}


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """Non-overlapping (kind, start, end) matches; earlier kinds in PII_KINDS win overlaps."""
    taken: list[tuple[str, int, int]] = []
    for kind in PII_KINDS:
        for s, e in _FINDERS[kind](text):
            if all(e <= ts or s >= te for _, ts, te in taken):
                taken.append((kind, s, e))
    return sorted(taken, key=lambda t: t[1])


def redact(text: str) -> tuple[str, list[str]]:
    """Replace every match with its placeholder; returns the new text and the kinds found."""
    found = find_pii(text)
    out, pos = [], 0
    for kind, s, e in found:
        out.append(text[pos:s])
        out.append(PLACEHOLDERS[kind])
        pos = e
    out.append(text[pos:])
    return "".join(out), [k for k, _, _ in found]


def _map_texts(data: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    if "text" in data:
        return {**data, "text": fn(data["text"])}
    return {
        k: [{**m, "content": fn(m["content"])} for m in v] if isinstance(v, list) else v
        for k, v in data.items()
    }


def scan_pii(records: list[Record], *, mode: str) -> tuple[list[Record], dict[str, Any]]:
    """Count PII per kind (with the first few record locations); with mode 'redact' return
    records whose texts have the matches replaced by placeholders. Mode 'off' does nothing."""
    if mode == "off":
        return records, {"mode": "off", "total": 0, "records": 0, "kinds": {}}
    kinds: dict[str, dict[str, Any]] = {}
    n_records = 0
    out: list[Record] = []
    for r in records:
        found_here: list[str] = []

        def fix(text: str, found_here: list[str] = found_here) -> str:
            new, kinds_found = redact(text)
            found_here.extend(kinds_found)
            return new

        new_data = _map_texts(r.data, fix)
        if found_here:
            n_records += 1
            for kind, count in Counter(found_here).items():
                entry = kinds.setdefault(kind, {"count": 0, "records": 0, "lines": []})
                entry["count"] += count
                entry["records"] += 1
                if len(entry["lines"]) < PII_EXAMPLES:
                    entry["lines"].append(r.loc)
        if mode == "redact" and found_here:
            out.append(Record(r.file, r.line, r.format, new_data, r.loc))
        else:
            out.append(r)
    total = sum(e["count"] for e in kinds.values())
    ordered = {k: kinds[k] for k in PII_KINDS if k in kinds}
    return out, {"mode": mode, "total": total, "records": n_records, "kinds": ordered}
