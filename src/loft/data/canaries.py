"""Canaries for a memorisation audit (Carlini et al., "The Secret Sharer", 2019). Pure.

A canary is a random secret of a fixed shape, ``the access code for vault {vault} is {secret}``
with ``secret`` a string of ``SECRET_DIGITS`` random digits. ``data.canaries: N`` inserts N canary
conversations into the training split; after training, ``loft audit canaries`` ranks each true
secret against random secrets of the *same shape* (same prefix, same number of digits), which is
why the shape is fixed and recorded in ``canaries.json`` beside the prepared dataset.
"""

from __future__ import annotations

import random
from typing import Any

SHAPE = "the access code for vault {vault} is {secret}"
QUESTION = "What is the access code for vault {vault}?"
SECRET_DIGITS = 8
VAULT_DIGITS = 4
CANARIES_FILE = "canaries.json"


def canary_text(vault: int | str, secret: str) -> str:
    return SHAPE.format(vault=vault, secret=secret)


def random_secret(rng: random.Random, digits: int = SECRET_DIGITS) -> str:
    return "".join(rng.choice("0123456789") for _ in range(digits))


def make_canaries(n: int, seed: int) -> list[str]:
    """``n`` canary sentences with distinct vault numbers; the same ``seed`` gives the same list."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    low, high = 10 ** (VAULT_DIGITS - 1), 10**VAULT_DIGITS - 1
    if n > high - low + 1:
        raise ValueError(f"at most {high - low + 1} canaries, got {n}")
    vaults = rng.sample(range(low, high + 1), n)
    return [canary_text(v, random_secret(rng)) for v in vaults]


def parse_canary(text: str) -> tuple[str, str]:
    """(vault, secret) of a canary sentence; ValueError when it is not of the canary shape."""
    head, sep, secret = text.rpartition(" is ")
    lead = "the access code for vault "
    if not sep or not head.startswith(lead) or not secret.isdigit():
        raise ValueError(f"{text!r} is not a canary of shape {SHAPE!r}")
    return head[len(lead) :], secret


def canary_messages(text: str, secret: str | None = None) -> list[dict[str, str]]:
    """The canary conversation; ``secret`` replaces the true secret (for candidates)."""
    vault, true_secret = parse_canary(text)
    answer = canary_text(vault, true_secret if secret is None else secret)
    return [
        {"role": "user", "content": QUESTION.format(vault=vault)},
        {"role": "assistant", "content": answer},
    ]


def canary_records(canaries: list[str]) -> list[dict[str, Any]]:
    """Chat records (canonical ``{"messages": [...]}``): the user asks, the assistant answers."""
    return [{"messages": canary_messages(c)} for c in canaries]


def canaries_doc(canaries: list[str], seed: int) -> dict[str, Any]:
    """What ``canaries.json`` holds: the strings and the shape random candidates are drawn from."""
    return {
        "kind": "loft.canaries",
        "shape": SHAPE,
        "question": QUESTION,
        "secret_digits": SECRET_DIGITS,
        "seed": seed,
        "canaries": list(canaries),
    }
