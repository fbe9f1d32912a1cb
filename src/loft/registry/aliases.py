"""Alias moves with an append-only history, and rollback by walking that history.

Every move is one JSON line in ``LOFT_HOME/registry/<name>/history.jsonl`` (appended and fsynced
under the model's lock): who, when, alias, from, to, why, gate results, forced, rollback.
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


def append_history(name: str, entry: dict[str, Any]) -> None:
    """Append one event (an alias move, a deletion) to the model's history.jsonl, fsynced."""
    path = model_dir(name) / HISTORY
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry, sort_keys=True, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


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
) -> dict[str, Any]:
    """Point ``alias`` of model ``name`` at ``version`` and record the move; returns the entry."""
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
        }
        append_history(name, entry)
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
        if entry.get("alias") != alias:
            continue
        if entry.get("rollback"):
            if stack:
                stack.pop()
        else:
            stack.append(entry.get("from"))
    return stack[-1] if stack else None


def rollback(
    name: str, alias: str = "champion", *, reason: str = "rollback", actor: str | None = None
) -> dict[str, Any]:
    """Move ``alias`` back to the version it pointed at before its latest move (``actor``: who
    the history records; default the OS user)."""
    check_name(name)
    check_alias(alias)
    target = previous_version(name, alias)
    if target is None:
        raise NotFoundError(
            f"{alias!r} of {name!r} has no previous version to roll back to.",
            hint=f"See its moves with `loft registry history {name}`.",
        )
    get_version(f"{name}:{target}", verify=True)  # never roll back onto a tampered version
    return move_alias(name, alias, target, reason=reason, rollback=True, actor=actor)
