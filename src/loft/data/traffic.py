"""Training records from production traffic: the model server's audit log, with the ratings its
clients posted, turned back into chat records (``loft data from-audit``).

A served chat request is a record when the server logged its text (``log_prompts`` on: the
request's ``messages`` and the ``completion``) and it succeeded with one choice; its answer
becomes the assistant turn. Ratings (``/v1/feedback`` lines: ``about`` the request's id, a
``score`` in [0, 1]) are averaged per request; ``min_score`` keeps only requests rated at least
that (unrated ones are left out then). The output is the chat JSONL every loft command reads;
``loft data validate`` / ``prepare`` then deduplicate and check it like any other file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError, NotFoundError
from loft.core.paths import atomic_write_text

CHAT_ENDPOINT = "/v1/chat/completions"
FEEDBACK_ENDPOINT = "/v1/feedback"


@dataclass
class Harvest:
    """The records kept, and why every other served chat request was left out."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    read: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kept": len(self.records), "read": self.read, "skipped": dict(self.skipped)}


def _lines(paths: Iterable[str | Path]) -> Iterable[tuple[str, int, dict[str, Any]]]:
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise NotFoundError(
                f"audit log not found: {p}",
                hint="The server writes LOFT_HOME/serve/audit.jsonl (or the serve config's "
                "audit_log).",
            )
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written as we read
                if isinstance(rec, dict):
                    yield str(p), i, rec


def _model_of(resolved: Any) -> str | None:
    return (
        str(resolved).rpartition(":")[0] if isinstance(resolved, str) and ":" in resolved else None
    )


def from_audit(
    paths: Iterable[str | Path],
    *,
    model: str | None = None,
    min_score: float | None = None,
    since: str | None = None,
) -> Harvest:
    """Chat records from the audit logs at ``paths`` (see the module's docstring); ``model``: only
    requests a version of this registered model answered; ``since``: an ISO time (UTC)."""
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise ConfigError(f"--min-score {min_score}: a score is between 0 and 1")
    paths = list(paths)
    ratings: dict[str, list[float]] = {}
    for _, _, rec in _lines(paths):  # ratings may come after (or in another log than) the request
        if rec.get("endpoint") == FEEDBACK_ENDPOINT and isinstance(rec.get("score"), int | float):
            ratings.setdefault(str(rec.get("about")), []).append(float(rec["score"]))
    out = Harvest()
    for _, _, rec in _lines(paths):
        if rec.get("endpoint") != CHAT_ENDPOINT:
            continue
        out.read += 1
        why = _skip(rec, model=model, since=since)
        if not why and min_score is not None:
            scores = ratings.get(str(rec.get("request_id")))
            if not scores:
                why = "not rated"
            elif sum(scores) / len(scores) < min_score:
                why = f"rated below {min_score:g}"
        if why:
            out.skipped[why] += 1
            continue
        messages = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
        out.records.append(
            {"messages": [*messages, {"role": "assistant", "content": rec["completion"]}]}
        )
    return out


def _skip(rec: dict[str, Any], *, model: str | None, since: str | None) -> str:
    """Why this served chat request is no record ('' when it is one)."""
    if rec.get("status") != 200:
        return "failed request"
    if model is not None and _model_of(rec.get("resolved")) != model:
        return "another model"
    if since is not None and str(rec.get("time") or "") < since:
        return "before --since"
    if not isinstance(rec.get("messages"), list) or not isinstance(rec.get("completion"), str):
        return "no text logged (log_prompts off)"
    if (rec.get("n") or 1) != 1:
        return "several choices"
    if not rec["completion"].strip():
        return "empty answer"
    if rec["messages"] and rec["messages"][-1].get("role") == "assistant":
        return "ends with an assistant turn"
    return ""


def write_records(records: list[dict[str, Any]], out: str | Path) -> Path:
    """The records as chat JSONL at ``out``, written whole or not at all."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


__all__ = ["Harvest", "from_audit", "write_records"]
