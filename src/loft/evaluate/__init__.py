"""Evaluation: pure scorers and a batched greedy generation harness.

``loft.evaluate.scorers`` has no torch import; the harness names are imported lazily so that
``from loft.evaluate import json_exact_match`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loft.evaluate.scorers import (
    SCORERS,
    exact_match,
    get_scorer,
    json_exact_match,
    json_field_accuracy,
    parse_json_object,
)

if TYPE_CHECKING:
    from loft.evaluate.harness import (
        EvalResult,
        GenerationStats,
        evaluate_generation,
        generate,
        load_jsonl_records,
    )

_HARNESS = {
    "EvalResult",
    "GenerationStats",
    "evaluate_generation",
    "generate",
    "load_jsonl_records",
}

__all__ = [
    "SCORERS",
    "EvalResult",
    "GenerationStats",
    "evaluate_generation",
    "exact_match",
    "generate",
    "get_scorer",
    "json_exact_match",
    "json_field_accuracy",
    "load_jsonl_records",
    "parse_json_object",
]


def __getattr__(name: str) -> Any:
    if name in _HARNESS:
        from loft.evaluate import harness

        return getattr(harness, name)
    raise AttributeError(f"module 'loft.evaluate' has no attribute {name!r}")
