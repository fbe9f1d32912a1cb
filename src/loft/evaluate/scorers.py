"""Scorers: pure functions from (prediction, reference) to a score in [0, 1]. No torch.

A generated answer is often wrapped: surrounding whitespace, a ```json fence, or trailing text after
the object (the model kept talking). ``parse_json_object`` takes the first complete JSON object that
starts at or after the first "{", so the JSON scorers judge the answer, not its packaging.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from loft.core.errors import ConfigError
from loft.evaluate.rouge import rouge_l

_DECODER = json.JSONDecoder()


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The first complete JSON object in ``text`` (from its first "{"), or None if there is none."""
    start = text.find("{")
    while start != -1:
        try:
            obj, _end = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return obj if isinstance(obj, dict) else None
    return None


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the prediction equals the reference after stripping surrounding whitespace."""
    return float(pred.strip() == ref.strip())


def json_exact_match(pred: str, ref: str) -> float:
    """1.0 when both parse as JSON objects and are equal (key order and spacing do not matter)."""
    p, r = parse_json_object(pred), parse_json_object(ref)
    return float(p is not None and r is not None and p == r)


def json_field_accuracy(pred: str, ref: str) -> dict[str, float]:
    """Per key of the reference object: 1.0 if the prediction has that key with an equal value.

    An unparseable prediction scores 0.0 on every key; an unparseable reference gives ``{}``.
    """
    r = parse_json_object(ref)
    if r is None:
        return {}
    p = parse_json_object(pred) or {}
    return {k: float(k in p and p[k] == v) for k, v in r.items()}


SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "json_exact_match": json_exact_match,
    "rouge_l": rouge_l,
}


def get_scorer(name: str) -> Callable[[str, str], float]:
    """Look up a scorer by name; unknown names raise a ConfigError listing the known ones."""
    try:
        return SCORERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown metric {name!r}", hint=f"Choose one of: {', '.join(sorted(SCORERS))}."
        ) from None
