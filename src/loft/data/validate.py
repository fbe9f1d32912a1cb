"""Semantic checks on conversations and the one way problems are reported. Pure.

Turn-order rules (documented in ``loft data validate --help`` too):

- roles are ``system``, ``user``, ``assistant``; a system message is allowed only first;
- after the optional system message the conversation starts with a user turn: an assistant turn
  with nothing before it has no prompt to learn from (torchtune rejects it the same way);
- user and assistant alternate: two consecutive user (or assistant) messages are an error;
- the conversation ends with an assistant turn: a trailing user turn has no reply to train on;
- every content is non-empty (not just whitespace).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from loft.core.errors import DataError

Problem = tuple[str, str]  # (field, reason)

ROLES = ("system", "user", "assistant")
MAX_SHOWN = 20


def check_conversation(
    messages: list[dict[str, str]],
    *,
    field: str = "messages",
    role_key: str = "role",
    content_key: str = "content",
) -> list[Problem]:
    """Every problem with one SFT conversation, in the user's field names."""
    problems: list[Problem] = []
    for i, m in enumerate(messages):
        role = m["role"]
        if role not in ROLES:
            reason = f"unknown role {role!r} (allowed: {', '.join(ROLES)})"
            problems.append((f"{field}[{i}].{role_key}", reason))
        elif role == "system" and i > 0:
            problems.append(
                (
                    f"{field}[{i}].{role_key}",
                    f"system message at index {i}; a system message is "
                    "allowed only as the first message",
                )
            )
        if not m["content"].strip():
            problems.append((f"{field}[{i}].{content_key}", "empty content"))
    if problems:
        return problems
    return _turn_order(messages, field)


def _turn_order(messages: list[dict[str, str]], field: str) -> list[Problem]:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return [(field, "no assistant turn to train on")]
    prev: int | None = None
    for i, role in enumerate(roles):
        if role == "system":
            continue
        if prev is None and role == "assistant":
            return [
                (
                    field,
                    f"assistant message at index {i} comes before any user message; start "
                    "with a user turn (after an optional system message)",
                )
            ]
        if prev is not None and roles[prev] == role:
            return [(field, f"two consecutive {role} messages at index {i} and {prev}")]
        prev = i
    if roles[-1] != "assistant":
        last = len(roles) - 1
        return [
            (
                field,
                f"ends with a {roles[-1]} message at index {last}; the last message must "
                "be an assistant reply to train on",
            )
        ]
    return []


def _check_prompt(prompt: list[dict[str, str]]) -> list[Problem]:
    """A preference/KTO prompt: the SFT rules, except that it ends with the user turn the
    completions answer (a trailing assistant turn would be trained as if the model had said it)."""
    problems: list[Problem] = []
    for i, m in enumerate(prompt):
        if m["role"] not in ROLES:
            problems.append(
                (f"prompt[{i}].role", f"unknown role {m['role']!r} (allowed: {', '.join(ROLES)})")
            )
        elif m["role"] == "system" and i > 0:
            problems.append(
                (
                    f"prompt[{i}].role",
                    f"system message at index {i}; a system message is allowed only as the "
                    "first message",
                )
            )
        if not m["content"].strip():
            problems.append(
                (f"prompt[{i}].content" if len(prompt) > 1 else "prompt", "empty content")
            )
    if problems:
        return problems
    roles = [m["role"] for m in prompt]
    if roles[-1] != "user":
        last = len(roles) - 1
        an = "an" if roles[-1][0] in "aeiou" else "a"
        return [
            (
                "prompt",
                f"ends with {an} {roles[-1]} message at index {last}; a conversational prompt "
                "must end with the user turn that the completions answer",
            )
        ]
    order = _turn_order([*prompt, {"role": "assistant", "content": "x"}], "prompt")
    return order


def _check_completion(key: str, side: list[dict[str, str]]) -> list[Problem]:
    problems: list[Problem] = []
    for i, m in enumerate(side):
        one = len(side) == 1
        if m["role"] != "assistant":
            reason = f"expected role 'assistant', got {m['role']!r}"
            problems.append((f"{key}[{i}].role", reason))
        if not m["content"].strip():
            problems.append((key if one else f"{key}[{i}].content", "empty content"))
    return problems


def _normalised(side: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(m["role"], " ".join(m["content"].split())) for m in side]


def check_preference(
    prompt: list[dict[str, str]], chosen: list[dict[str, str]], rejected: list[dict[str, str]]
) -> list[Problem]:
    """A preference pair: the prompt ends with a user turn; chosen and rejected are non-empty
    assistant turns, and they differ (identical sides give the loss nothing to prefer)."""
    problems = _check_prompt(prompt)
    problems += _check_completion("chosen", chosen) + _check_completion("rejected", rejected)
    if not problems and _normalised(chosen) == _normalised(rejected):
        problems.append(
            (
                "rejected",
                "identical to chosen (ignoring whitespace); a pair must prefer one reply over "
                "a different one",
            )
        )
    return problems


def check_kto(prompt: list[dict[str, str]], completion: list[dict[str, str]]) -> list[Problem]:
    """An unpaired (KTO) row: the prompt rules of a pair, one non-empty assistant completion."""
    return _check_prompt(prompt) + _check_completion("completion", completion)


_KINDS = {
    "preference": "paired (prompt/chosen/rejected)",
    "kto": "unpaired (prompt/completion/label)",
}


def mixed_format_problems(
    formats: list[tuple[str, str]],
) -> tuple[str | None, list[tuple[int, str]], set[int]]:
    """``formats`` is [(loc, format)] in file order. Returns the majority format, the problems
    to report as (index, reason), and the indices of every record of another format (all
    invalid). Ties go to the format seen first. Each record of another format is reported, except
    paired rows in an unpaired file or the reverse: one problem, at the first of them, with
    their count."""
    if not formats:
        return None, [], set()
    counts = Counter(f for _, f in formats)
    first_seen = {f: i for i, (_, f) in reversed(list(enumerate(formats)))}
    majority = max(counts, key=lambda f: (counts[f], -first_seen[f]))
    n = len(formats)
    out: list[tuple[int, str]] = []
    off: set[int] = set()
    for i, (_, fmt) in enumerate(formats):
        if fmt == majority:
            continue
        off.add(i)
        if {fmt, majority} == set(_KINDS):
            if i == first_seen[fmt]:
                out.append((i, _mixed_kinds(fmt, majority, counts, n)))
            continue
        out.append(
            (
                i,
                f"format {fmt!r} differs from the file's majority format {majority!r} "
                f"({counts[majority]} of {n} records); one file must use one format",
            )
        )
    return majority, out, off


def _mixed_kinds(fmt: str, majority: str, counts: Counter, n: int) -> str:
    more = counts[fmt] - 1
    rest = f" (and {more} more after it)" if more else ""
    return (
        f"{_KINDS[fmt]} row{rest} in a file of {_KINDS[majority]} rows ({counts[majority]} of "
        f"{n} records); one file must hold one kind: pairs for dpo, orpo and simpo (kto can "
        "derive its rows from pairs), or unpaired rows for kto"
    )


@dataclass
class ValidationReport:
    """The result of reading one file: its format, how many records parse, every problem."""

    path: str
    format: str | None
    n_records: int  # records seen (valid + invalid)
    n_valid: int
    problems: list[str] = field(default_factory=list)
    n_invalid: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def problems_message(problems: list[str], n_invalid: int, n_records: int, what: str) -> str:
    """The head of a DataError: the first MAX_SHOWN problems and how many more there are."""
    shown = problems[:MAX_SHOWN]
    head = f"{n_invalid} invalid of {n_records} records" if n_records else "no records"
    lines = [f"{what}: {head}:"]
    lines += [f"  {p}" for p in shown]
    if len(problems) > MAX_SHOWN:
        rest = len(problems) - MAX_SHOWN
        lines.append(f"  … and {rest} more ({n_invalid} invalid of {n_records} records)")
    return "\n".join(lines)


def raise_for_problems(problems: list[str], n_invalid: int, n_records: int, what: str) -> None:
    if not problems:
        return
    raise DataError(
        problems_message(problems, n_invalid, n_records, what),
        problems=list(problems),
        hint="Fix the records above, or pass --skip-invalid (data.skip_invalid: true) to train "
        "on the valid records only.",
    )
