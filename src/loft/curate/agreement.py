"""Agreement between annotators, in pure Python: Cohen's kappa for two annotators and
Krippendorff's alpha for any number of them with missing values (nominal or interval distance).

Both follow their textbook definitions (Cohen 1960; Krippendorff, "Computing Krippendorff's
Alpha-Reliability", 2011): tests/test_curate.py checks the published worked examples.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from typing import Any, Literal

from loft.curate.questions import Question, comparable

Level = Literal["nominal", "interval"]


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two annotators' labels of the same items, ``a[i]`` and ``b[i]``;
    None when it is undefined (no items, or both always gave one and the same label)."""
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa needs paired labels; got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[c] * count_b[c] for c in count_a) / (n * n)
    if expected == 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def krippendorff_alpha(
    units: Sequence[Sequence[Hashable | float]], level: Level = "nominal"
) -> float | None:
    """Krippendorff's alpha over ``units``, each the values its annotators gave (missing values
    simply left out). Units with fewer than two values are not pairable and do not count.
    None when undefined (fewer than two pairable values, or no variation at all)."""
    if level not in ("nominal", "interval"):
        raise ValueError(f"level must be nominal or interval, got {level!r}")
    coincidence: dict[tuple, float] = defaultdict(float)
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, c in enumerate(values):
            for j, k in enumerate(values):
                if i != j:
                    coincidence[(c, k)] += 1.0 / (m - 1)
    totals: dict = defaultdict(float)
    for (c, _k), o in coincidence.items():
        totals[c] += o
    n = sum(totals.values())
    if n < 2:
        return None

    def distance(c: Hashable | float, k: Hashable | float) -> float:
        if level == "nominal":
            return 0.0 if c == k else 1.0
        return (float(c) - float(k)) ** 2  # type: ignore[arg-type]

    observed = sum(o * distance(c, k) for (c, k), o in coincidence.items()) / n
    expected = sum(
        nc * nk * distance(c, k) for c, nc in totals.items() for k, nk in totals.items()
    ) / (n * (n - 1))
    if expected == 0.0:
        return None
    return 1.0 - observed / expected


def by_question(
    questions: list[Question], submissions: list[list[tuple[str, dict[str, Any]]]]
) -> dict[str, Any]:
    """Per question, over ``submissions`` (per record: ``(annotator, answers)`` of each
    submission): Krippendorff's alpha over records with two or more answers (interval for
    ratings, nominal otherwise; a ranking by its first choice; corrections are free text and not
    measured) and Cohen's kappa for each pair of annotators that share records."""
    out: dict[str, Any] = {}
    for q in questions:
        if q.kind == "correction":
            continue
        units: list[list[Any]] = []
        pairs: dict[tuple[str, str], tuple[list, list]] = defaultdict(lambda: ([], []))
        for record in submissions:
            done = [(a, comparable(q, ans[q.name])) for a, ans in record if q.name in ans]
            if len(done) < 2:
                continue
            units.append([v for _, v in done])
            for i, (a, va) in enumerate(done):
                for b, vb in done[i + 1 :]:
                    pairs[(a, b)][0].append(va)
                    pairs[(a, b)][1].append(vb)
        level: Level = "interval" if q.kind == "rating" else "nominal"
        out[q.name] = {
            "kind": q.kind,
            "level": level,
            "records": len(units),
            "alpha": krippendorff_alpha(units, level),
            "kappa": [
                {"annotators": [a, b], "records": len(x), "kappa": cohen_kappa(x, y)}
                for (a, b), (x, y) in sorted(pairs.items())
            ],
        }
    return out
