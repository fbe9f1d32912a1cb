"""What a labelling project is made of: the project, one task per record per assigned annotator,
and how records are assigned.

Assignment: with annotators ``a_0..a_{A-1}`` and overlap N (N <= A), record i goes to
``a_{(i*N + j) mod A}`` for j < N: N distinct annotators per record, and loads that differ by at
most one record.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from loft.core.errors import ConfigError
from loft.curate.questions import Question


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Project:
    name: str
    dataset: str  # name:version
    layout: str
    records: int
    guidelines: str
    questions: tuple[Question, ...]
    overlap: int
    annotators: tuple[str, ...]
    suggestions: str
    created_by: str
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["questions"] = [q.to_dict() for q in self.questions]
        d["annotators"] = list(self.annotators)
        return d

    def question(self, name: str | None, kinds: tuple[str, ...]) -> Question:
        """The question named ``name``, else the first of ``kinds``; ConfigError if none fits."""
        for q in self.questions:
            if (name is None or q.name == name) and q.kind in kinds:
                return q
        raise ConfigError(
            f"project {self.name!r} has no {'/'.join(kinds)} question"
            + (f" named {name!r}" if name else "")
            + f"; its questions: {', '.join(f'{q.name} ({q.kind})' for q in self.questions)}."
        )


@dataclass(frozen=True)
class Task:
    project: str
    record: int
    annotator: str
    status: str
    answers: dict[str, Any]
    updated_at: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def assign(records: int, annotators: list[str], overlap: int) -> Iterator[tuple[int, str]]:
    """``(record, annotator)`` pairs: each record to ``overlap`` distinct annotators."""
    a = len(annotators)
    for i in range(records):
        for j in range(overlap):
            yield i, annotators[(i * overlap + j) % a]


def task_of(row: sqlite3.Row) -> Task:
    return Task(
        row["project"], row["record"], row["annotator"], row["status"],
        json.loads(row["answers"]) if row["answers"] else {}, row["updated_at"],
    )  # fmt: skip
