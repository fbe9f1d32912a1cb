"""The audit trail: every state change, one hash-chained entry each.

An entry is ``{seq, ts, actor, action, target, details, prev, hash}`` and, when an HMAC key is
configured, ``hmac``: ``seq`` counts from 1, ``ts`` is UTC ISO 8601 (milliseconds), ``prev`` is
the previous entry's ``hash`` (64 zeros for the first), ``hash`` is the sha256 of the entry
without ``hash`` and ``hmac`` as canonical JSON (keys sorted, no spaces, UTF-8; see
``canonical``) and ``hmac`` is HMAC-SHA256 of ``hash`` (hex) under the key. Editing, deleting,
inserting or reordering an entry breaks the chain there and ``verify`` names it. Cutting entries
off the end leaves a shorter chain that still verifies: compare its last hash with one copied
elsewhere earlier to tell (``loft audit verify`` prints it; so does the portal's audit page).

Where the trail lives (``trail_url``):

- embedded (default): ``LOFT_HOME/audit/trail.jsonl``, one JSON line an entry. Appends hold an
  exclusive ``flock`` on the file, read the last line, write one line with a single ``write``
  and fsync it, so writers in any number of processes extend one unbroken chain.
- team: a PostgreSQL table (``loft.core.audit_db``) with the same fields and chain, when
  ``LOFT_AUDIT_URL`` / ``audit.url`` is a ``postgresql://`` URL, or, when neither is set, when the
  job queue is on PostgreSQL (``LOFT_JOBS_URL`` / ``jobs.url``): every machine of a team writes
  one trail. ``LOFT_AUDIT_URL=file`` keeps the file even then.

The HMAC key (``LOFT_AUDIT_HMAC_KEY_FILE`` / ``audit.hmac_key_file``, at least 32 bytes) must lie
outside LOFT_HOME: someone who can rewrite the trail but cannot read the key can no longer
recompute the chain end to end without ``verify`` noticing.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError, IntegrityError

GENESIS = "0" * 64
FIELDS = ("seq", "ts", "actor", "action", "target", "details", "prev", "hash")
HMAC = "hmac"
MIN_KEY_BYTES = 32
KEY_ENV, KEY_SETTING = "LOFT_AUDIT_HMAC_KEY_FILE", "audit.hmac_key_file"
URL_ENV, URL_SETTING = "LOFT_AUDIT_URL", "audit.url"
_BLOCK = 64 * 1024
_PG = ("postgresql://", "postgres://")


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


def trail_url() -> str | None:
    """The PostgreSQL URL the trail lives in, or None for the file (see the module docstring)."""
    from loft.core.settings import setting

    raw = setting(URL_ENV, URL_SETTING)
    if raw is None or raw == "":
        jobs = setting("LOFT_JOBS_URL", "jobs.url")
        return str(jobs) if isinstance(jobs, str) and jobs.startswith(_PG) else None
    if raw == "file":
        return None
    if isinstance(raw, str) and raw.startswith(_PG):
        return raw
    raise ConfigError(
        f"{URL_SETTING} ({URL_ENV} or settings.yaml) is {raw!r}; expected a postgresql:// URL "
        "or `file` (LOFT_HOME/audit/trail.jsonl).",
        hint="Unset it to keep the trail with the job queue (or in the file when the queue is "
        "SQLite).",
    )


def location(path: Path | None = None) -> str:
    """Where the trail is, for messages: the file, or the database URL without its password."""
    if path is not None:
        return str(path)
    url = trail_url()
    if url is None:
        return str(trail_path())
    from loft.core.settings import redact

    return f"{redact(url)} (table loft_audit)"


def hmac_key() -> bytes | None:
    """The HMAC key's bytes, or None when no key file is configured. A key file that is missing,
    shorter than 32 bytes or inside LOFT_HOME is a ConfigError saying which and why."""
    from loft.core.paths import loft_home
    from loft.core.settings import setting

    raw = setting(KEY_ENV, KEY_SETTING)
    if raw is None or raw == "":
        return None
    where = f"{KEY_SETTING} ({KEY_ENV} or settings.yaml)"
    path = Path(str(raw)).expanduser()
    home = loft_home().resolve()
    if path.resolve().is_relative_to(home):
        raise ConfigError(
            f"{where} is {path}, inside LOFT_HOME ({home}): whoever can rewrite the audit trail "
            "there could read the key too, and the HMAC would prove nothing.",
            hint="Keep the key where the loft processes can read it and the data directory's "
            "other users cannot, e.g. /etc/loft/audit-hmac.key (chmod 600).",
        )
    try:
        key = path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"{where} is {path}, which cannot be read: {e.strerror}.",
            hint=f"Create one: head -c 32 /dev/urandom > {path}; chmod 600 {path}",
        ) from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"{where} is {path}, which holds {len(key)} bytes; an HMAC key needs at least "
            f"{MIN_KEY_BYTES}.",
            hint=f"Create one: head -c 32 /dev/urandom > {path}; chmod 600 {path}",
        )
    return key


def canonical(entry: dict[str, Any]) -> bytes:
    """The bytes that are hashed: JSON with sorted keys, no whitespace, UTF-8."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    """sha256 (hex) of ``entry`` without its ``hash`` and ``hmac`` fields."""
    body = {k: v for k, v in entry.items() if k not in ("hash", HMAC)}
    return hashlib.sha256(canonical(body)).hexdigest()


def entry_hmac(key: bytes, digest: str) -> str:
    """HMAC-SHA256 (hex) of an entry's ``hash`` under ``key``."""
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


def _maker(
    actor: str, action: str, target: str, details: dict[str, Any] | None, key: bytes | None
) -> Callable[[dict[str, Any] | None], dict[str, Any]]:
    """A function from the trail's last entry (None: empty) to the next one, hashed and signed."""
    # through JSON once, so the hash covers exactly what a reader will parse back
    body = json.loads(json.dumps(details or {}, default=str))

    def make(last: dict[str, Any] | None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "seq": last["seq"] + 1 if last else 1,
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "actor": actor,
            "action": action,
            "target": target,
            "details": body,
            "prev": last["hash"] if last else GENESIS,
        }
        entry["hash"] = entry_hash(entry)
        if key is not None:
            entry[HMAC] = entry_hmac(key, entry["hash"])
        return entry

    return make


def append(
    actor: str,
    action: str,
    target: str,
    details: dict[str, Any] | None = None,
    *,
    path: Path | None = None,
) -> dict[str, Any]:
    """Append one entry and return it (with its ``seq`` and ``hash``), durable on return.

    ``path`` forces a file (tests); otherwise the configured trail. Raises IntegrityError,
    appending nothing, when the trail's last entry is not a whole entry (the chain would continue
    from something unverifiable)."""
    for name, value in (("actor", actor), ("action", action)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"audit {name} must be a non-empty string, got {value!r}")
    if not isinstance(target, str):
        raise ValueError(f"audit target must be a string, got {target!r}")
    make = _maker(actor, action, target, details, hmac_key())
    url = None if path is not None else trail_url()
    if url is not None:
        from loft.core.audit_db import PgTrail

        trail = PgTrail(url)

        def make_after_row(last: dict[str, Any] | ValueError | None) -> dict[str, Any]:
            if isinstance(last, ValueError) or (last is not None and not _well_formed(last)):
                raise broken_head(trail.where, "the newest row")
            return make(last)

        return trail.append(make_after_row)
    path = Path(path) if path is not None else trail_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            entry = make(_last_entry(f, path))
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
        raise broken_head(str(path), "the last line")
    return entry


def broken_head(where: str, what: str) -> IntegrityError:
    return IntegrityError(
        f"{where}: {what} is not a complete audit entry (a crash mid-write, or an edit); "
        "nothing was appended.",
        hint="Find the first bad entry with `loft audit verify`, move the trail aside and keep "
        "it as evidence; a new trail starts on the next change.",
    )


def _well_formed(entry: dict[str, Any]) -> bool:
    return (
        set(entry) - {HMAC} == set(FIELDS)
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


# ----------------------------------------------------------------------------- verify


class Chain:
    """Checks entries in order: the chain (seq, prev, hash) and, with ``key``, the HMACs. Every
    entry from the first signed one on must be signed, and a non-empty trail must have one, so a
    chain rewritten (or cut down to its unsigned start) without the key fails."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key
        self.prev = GENESIS
        self.n = 0
        self.signed_from: int | None = None
        self.unchecked = 0

    def check(self, entry: Any) -> str | None:
        """The problem with the next entry, or None (then it is the chain's new head)."""
        n = self.n + 1
        if not isinstance(entry, dict) or set(entry) - {HMAC} != set(FIELDS):
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            return f"fields {got}, expected {list(FIELDS)}"
        if entry["seq"] != n:
            return f"seq is {entry['seq']}, expected {n} (an entry was removed, added or moved)"
        if entry["prev"] != self.prev:
            return "prev is not the hash of the entry before (an entry was removed or moved)"
        if entry["hash"] != entry_hash(entry):
            return "hash does not match the entry's content (the entry was edited)"
        mac = entry.get(HMAC)
        if self.key is None:
            self.unchecked += mac is not None
        elif mac is None:
            if self.signed_from is not None:
                return (
                    f"no HMAC, though entries from {self.signed_from} on carry one (written or "
                    "rewritten without the key)"
                )
        elif not (isinstance(mac, str) and hmac.compare_digest(mac, self._mac(entry["hash"]))):
            return "HMAC does not match (rewritten without the key, or signed with another key)"
        elif self.signed_from is None:
            self.signed_from = n
        self.prev, self.n = entry["hash"], n
        return None

    def _mac(self, digest: str) -> str:
        assert self.key is not None
        return entry_hmac(self.key, digest)

    def finish(self) -> str | None:
        """The problem with the chain as a whole (checked after its last entry), or None."""
        if self.key is not None and self.n and self.signed_from is None:
            return (
                "no entry carries an HMAC although a key is configured: the trail was written "
                "before the key, or rewritten without it (the next change will be signed)"
            )
        return None

    def summary(self) -> str:
        text = f"{self.n} entries, chain intact"
        if self.key is not None:
            if self.signed_from == 1:
                return f"{text}, HMAC valid on every entry"
            if self.signed_from is not None:
                return (
                    f"{text}, HMAC valid on entries {self.signed_from}-{self.n} (those before "
                    "were written before the key was configured)"
                )
            return text
        text += f"; HMAC not checked: no key configured ({KEY_ENV} or {KEY_SETTING})"
        if self.unchecked:
            text += f", though {self.unchecked} entries carry one"
        return text


def verify(path: Path | None = None) -> tuple[bool, int, int | None, str]:
    """Check the whole chain: ``(ok, entries, first_bad, reason)``.

    ``entries`` is the number of entries read; ``first_bad`` the 1-based position (line of the
    file, row of the table in insertion order) of the first entry that is not valid JSON, lacks
    a field, has a wrong ``seq``, a ``prev`` that is not the entry before's ``hash``, a ``hash``
    that does not match its content or, with a key configured, a missing or wrong ``hmac``.
    ``reason`` says so, and on success whether HMACs were checked. An absent trail is an empty,
    valid one."""
    chain = Chain(hmac_key())
    url = None if path is not None else trail_url()
    if url is not None:
        from loft.core.audit_db import PgTrail

        return _run(chain, PgTrail(url).entries(), "entry")
    path = Path(path) if path is not None else trail_path()
    if not path.is_file():
        return True, 0, None, "no audit trail yet"
    with open(path, "rb") as f:
        return _run(chain, (_parse_line(raw) for raw in f), "line")


def _parse_line(raw: bytes) -> Any:
    if not raw.endswith(b"\n"):
        return ValueError("incomplete (no newline at the end: a write was cut short)")
    try:
        return json.loads(raw)
    except ValueError as e:
        return ValueError(f"not valid JSON ({e})")


def _run(chain: Chain, entries: Iterable[Any], unit: str) -> tuple[bool, int, int | None, str]:
    for entry in entries:
        n = chain.n + 1
        problem = str(entry) if isinstance(entry, ValueError) else chain.check(entry)
        if problem:
            return False, n, n, f"{unit} {n}: {problem}"
    if chain.n == 0:
        return True, 0, None, "no audit trail yet"
    problem = chain.finish()
    if problem:
        return False, chain.n, 1, f"{unit} 1: {problem}"
    return True, chain.n, None, chain.summary()


# ----------------------------------------------------------------------------- read


def parse_when(text: str, name: str = "time") -> str:
    """An ISO 8601 date or date-time (naive: UTC) as the trail writes ``ts``, for comparing."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"{name} {text!r} is not an ISO 8601 date or time.",
            hint="For example 2026-12-01 or 2026-12-01T14:30 (UTC unless it says +HH:MM).",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="milliseconds")


def matches(
    entry: dict[str, Any],
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> bool:
    """Whether an entry passes ``read``'s filters (``since``/``until`` as ``parse_when`` gives)."""
    ts = entry.get("ts")
    return (
        (actor is None or entry.get("actor") == actor)
        and (action is None or str(entry.get("action", "")).startswith(action))
        and (target is None or entry.get("target") == target)
        and (since is None or (isinstance(ts, str) and ts >= since))
        and (until is None or (isinstance(ts, str) and ts < until))
    )


def read(
    limit: int = 50,
    offset: int = 0,
    actor: str | None = None,
    action: str | None = None,
    *,
    target: str | None = None,
    since: str | None = None,
    until: str | None = None,
    path: Path | None = None,
) -> list[dict[str, Any]]:
    """Entries newest first: only ``actor``'s, those whose action starts with ``action``
    (``registry.`` for every registry change), on ``target``, at or after ``since`` and before
    ``until`` (ISO dates or times, UTC unless they say otherwise) when given; skip ``offset``
    matches, return at most ``limit``. Newest first from the end of the file (or the table's
    index), so the first pages are fast however long the trail is. Lines that are not JSON are
    skipped here (``verify`` reports them)."""
    since = parse_when(since, "--since") if since else None
    until = parse_when(until, "--until") if until else None
    if limit < 1 or offset < 0:
        return []
    url = None if path is not None else trail_url()
    if url is not None:
        from loft.core.audit_db import PgTrail

        return PgTrail(url).read(limit, offset, actor, action, target, since, until)
    path = Path(path) if path is not None else trail_path()
    if not path.is_file():
        return []
    out: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        for line in _lines_backwards(f.fileno(), os.fstat(f.fileno()).st_size):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict) or not matches(
                entry, actor, action, target, since, until
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


__all__ = [
    "GENESIS",
    "Chain",
    "append",
    "canonical",
    "entry_hash",
    "entry_hmac",
    "head",
    "hmac_key",
    "location",
    "parse_when",
    "read",
    "trail_path",
    "trail_url",
    "verify",
    "who",
]
