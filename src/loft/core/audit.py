"""The audit trail: every state change, one JSON line each, in ``LOFT_HOME/audit/trail.jsonl``.

A line is ``{seq, ts, actor, action, target, details, prev, hash}``: ``seq`` counts from 1, ``ts``
is UTC ISO 8601, ``prev`` is the previous line's ``hash`` (64 zeros for the first) and ``hash`` is
the sha256 of the entry without ``hash`` as canonical JSON (keys sorted, no spaces, UTF-8; see
``canonical``). Editing, deleting or reordering a line breaks the chain at that line and ``verify``
names it. Cutting lines off the end leaves a shorter chain that still verifies: compare its last
hash with one copied elsewhere earlier to tell (the portal's audit page shows it).

Appends hold an exclusive ``flock`` on the file, read the last line, write one line with a single
``write`` and fsync it, so writers in any number of processes extend one unbroken chain.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loft.core.errors import IntegrityError

GENESIS = "0" * 64
FIELDS = ("seq", "ts", "actor", "action", "target", "details", "prev", "hash")
_BLOCK = 64 * 1024


def who(actor: str | None = None) -> str:
    """The actor to record: ``actor`` when given, else the OS user ($LOFT_USER, else the login
    name), else ``unknown``."""
    if actor:
        return actor
    if os.environ.get("LOFT_USER"):
        return os.environ["LOFT_USER"]
    try:
        import getpass

        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def trail_path() -> Path:
    """``LOFT_HOME/audit/trail.jsonl`` (the folder is created; the file on the first append)."""
    from loft.core.paths import loft_home

    folder = loft_home() / "audit"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "trail.jsonl"


def canonical(entry: dict[str, Any]) -> bytes:
    """The bytes that are hashed: JSON with sorted keys, no whitespace, UTF-8."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    """sha256 (hex) of ``entry`` without its ``hash`` field."""
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def append(
    actor: str,
    action: str,
    target: str,
    details: dict[str, Any] | None = None,
    *,
    path: Path | None = None,
) -> dict[str, Any]:
    """Append one entry and return it (with its ``seq`` and ``hash``), durable on return.

    Raises IntegrityError, appending nothing, when the trail's last line is not a whole entry
    (the chain would continue from something unverifiable).
    """
    for name, value in (("actor", actor), ("action", action)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"audit {name} must be a non-empty string, got {value!r}")
    if not isinstance(target, str):
        raise ValueError(f"audit target must be a string, got {target!r}")
    path = Path(path) if path is not None else trail_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            last = _last_entry(f, path)
            entry: dict[str, Any] = {
                "seq": last["seq"] + 1 if last else 1,
                "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "actor": actor,
                "action": action,
                "target": target,
                # through JSON once, so the hash covers exactly what a reader will parse back
                "details": json.loads(json.dumps(details or {}, default=str)),
                "prev": last["hash"] if last else GENESIS,
            }
            entry["hash"] = entry_hash(entry)
            line = json.dumps(entry, separators=(",", ":"), ensure_ascii=False) + "\n"
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return entry


def _last_entry(f: Any, path: Path) -> dict[str, Any] | None:
    """The last line of the open trail as an entry; None for an empty file."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        return None
    end = os.pread(f.fileno(), 1, size - 1)
    line = next(_lines_backwards(f.fileno(), size), b"")
    try:
        entry = json.loads(line) if end == b"\n" else None
    except ValueError:
        entry = None
    if not isinstance(entry, dict) or not _well_formed(entry):
        raise IntegrityError(
            f"{path}: the last line is not a complete audit entry (a crash mid-write, or an "
            "edit); nothing was appended.",
            hint="Find the first bad line with loft.core.audit.verify() (the portal's audit page "
            "runs it), move the file aside and keep it as evidence; a new trail starts on the "
            "next change.",
        )
    return entry


def _well_formed(entry: dict[str, Any]) -> bool:
    return (
        set(entry) == set(FIELDS)
        and isinstance(entry["seq"], int)
        and isinstance(entry["hash"], str)
        and isinstance(entry["prev"], str)
    )


def _lines_backwards(fd: int, size: int) -> Iterator[bytes]:
    """The file's non-empty lines, last first, read in blocks from the end."""
    tail = b""
    pos = size
    while pos > 0:
        step = min(_BLOCK, pos)
        pos -= step
        parts = (os.pread(fd, step, pos) + tail).split(b"\n")
        tail = parts[0]
        for line in reversed(parts[1:]):
            if line.strip():
                yield line
    if tail.strip():
        yield tail


def verify(path: Path | None = None) -> tuple[bool, int, int | None, str]:
    """Check the whole chain: ``(ok, entries, first_bad, reason)``.

    ``entries`` is the number of lines read; ``first_bad`` the 1-based line number of the first
    line that is not valid JSON, lacks a field, has a wrong ``seq``, a ``prev`` that is not the
    line before's ``hash``, or a ``hash`` that does not match its content. A missing file is an
    empty, valid trail.
    """
    path = Path(path) if path is not None else trail_path()
    if not path.is_file():
        return True, 0, None, "no audit trail yet"
    prev, n = GENESIS, 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            problem = _check_line(raw, n, prev)
            if problem:
                return False, n, n, f"line {n}: {problem}"
            prev = json.loads(raw)["hash"]
    return True, n, None, f"{n} entries, chain intact"


def _check_line(raw: bytes, n: int, prev: str) -> str | None:
    if not raw.endswith(b"\n"):
        return "incomplete (no newline at the end: a write was cut short)"
    try:
        entry = json.loads(raw)
    except ValueError as e:
        return f"not valid JSON ({e})"
    if not isinstance(entry, dict) or set(entry) != set(FIELDS):
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        return f"fields {got}, expected {list(FIELDS)}"
    if entry["seq"] != n:
        return f"seq is {entry['seq']}, expected {n} (a line was removed, added or moved)"
    if entry["prev"] != prev:
        return "prev is not the hash of the line before (a line was removed or moved)"
    if entry["hash"] != entry_hash(entry):
        return "hash does not match the entry's content (the line was edited)"
    return None


def read(
    limit: int = 50,
    offset: int = 0,
    actor: str | None = None,
    action: str | None = None,
    *,
    path: Path | None = None,
) -> list[dict[str, Any]]:
    """Entries newest first, optionally only one ``actor`` and/or ``action``; skip ``offset``
    matches, return at most ``limit``. Reads from the end, so the first pages are fast however
    long the trail is. Lines that are not JSON are skipped here (``verify`` reports them)."""
    path = Path(path) if path is not None else trail_path()
    if limit < 1 or offset < 0 or not path.is_file():
        return []
    out: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        for line in _lines_backwards(f.fileno(), os.fstat(f.fileno()).st_size):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            if (actor is not None and entry.get("actor") != actor) or (
                action is not None and entry.get("action") != action
            ):
                continue
            if offset:
                offset -= 1
                continue
            out.append(entry)
            if len(out) == limit:
                break
    return out


def head(path: Path | None = None) -> dict[str, Any] | None:
    """The newest entry (its ``seq`` and ``hash`` anchor the chain), or None."""
    newest = read(1, path=path)
    return newest[0] if newest else None


__all__ = ["GENESIS", "append", "canonical", "entry_hash", "head", "read", "trail_path", "verify"]
