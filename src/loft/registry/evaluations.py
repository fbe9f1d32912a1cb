"""Evaluation entries on a version's card: every measured number with what it was measured on.

A gate may only compare numbers measured on the same thing. Each entry records one metric's value
and ``on``: the kind of measurement (a held-out file, the training run's eval split, an lm-eval
task, the canary audit), the fingerprint of exactly what was scored (for a file: the sha256 of the
records evaluated, so ``--n 5`` and the whole file differ), how many records, and the settings that
change the number (``max_new_tokens`` for generation metrics, lm-eval's ``limit``). Two entries are
comparable when their ``basis`` — a digest of ``on`` without the file's path — is equal.

Entries with ``basis: null`` (metrics declared by hand at registration, or a training run's final
train loss, which depends on the run itself) can satisfy an absolute check but never a relative
one. Pure: no torch, no mlflow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from loft import __version__

# which settings change which metric: the rest of a run's settings do not enter its basis
GENERATION_SETTINGS = ("max_new_tokens",)
LOSS_METRICS = ("eval_loss", "perplexity")
# log-ratios against a reference model: the reference (a version, or the base) is their setting
PREFERENCE_METRICS = ("preference_accuracy", "reward_margin")
PREFERENCE_SETTINGS = ("reference",)


def basis_of(on: Mapping[str, Any] | None) -> str | None:
    """A short digest of what a number was measured on (without where the file lay)."""
    if not on or on.get("kind") in (None, "declared", "run"):
        return None
    key = {k: v for k, v in on.items() if k != "path"}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def records_fingerprint(records: Iterable[Any]) -> str:
    """sha256 of the records exactly as scored (canonical JSON, in order)."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def on_data(
    path: str, fingerprint: str, records: int, metric: str, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """``on`` for ``metric`` scored on ``records`` records of a held-out file."""
    keys = (
        ()
        if metric in LOSS_METRICS
        else PREFERENCE_SETTINGS
        if metric in PREFERENCE_METRICS
        else GENERATION_SETTINGS
    )
    relevant = {k: settings[k] for k in keys}
    return {
        "kind": "data",
        "path": path,
        "fingerprint": fingerprint,
        "records": records,
        "settings": relevant,
    }


def make_entries(
    metrics: Mapping[str, float],
    *,
    on: Mapping[str, Any] | None,
    source: str,
    mlflow_run_id: str | None = None,
    on_for: Any = None,
) -> list[dict[str, Any]]:
    """One entry per metric; ``on_for(metric)`` gives a per-metric ``on`` (else ``on``)."""
    when = datetime.now(UTC).isoformat(timespec="seconds")
    out = []
    for metric, value in metrics.items():
        where = dict(on_for(metric) if on_for is not None else (on or {"kind": "declared"}))
        out.append(
            {
                "metric": metric,
                "value": value,  # checked (a finite number) when it is recorded
                "on": where,
                "basis": basis_of(where),
                "source": source,
                "time": when,
                "loft_version": __version__,
                "mlflow_run_id": mlflow_run_id,
            }
        )
    return out


def entries_of(card: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The card's entries, oldest first; a card from before entries existed yields its flat
    ``metrics`` as basis-less entries (usable by absolute checks only)."""
    entries = card.get("evaluations")
    if isinstance(entries, list):
        return [e for e in entries if isinstance(e, dict) and "metric" in e]
    legacy = card.get("metrics") or {}
    return make_entries(legacy, on={"kind": "declared"}, source="legacy")


def latest(entries: Iterable[Mapping[str, Any]], metric: str) -> Mapping[str, Any] | None:
    found = None
    for e in entries:
        if e["metric"] == metric:
            found = e
    return found


def latest_values(entries: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The newest value of every metric (what ``metrics`` on a card summarises)."""
    return {e["metric"]: float(e["value"]) for e in entries}


def comparable(
    entry: Mapping[str, Any], others: Iterable[Mapping[str, Any]]
) -> Mapping[str, Any] | None:
    """The newest of ``others`` measuring ``entry``'s metric on ``entry``'s basis (None when
    there is none, or ``entry`` has no basis)."""
    basis = entry.get("basis")
    found = None
    for e in others:
        if basis and e["metric"] == entry["metric"] and e.get("basis") == basis:
            found = e
    return found


def describe(on: Mapping[str, Any] | None) -> str:
    """``heldout.jsonl (4 records, 3f2a…)`` and the like, for tables and refusal messages."""
    if not on:
        return "unknown data"
    kind = on.get("kind")
    fp = str(on.get("fingerprint") or "")[:12]
    settings = on.get("settings") or {}
    extra = "".join(f", {k}={v}" for k, v in sorted(settings.items()))
    if kind == "data":
        name = str(on.get("path") or "?").rsplit("/", 1)[-1]
        return f"{name} ({on.get('records')} records{extra}, {fp})"
    if kind == "train-eval-split":
        return f"training eval split ({on.get('records')} records of dataset {fp})"
    if kind == "lm-eval":
        return f"lm-eval {on.get('task')} (limit {on.get('limit') or 'all'})"
    if kind == "canaries":
        return f"canaries of dataset {fp} ({on.get('candidates')} candidates)"
    if kind == "run":
        return f"training run {on.get('run_id') or '?'}"
    return "declared at registration"


def versus(card: Mapping[str, Any], champion: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Each metric of ``card`` (its newest entry) beside the champion's number measured on the
    same basis: ``{metric, value, on, champion, delta, comparable}``; ``champion`` and ``delta``
    are None where the champion has no comparable number (or there is no champion)."""
    mine = entries_of(card)
    theirs = entries_of(champion) if champion is not None else []
    rows = []
    for metric in dict.fromkeys(e["metric"] for e in mine):
        entry = latest(mine, metric)
        assert entry is not None
        other = comparable(entry, theirs)
        value = float(entry["value"])
        rows.append({
            "metric": metric,
            "value": value,
            "on": describe(entry.get("on")),
            "champion": float(other["value"]) if other is not None else None,
            "delta": value - float(other["value"]) if other is not None else None,
            "comparable": other is not None,
        })  # fmt: skip
    return rows
