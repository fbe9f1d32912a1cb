"""Alias moves with an append-only history, and rollback by walking that history.

Every move is one JSON line in ``LOFT_HOME/registry/<name>/history.jsonl`` (appended and fsynced
under the model's lock): who, when, alias, from, to, why, gate results, forced, rollback. A gated
promotion adds ``passed`` and ``gate_source``; a promotion the gate refused is recorded too, with
``event: promote-refused``, though nothing moved. Deletions and traffic splits share the file.
Every history event is also one entry of the audit trail (``audit_action``).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

from loft.core import audit
from loft.core.errors import IntegrityError, NotFoundError
from loft.registry.names import check_alias, check_name, model_dir
from loft.registry.store import MlflowReader, _aliases, _lock, client, get_version, reader

HISTORY = "history.jsonl"


def append_history(name: str, entry: dict[str, Any], *, context: dict | None = None) -> None:
    """Append one event (an alias move, a promotion or its refusal, a deletion, a traffic
    split) to the model's history.jsonl, fsynced, and to the audit trail as ``entry["who"]``
    (``context``, e.g. the portal's ``{"via", "ip"}``, goes into the audit entry's details)."""
    path = model_dir(name) / HISTORY
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry, sort_keys=True, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    action, target = audit_action(name, entry)
    details = {k: v for k, v in entry.items() if k not in ("who", "when")}
    audit.append(audit.who(entry.get("who")), action, target, {**details, **(context or {})})


def audit_action(name: str, entry: dict[str, Any]) -> tuple[str, str]:
    """The audit trail's action and target for a history event."""
    event = entry.get("event")
    if "deleted" in entry:
        return "registry.delete", f"{name}:{entry['deleted']}"
    if event == "split":
        return "registry.split", f"{name}:{entry.get('to')}"
    if event == "split-cleared":
        return "registry.split_clear", name
    if event == "promote-refused":
        return "registry.promote_refused", f"{name}:{entry.get('to')}"
    if "gate_source" in entry:  # a move by loft.evaluate.promotion
        return "registry.promote", f"{name}:{entry.get('to')}"
    if entry.get("rollback"):
        return "registry.rollback", f"{name}@{entry.get('alias')}"
    return "registry.alias", f"{name}@{entry.get('alias')}"


def move_alias(
    name: str,
    alias: str,
    version: int,
    *,
    reason: str = "",
    gate: list[dict] | None = None,
    forced: bool = False,
    actor: str | None = None,
    rollback: bool = False,
    extra: dict[str, Any] | None = None,
    context: dict | None = None,
) -> dict[str, Any]:
    """Point ``alias`` of model ``name`` at ``version`` and record the move (history and audit
    trail; ``extra``: more keys for the entry, e.g. a promotion's); returns the entry."""
    check_name(name)
    check_alias(alias)
    target = get_version(f"{name}:{version}", verify=False)
    c = client()
    with _lock(name):
        previous = _aliases(MlflowReader(c), name).get(alias)
        c.set_registered_model_alias(name, alias, str(target.version))
        entry = {
            "who": audit.who(actor),
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "alias": alias,
            "from": previous,
            "to": target.version,
            "why": reason,
            "gate": gate,
            "forced": forced,
            "rollback": rollback,
            **(extra or {}),
        }
        append_history(name, entry, context=context)
    return entry


def record_refusal(
    name: str,
    alias: str,
    version: int,
    previous: int | None,
    *,
    reason: str = "",
    gate: list[dict] | None = None,
    gate_source: str = "",
    actor: str | None = None,
    context: dict | None = None,
) -> dict[str, Any]:
    """Record a promotion of ``name:version`` to ``alias`` that the gate refused (nothing
    moves; ``previous`` still holds the alias) in the history and the audit trail."""
    entry = {
        "who": audit.who(actor),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "event": "promote-refused",
        "alias": alias,
        "from": previous,
        "to": version,
        "why": reason or "refused by the gate",
        "gate": gate,
        "passed": False,
        "gate_source": gate_source,
        "forced": False,
        "rollback": False,
    }
    with _lock(name):
        append_history(name, entry, context=context)
    return entry


def history(name: str) -> list[dict[str, Any]]:
    """Every recorded alias move of model ``name``, oldest first."""
    check_name(name)
    _aliases(reader(), name)  # NotFoundError when the model is not registered
    path = model_dir(name) / HISTORY
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise IntegrityError(f"{path}:{i} is not valid JSON ({e}).") from None
    return out


def previous_version(name: str, alias: str) -> int | None:
    """The version ``alias`` pointed at before its latest (not undone) move.

    Replays the history as a stack: a move pushes the version it moved away from; a rollback
    pops one, so repeated rollbacks walk further back instead of toggling between two versions.
    """
    stack: list[int | None] = []
    for entry in history(name):
        if entry.get("alias") != alias or entry.get("event") == "promote-refused":
            continue
        if entry.get("rollback"):
            if stack:
                stack.pop()
        else:
            stack.append(entry.get("from"))
    return stack[-1] if stack else None


def rollback(
    name: str,
    alias: str = "champion",
    *,
    reason: str = "rollback",
    actor: str | None = None,
    context: dict | None = None,
) -> dict[str, Any]:
    """Move ``alias`` back to the version it pointed at before its latest move (``actor``: who
    the history and audit trail record, default the OS user; ``context``: see append_history)."""
    check_name(name)
    check_alias(alias)
    target = previous_version(name, alias)
    if target is None:
        raise NotFoundError(
            f"{alias!r} of {name!r} has no previous version to roll back to.",
            hint=f"See its moves with `loft registry history {name}`.",
        )
    get_version(f"{name}:{target}", verify=True)  # never roll back onto a tampered version
    return move_alias(
        name, alias, target, reason=reason, rollback=True, actor=actor, context=context
    )
