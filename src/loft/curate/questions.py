"""Pure parts of labelling: the questions a project asks, what a record shows an annotator
(its prompt and its candidate responses), checking answers, and when answers agree.

A record of any canonical layout becomes a prompt and one or more responses: a chat record's
prompt is every message before its last assistant turn, which is its one response; a preference
record's responses are its chosen and rejected completions (in that order: index 0 is chosen);
a KTO record's response is its completion. Answers name responses by these indices; the page
shows them in a fixed shuffled order per record so position tells an annotator nothing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any

from loft.core.errors import ConfigError

KINDS = ("rating", "label", "correction", "pairwise", "ranking")
KIND_HELP = {
    "rating": "a score from 1 to scale (scale 2-10)",
    "label": "one label from a set of 2-9 labels",
    "correction": "free text that replaces the assistant turn (empty keeps it)",
    "pairwise": "which of two or more responses is better",
    "ranking": "all responses ordered best first",
}
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
CHOICE_KINDS = ("pairwise", "ranking")
STATUSES = ("pending", "draft", "submitted", "discarded")


@dataclass(frozen=True)
class Question:
    name: str
    kind: str
    text: str = ""
    scale: int = 0  # rating: 1..scale
    labels: tuple[str, ...] = ()  # label: the set

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "labels": list(self.labels)}


def parse_questions(raw: Any) -> list[Question]:
    """Questions from JSON-like dicts (``{"name", "kind", "text", "scale", "labels"}``); every
    problem reported at once."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            "a labelling project needs a list of one or more questions.",
            hint='e.g. [{"name": "better", "kind": "pairwise", "text": "Which answer is better?"}]',
        )
    problems: list[str] = []
    out: list[Question] = []
    seen: set[str] = set()
    for i, q in enumerate(raw):
        where = f"questions[{i}]"
        if not isinstance(q, dict):
            problems.append(f"{where}: expected an object, got {type(q).__name__}")
            continue
        unknown = sorted(set(q) - {"name", "kind", "text", "scale", "labels"})
        if unknown:
            problems.append(f"{where}: unknown keys {', '.join(unknown)}")
        name, kind = q.get("name"), q.get("kind")
        if not isinstance(name, str) or not NAME_RE.match(name):
            problems.append(
                f"{where}.name: {name!r} is not a name (lowercase letters, digits, . _ -)"
            )
        elif name in seen:
            problems.append(f"{where}.name: {name!r} is used twice")
        seen.add(str(name))
        if kind not in KINDS:
            kinds = "; ".join(f"{k} ({KIND_HELP[k]})" for k in KINDS)
            problems.append(f"{where}.kind: {kind!r} is not one of: {kinds}")
            continue
        text = q.get("text") or ""
        if not isinstance(text, str):
            problems.append(f"{where}.text: expected text")
            text = ""
        scale, labels = q.get("scale", 0), q.get("labels") or []
        if kind == "rating" and not (isinstance(scale, int) and 2 <= scale <= 10):
            problems.append(f"{where}.scale: a rating needs a scale from 2 to 10, got {scale!r}")
        if kind == "label":
            ok = isinstance(labels, list) and all(isinstance(x, str) and x.strip() for x in labels)
            if not ok or not 2 <= len(labels) <= 9 or len(set(labels)) != len(labels):
                problems.append(f"{where}.labels: a label question needs 2-9 distinct labels")
        out.append(
            Question(
                str(name), kind, text.strip(), scale if kind == "rating" else 0,
                tuple(x.strip() for x in labels) if kind == "label" else (),
            )
        )  # fmt: skip
    if problems:
        raise ConfigError("invalid questions:\n  " + "\n  ".join(problems))
    return out


def record_parts(record: dict[str, Any]) -> tuple[list[dict], list[list[dict]]]:
    """``(prompt messages, responses)`` of a canonical record; each response is a list of
    assistant messages."""
    if "chosen" in record and "rejected" in record:
        return list(record["prompt"]), [list(record["chosen"]), list(record["rejected"])]
    if "completion" in record:
        return list(record["prompt"]), [list(record["completion"])]
    if "messages" in record:
        messages = list(record["messages"])
        if messages and messages[-1].get("role") == "assistant":
            return messages[:-1], [messages[-1:]]
        return messages, []
    if "text" in record:
        return [], [[{"role": "assistant", "content": record["text"]}]]
    return [], []


def response_text(response: list[dict]) -> str:
    return "\n\n".join(str(m.get("content", "")) for m in response)


def display_order(project: str, record: int, n: int) -> list[int]:
    """The order the page shows ``n`` responses in: a shuffle fixed by project and record."""
    key = f"{project}\0{record}\0"
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{key}{i}".encode()).hexdigest())


def check_answers(
    questions: list[Question], answers: Any, n_responses: int, *, complete: bool
) -> dict[str, Any]:
    """The answers normalised; ConfigError listing every problem. ``complete`` (a submission)
    needs every question but corrections answered."""
    if not isinstance(answers, dict):
        raise ConfigError("answers must be an object: question name -> answer.")
    by_name = {q.name: q for q in questions}
    problems = [f"{k}: no such question" for k in answers if k not in by_name]
    out: dict[str, Any] = {}
    for q in questions:
        value = answers.get(q.name)
        if value is None or value == "":
            if complete and q.kind != "correction":
                problems.append(f"{q.name}: not answered ({KIND_HELP[q.kind]})")
            continue
        problem = _check_one(q, value, n_responses)
        if problem:
            problems.append(f"{q.name}: {problem}")
        else:
            out[q.name] = list(value) if q.kind == "ranking" else value
    if problems:
        raise ConfigError("invalid answers:\n  " + "\n  ".join(problems))
    return out


def _check_one(q: Question, value: Any, n: int) -> str | None:
    if q.kind == "rating":
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= q.scale:
            return f"expected a whole number from 1 to {q.scale}, got {value!r}"
    elif q.kind == "label":
        if value not in q.labels:
            return f"expected one of {', '.join(q.labels)}, got {value!r}"
    elif q.kind == "correction":
        if not isinstance(value, str):
            return "expected text"
    elif q.kind == "pairwise":
        if n < 2:
            return "this record has fewer than two responses to choose between"
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
            return f"expected a response index from 0 to {n - 1}, got {value!r}"
    elif q.kind == "ranking":
        if n < 2:
            return "this record has fewer than two responses to rank"
        if not isinstance(value, list) or sorted(value) != list(range(n)):
            return f"expected every response index 0-{n - 1} once, best first, got {value!r}"
    return None


def comparable(q: Question, value: Any) -> Any:
    """What agreement compares: the value itself; a ranking's first choice; stripped text."""
    if q.kind == "ranking":
        return value[0]
    if q.kind == "correction":
        return value.strip()
    return value


def same(questions: list[Question], a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two submissions agree on every question (a ranking on its whole order)."""
    for q in questions:
        x, y = a.get(q.name), b.get(q.name)
        if q.kind == "correction":
            x, y = (x or "").strip(), (y or "").strip()
        if x != y:
            return False
    return True


def suggestions(layout: str, questions: list[Question], n_responses: int) -> dict[str, Any]:
    """Answers prefilled from the record itself, marked as suggestions on the page: a
    preference record's chosen response (index 0) for pairwise and ranking questions."""
    out: dict[str, Any] = {}
    if layout != "preference" or n_responses < 2:
        return out
    for q in questions:
        if q.kind == "pairwise":
            out[q.name] = 0
        elif q.kind == "ranking":
            out[q.name] = list(range(n_responses))
    return out
