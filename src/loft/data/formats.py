"""Record formats: detect them and convert a parsed record to loft's canonical form. Pure.

Canonical ``Record.data`` by format:

- ``chat``, ``sharegpt``, ``alpaca`` → ``{"messages": [{"role", "content"}, ...]}``
  (alpaca: user = instruction + "\\n\\n" + input when input is non-empty; assistant = output)
- ``completion`` → ``{"text": str}`` (trained on whole)
- ``preference`` → ``{"prompt": messages, "chosen": messages, "rejected": messages}``
- ``kto`` → ``{"prompt": messages, "completion": messages, "label": bool}`` (unpaired: one
  completion judged desirable (true) or not; KTO's format)

A preference or kto prompt given as a string is one user message; a completion (chosen, rejected,
completion) given as a string is one assistant message.

Which formats an objective trains on: :func:`layout_for` and :func:`check_layout`.

Problems are ``(field, reason)`` pairs; the reader prefixes them with ``FILE:LINE``. Field names
are the user's own (``conversations[2].from`` for sharegpt, not loft's internal names).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from loft.core.errors import DataError
from loft.data.validate import Problem, check_conversation, check_kto, check_preference

FORMATS = ("chat", "sharegpt", "alpaca", "completion", "preference", "kto")
SFT_FORMATS = ("chat", "sharegpt", "alpaca", "completion")
PREFERENCE_FORMATS = ("preference", "kto")  # paired, unpaired

# The rows an objective trains on: sft (input_ids + labels), paired (dpo, orpo, simpo: prompt,
# chosen and rejected ids) or unpaired (kto: prompt and completion ids with a label).
Layout = Literal["sft", "paired", "unpaired"]
OBJECTIVES = ("auto", "sft", "dpo", "kto", "orpo", "simpo")

# What each format looks like, for error messages.
FORMAT_SHAPES = {
    "chat": "messages (a list of {role, content})",
    "sharegpt": "conversations (a list of {from, value})",
    "alpaca": "instruction + output (+ optional input)",
    "completion": "text",
    "preference": "prompt + chosen + rejected",
    "kto": "prompt + completion + label",
}

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class Record:
    """One valid record: where it came from, its detected format and its canonical data."""

    file: str
    line: int  # 1-based line (text files) or 0-based row index (parquet)
    format: str
    data: dict[str, Any]
    loc: str = ""  # "FILE:LINE" or "FILE:row N", for messages

    def __post_init__(self) -> None:
        if not self.loc:
            self.loc = f"{self.file}:{self.line}"

    @property
    def row(self) -> int:
        return self.line


def apply_column_map(obj: dict[str, Any], column_map: dict[str, str] | None) -> dict[str, Any]:
    """Rename file columns to loft fields; unmapped columns keep their names."""
    if not column_map:
        return obj
    return {column_map.get(k, k): v for k, v in obj.items()}


def detect_format(obj: dict[str, Any]) -> str | None:
    """The format a record's keys point at, or None. Signature keys, most specific first."""
    keys = {k for k, v in obj.items() if v is not None}
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "completion" in keys:  # a missing label is then reported as such, not "unknown format"
        return "kto"
    if "instruction" in keys or "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "completion"
    return None


def unknown_format_reason(obj: dict[str, Any]) -> str:
    found = ", ".join(sorted(str(k) for k in obj)) or "no fields"
    shapes = "; ".join(f"{s} ({f})" for f, s in FORMAT_SHAPES.items())
    return f"cannot tell the format: found {found}; expected one of: {shapes}"


def to_canonical(obj: dict[str, Any], fmt: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Convert one parsed record of format ``fmt`` to canonical data, or report why not."""
    if fmt == "chat":
        return _chat(obj)
    if fmt == "sharegpt":
        return _sharegpt(obj)
    if fmt == "alpaca":
        return _alpaca(obj)
    if fmt == "completion":
        return _completion(obj)
    if fmt == "preference":
        return _preference(obj)
    if fmt == "kto":
        return _kto(obj)
    raise ValueError(f"unknown format {fmt!r}")


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _maybe_json_list(value: Any) -> Any:
    """CSV/Parquet cells hold nested lists as JSON text; decode those, leave anything else."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _text(value: Any) -> str | None:
    """A message content: a string, or OpenAI content parts [{type: text, text}] joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return "".join(p["text"] for p in value)
    return None


def _message_list(
    value: Any, field: str, role_key: str, content_key: str, role_names: dict[str, str] | None
) -> tuple[list[dict[str, str]] | None, list[Problem]]:
    """Parse a list of message dicts into [{role, content}] with structural checks only."""
    value = _maybe_json_list(value)
    if value is None:
        return None, [(field, "missing field")]
    if not isinstance(value, list):
        return None, [(field, f"expected a list of messages, got {_type_name(value)}")]
    if not value:
        return None, [(field, "empty list, expected at least one user and one assistant message")]
    problems: list[Problem] = []
    out: list[dict[str, str]] = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            problems.append(
                (
                    where,
                    f"expected an object with {role_key} and {content_key}, got {_type_name(m)}",
                )
            )
            continue
        role, content = m.get(role_key), m.get(content_key)
        if role is None:
            problems.append((f"{where}.{role_key}", "missing field"))
        elif not isinstance(role, str):
            problems.append((f"{where}.{role_key}", f"expected a string, got {_type_name(role)}"))
        elif role_names is not None and role not in role_names:
            allowed = ", ".join(role_names)
            problems.append((f"{where}.{role_key}", f"unknown role {role!r} (allowed: {allowed})"))
            role = None
        text = _text(content)
        if content is None:
            problems.append((f"{where}.{content_key}", "missing field"))
        elif text is None:
            problems.append(
                (f"{where}.{content_key}", f"expected a string, got {_type_name(content)}")
            )
        if isinstance(role, str) and text is not None:
            out.append({"role": role_names[role] if role_names else role, "content": text})
    return (None if problems else out), problems


def _conversation(
    value: Any, field: str, role_key: str, content_key: str, role_names: dict[str, str] | None
) -> tuple[dict[str, Any] | None, list[Problem]]:
    messages, problems = _message_list(value, field, role_key, content_key, role_names)
    if messages is None:
        return None, problems
    problems = check_conversation(messages, field=field, role_key=role_key, content_key=content_key)
    return (None if problems else {"messages": messages}), problems


def _chat(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, list[Problem]]:
    return _conversation(obj.get("messages"), "messages", "role", "content", None)


def _sharegpt(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, list[Problem]]:
    return _conversation(obj.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)


def _string_field(obj: dict[str, Any], key: str, *, required: bool) -> tuple[str, list[Problem]]:
    value = obj.get(key)
    if value is None:
        return "", ([(key, "missing field")] if required else [])
    if not isinstance(value, str):
        return "", [(key, f"expected a string, got {_type_name(value)}")]
    if required and not value.strip():
        return "", [(key, "empty content")]
    return value, []


def _alpaca(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, list[Problem]]:
    instruction, p1 = _string_field(obj, "instruction", required=True)
    extra, p2 = _string_field(obj, "input", required=False)
    output, p3 = _string_field(obj, "output", required=True)
    problems = p1 + p2 + p3
    if problems:
        return None, problems
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages}, []


def _completion(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, list[Problem]]:
    text, problems = _string_field(obj, "text", required=True)
    return (None if problems else {"text": text}), problems


def _side(obj: dict[str, Any], key: str, role: str) -> tuple[list[dict[str, str]] | None, list]:
    """A prompt (``role`` user) or a completion (``role`` assistant): a string or messages."""
    value = _maybe_json_list(obj.get(key))
    if isinstance(value, str):
        if not value.strip():
            return None, [(key, "empty content")]
        return [{"role": role, "content": value}], []
    if value is None:
        return None, [(key, "missing field")]
    if not isinstance(value, list):
        return None, [(key, f"expected a string or a list of messages, got {_type_name(value)}")]
    if not value:
        return None, [(key, f"empty list, expected at least one {role} message")]
    return _message_list(value, key, "role", "content", None)


def _preference(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, list[Problem]]:
    chosen, p2 = _side(obj, "chosen", "assistant")
    rejected, p3 = _side(obj, "rejected", "assistant")
    if obj.get("prompt") is None and chosen and rejected and not (p2 or p3):
        # Implicit prompt (both sides are whole conversations): the shared prefix is the prompt.
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            return None, [("prompt", "missing field (and chosen/rejected share no prefix)")]
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        p1: list[Problem] = []
    else:
        prompt, p1 = _side(obj, "prompt", "user")
    problems = p1 + p2 + p3
    if problems or prompt is None or chosen is None or rejected is None:
        return None, problems
    problems = check_preference(prompt, chosen, rejected)
    if problems:
        return None, problems
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, []


def _label(value: Any) -> tuple[bool | None, list[Problem]]:
    """A boolean; CSV cells (text) may say true/false in any case."""
    if isinstance(value, bool):
        return value, []
    if value is None:
        return None, [("label", "missing field")]
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true", []
    got = _type_name(value)
    if isinstance(value, str | int | float):
        got += f" {value!r}"
    return None, [("label", f"expected true (desirable) or false (undesirable), got {got}")]


def _kto(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, list[Problem]]:
    prompt, p1 = _side(obj, "prompt", "user")
    completion, p2 = _side(obj, "completion", "assistant")
    label, p3 = _label(obj.get("label"))
    problems = p1 + p2 + p3
    if problems or prompt is None or completion is None or label is None:
        return None, problems
    problems = check_kto(prompt, completion)
    if problems:
        return None, problems
    return {"prompt": prompt, "completion": completion, "label": label}, []


def layout_for(objective: str, file_format: str | None) -> Layout:
    """The rows ``objective`` trains on; ``auto`` follows the file (pairs for a preference
    file, unpaired rows for a kto file, else sft)."""
    if objective not in OBJECTIVES:
        raise DataError(
            f"unknown objective {objective!r}", hint=f"Use one of: {', '.join(OBJECTIVES)}"
        )
    if objective == "auto":
        return {"preference": "paired", "kto": "unpaired"}.get(file_format or "", "sft")
    if objective == "sft":
        return "sft"
    return "unpaired" if objective == "kto" else "paired"


def check_layout(path: str, fmt: str | None, layout: Layout) -> None:
    """Refuse a file whose format the objective cannot train on."""
    if fmt is None:
        return  # nothing valid was recognised: the problems say why
    if layout == "sft" and fmt in PREFERENCE_FORMATS:
        shape = "prompt/chosen/rejected" if fmt == "preference" else "prompt/completion/label"
        raise DataError(
            f"{path}: {fmt} data ({shape}) is for preference tuning, with `objective: "
            "dpo|kto|orpo|simpo`; supervised fine-tuning (objective: sft) needs chat, sharegpt, "
            "alpaca or completion records",
            hint="Set objective: dpo (or kto, orpo, simpo) in the config, or run "
            "`loft data prepare FILE --objective dpo`; `loft data validate FILE` checks the file.",
        )
    if layout == "paired" and fmt == "kto":
        raise DataError(
            f"{path}: a paired objective on unpaired data: dpo, orpo and simpo need a chosen and "
            "a rejected completion of the same prompt, and this file's rows are unpaired "
            "(prompt/completion/label)",
            hint="Use objective: kto for unpaired rows, or a preference file "
            "(prompt/chosen/rejected).",
        )
    if layout != "sft" and fmt not in PREFERENCE_FORMATS:
        raise DataError(
            f"{path}: {fmt} records hold no preferences; preference objectives need "
            "prompt/chosen/rejected pairs (dpo, orpo, simpo; kto too) or prompt/completion/label "
            "rows (kto)",
            hint="Use objective: sft for this file.",
        )


def canonical_json(data: dict[str, Any]) -> str:
    """The normalised record as one stable string (for hashing, dedup and fingerprints)."""
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def record_text(data: dict[str, Any]) -> str:
    """All human text of a canonical record, in order (for near-dup shingles and PII scans)."""
    if "text" in data:
        return data["text"]
    parts: list[str] = []
    for key in ("messages", "prompt", "chosen", "rejected", "completion"):
        parts.extend(m["content"] for m in data.get(key, []))
    return "\n".join(parts)
