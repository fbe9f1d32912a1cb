"""API keys for the model server: a SQLite key store, per-key allow-lists and rate limits.

A key reads ``loft-<id>-<secret>``: ``id`` is 8 hex characters, public, shown by ``loft keys
list`` and used to find the row; ``secret`` is ``secrets.token_urlsafe(32)`` (256 random bits).
Only a random 16-byte salt and ``sha256(salt || key)`` are stored, never the key itself.

A fast salted hash is the right tool here, not bcrypt/scrypt/argon2: those slow hashes exist to
protect low-entropy, human-chosen passwords against guessing. A 256-bit random secret cannot be
guessed however fast the hash is, while a slow hash would add ~50 ms to every request. Hashes are
compared with ``hmac.compare_digest``, and an unknown id costs the same hash-and-compare as a
wrong secret, so neither the message nor the timing tells the two apart.

Successful lookups are cached in memory for ``CACHE_SECONDS``; a revocation through the same
``KeyStore`` drops the cache entry at once, one made by another process is seen within that time.

A key's ``last_used`` time is written at most once per ``LAST_USED_EVERY_S`` per key and process
(not a write per request), with a short lock timeout: a busy database skips the update, never the
request. A key with the ``metrics`` scope may read ``/metrics`` and the full ``/v1/loft/status``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from loft.core import audit
from loft.core.errors import AuthenticationError, ConfigError, NotFoundError, RateLimitedError
from loft.core.sqlite import SqliteFile

SCHEMA_VERSION = 2
CACHE_SECONDS = 5.0
LAST_USED_EVERY_S = 60.0
KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_RE = re.compile(r"^loft-([0-9a-f]{8})-([A-Za-z0-9_-]{20,128})$")
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*([A-Za-z]+)\s*$")
_RATE_UNITS = {
    **dict.fromkeys(("s", "sec", "second"), 1),
    **dict.fromkeys(("m", "min", "minute"), 60),
    **dict.fromkeys(("h", "hr", "hour"), 3600),
    **dict.fromkeys(("d", "day"), 86400),
}
_EXPIRES_RE = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
_EXPIRES_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    salt TEXT NOT NULL,
    hash TEXT NOT NULL,
    adapters TEXT NOT NULL,
    include_base INTEGER NOT NULL,
    rate TEXT,
    created TEXT NOT NULL,
    expires TEXT,
    revoked TEXT,
    metrics INTEGER NOT NULL DEFAULT 0,
    last_used TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS keys_active_name ON keys(name) WHERE revoked IS NULL;
"""
# schema version -> statements that bring the version before it up to it
_MIGRATIONS = {
    2: (
        "ALTER TABLE keys ADD COLUMN metrics INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE keys ADD COLUMN last_used TEXT",
    ),
}
_COLUMNS = (
    "id, name, adapters, include_base, rate, created, expires, revoked, metrics, last_used, "
    "salt, hash"
)
_INVALID = "invalid API key"
_AUTH_HINT = (
    "Send 'Authorization: Bearer loft-<id>-<secret>'; create a key with `loft keys create`."
)


def parse_rate(text: str) -> tuple[int, float]:
    """``'60/min'`` -> ``(60, 60.0)``: at most ``count`` requests per ``seconds``."""
    m = _RATE_RE.match(text or "")
    unit = _RATE_UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None or int(m.group(1)) < 1:
        raise ConfigError(
            f"invalid rate {text!r}: expected COUNT/UNIT with COUNT >= 1 and UNIT one of "
            "s, sec, second, m, min, minute, h, hr, hour, d, day (e.g. 10/s, 60/min, 1000/hour).",
        )
    return int(m.group(1)), float(unit)


def parse_expires(text: str, *, now: float) -> str:
    """``'30d'`` -> the ISO UTC time 30 days after ``now`` (epoch seconds)."""
    m = _EXPIRES_RE.match(text or "")
    if m is None or int(m.group(1)) < 1:
        raise ConfigError(
            f"invalid expiry {text!r}: expected a positive whole number followed by m (minutes), "
            "h (hours), d (days) or w (weeks) (e.g. 45m, 12h, 30d, 2w).",
        )
    return _iso(now + int(m.group(1)) * _EXPIRES_UNITS[m.group(2)])


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _hash(salt: str, key: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """One key as stored, minus its salt and hash."""

    id: str
    name: str
    adapters: list[str] = field(default_factory=list)
    include_base: bool = False
    rate: str | None = None
    created: str = ""
    expires: str | None = None
    revoked: str | None = None
    metrics: bool = False  # may read /metrics and the whole /v1/loft/status
    last_used: str | None = None  # to within LAST_USED_EVERY_S

    @property
    def rate_limit(self) -> tuple[int, float] | None:
        """``(count, seconds)`` or None for unlimited."""
        return parse_rate(self.rate) if self.rate else None

    def allows(self, model_name: str, *, is_base: bool) -> bool:
        if is_base:
            return self.include_base
        return "*" in self.adapters or model_name in self.adapters

    def status(self, now: float | None = None) -> str:
        if self.revoked:
            return "revoked"
        if self.expires and _epoch(self.expires) <= (time.time() if now is None else now):
            return "expired"
        return "active"

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "adapters": list(self.adapters),
            "include_base": self.include_base,
            "rate": self.rate,
            "created": self.created,
            "expires": self.expires,
            "revoked": self.revoked,
            "metrics": self.metrics,
            "last_used": self.last_used,
            "status": self.status(now),
        }


class KeyStore:
    """API keys in a SQLite file (WAL), default ``LOFT_HOME/keys.db``; safe across threads."""

    def __init__(self, path: Path | None = None, *, clock: Callable[[], float] = time.time):
        if path is None:
            from loft.core.paths import loft_home

            path = loft_home() / "keys.db"
        self.path = Path(path)
        self._clock = clock
        self._db = SqliteFile(self.path, self._create_or_migrate)
        # id -> (record, salt, hash, cached_at)
        self._cache: dict[str, tuple[KeyRecord, str, str, float]] = {}
        self._touched: dict[str, float] = {}  # id -> when this process last wrote last_used

    def _create_or_migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{self.path} has key-store schema version {version}; this loft "
                f"understands up to {SCHEMA_VERSION}.",
                hint="Upgrade loft, or pass --db with another file.",
            )
        if version == SCHEMA_VERSION:
            return
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'keys'"
        ).fetchone()
        if exists:  # an older store: bring it up to date, keeping every key
            for v in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[v]:
                    conn.execute(statement)
        else:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def create(
        self,
        name: str,
        adapters: list[str],
        *,
        include_base: bool = False,
        rate: str | None = None,
        expires: str | None = None,
        metrics: bool = False,
        actor: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key: its record and the plaintext key (shown once, never stored). Audited as
        ``key.create`` by ``actor`` (default the OS user), ``context`` in the details, in the
        same transaction (a failed append creates nothing)."""
        from loft.registry.names import check_name

        problems = []
        if not isinstance(name, str) or not KEY_NAME_RE.match(name):
            problems.append(
                f"invalid key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        adapters = list(adapters)
        if "*" in adapters and adapters != ["*"]:
            problems.append(f"adapters {adapters}: '*' (all adapters) must be given alone")
        elif adapters != ["*"]:
            for a in adapters:
                try:
                    check_name(a)
                except ConfigError as e:
                    problems.append(e.message)
        if not adapters and not include_base and not metrics:
            problems.append("the key could reach nothing: give --adapters, --base and/or --metrics")
        for text, parse in ((rate, parse_rate), (expires, partial(parse_expires, now=0.0))):
            try:
                if text:
                    parse(text)
            except ConfigError as e:
                problems.append(e.message)
        if problems:
            raise ConfigError(
                "cannot create key:\n  " + "\n  ".join(problems),
                hint="Example: loft keys create --name ci --adapters support-bot --rate 60/min",
            )
        now = self._clock()
        expiry = parse_expires(expires, now=now) if expires else None
        salt = secrets.token_hex(16)
        with self._db.transaction() as conn:
            if conn.execute(
                "SELECT 1 FROM keys WHERE name = ? AND revoked IS NULL", (name,)
            ).fetchone():
                raise ConfigError(
                    f"a key named {name!r} already exists.",
                    hint=f"Pick another --name, or revoke it first: loft keys revoke {name}",
                )
            for _ in range(20):
                kid = secrets.token_hex(4)
                key = f"loft-{kid}-{secrets.token_urlsafe(32)}"
                try:
                    conn.execute(
                        f"INSERT INTO keys ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (kid, name, json.dumps(adapters), int(include_base), rate,
                         _iso(now), expiry, None, int(metrics), None, salt, _hash(salt, key)),
                    )  # fmt: skip
                    break
                except sqlite3.IntegrityError:
                    continue  # an id collision (or a racing create of the same name)
            else:
                raise ConfigError(f"could not create key {name!r}: is the name already taken?")
            record = KeyRecord(
                kid, name, adapters, include_base, rate, _iso(now), expiry, None, metrics
            )
            details = {
                "name": name, "adapters": adapters, "include_base": include_base,
                "metrics": metrics, "rate": rate, "expires": expiry, "db": str(self.path),
            }  # fmt: skip
            audit.append(audit.who(actor), "key.create", kid, {**details, **(context or {})})
        return record, key

    def authenticate(self, key: str | None) -> KeyRecord:
        """The record for a valid, live key, else AuthenticationError (HTTP 401)."""
        if not key:
            raise AuthenticationError("missing API key", hint=_AUTH_HINT)
        m = _KEY_RE.match(key.strip())
        if m is None:
            raise AuthenticationError("malformed API key", hint=_AUTH_HINT)
        key, kid = m.group(0), m.group(1)
        now = self._clock()
        hit = self._cache.get(kid)
        if hit is None or not (0 <= now - hit[3] < CACHE_SECONDS):
            hit = self._load(kid, now)
        record, salt, digest, _ = hit or (None, "00" * 16, "", 0.0)
        ok = hmac.compare_digest(_hash(salt, key), digest)  # hashed even for unknown ids
        if record is None or not ok:
            self._cache.pop(kid, None)
            raise AuthenticationError(_INVALID, hint=_AUTH_HINT)
        if record.revoked:
            raise AuthenticationError(f"API key {record.name!r} was revoked", hint=_AUTH_HINT)
        if record.status(now) == "expired":
            raise AuthenticationError(
                f"API key {record.name!r} expired at {record.expires}", hint=_AUTH_HINT
            )
        self._cache[kid] = hit
        self._touch(kid, now)
        return record

    def _touch(self, kid: str, now: float) -> None:
        """Record ``now`` as the key's last use, at most once per LAST_USED_EVERY_S."""
        last = self._touched.get(kid)
        if last is not None and 0 <= now - last < LAST_USED_EVERY_S:
            return
        self._touched[kid] = now
        try:  # a short timeout: a busy database costs a missed update, never a slow request
            with contextlib.closing(sqlite3.connect(self.path, timeout=0.2)) as conn, conn:
                conn.execute("UPDATE keys SET last_used = ? WHERE id = ?", (_iso(now), kid))
        except sqlite3.Error:
            pass

    def _load(self, kid: str, now: float) -> tuple[KeyRecord, str, str, float] | None:
        with self._db.transaction() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM keys WHERE id = ?", (kid,)).fetchone()
        return None if row is None else (_record(row), row[10], row[11], now)

    def list_keys(self, include_revoked: bool = False) -> list[KeyRecord]:
        where = "" if include_revoked else "WHERE revoked IS NULL"
        with self._db.transaction() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM keys {where} ORDER BY rowid")
            return [_record(r) for r in rows.fetchall()]

    def list_page(
        self, limit: int, offset: int, include_revoked: bool = False
    ) -> tuple[list[KeyRecord], int]:
        """``limit`` keys from ``offset`` (oldest first), and how many there are."""
        where = "" if include_revoked else "WHERE revoked IS NULL"
        with self._db.transaction() as conn:
            total = conn.execute(f"SELECT COUNT(*) FROM keys {where}").fetchone()[0]
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM keys {where} ORDER BY rowid LIMIT ? OFFSET ?",
                (limit, offset),
            )
            return [_record(r) for r in rows.fetchall()], int(total)

    def revoke(
        self,
        name_or_prefix: str,
        *,
        actor: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> KeyRecord:
        """Revoke the live key with this name or id; NotFoundError if there is none. Audited as
        ``key.revoke`` (see ``create``)."""
        with self._db.transaction() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM keys WHERE revoked IS NULL AND (name = ? OR id = ?)",
                (name_or_prefix, name_or_prefix),
            ).fetchone()
            if row is None:
                names = [r[0] for r in conn.execute(
                    "SELECT name FROM keys WHERE revoked IS NULL ORDER BY name")]  # fmt: skip
                raise NotFoundError(
                    f"no active key named or with id {name_or_prefix!r}; active keys: "
                    f"{', '.join(names) or '(none)'}.",
                    hint="See them all with: loft keys list --all",
                )
            when = _iso(self._clock())
            conn.execute("UPDATE keys SET revoked = ? WHERE id = ?", (when, row[0]))
            details = {"name": row[1], "db": str(self.path), **(context or {})}
            audit.append(audit.who(actor), "key.revoke", row[0], details)
        self._cache.pop(row[0], None)
        return dataclasses.replace(_record(row), revoked=when)


def _record(row: tuple[Any, ...]) -> KeyRecord:
    kid, name, adapters, base, rate, created, expires, revoked, metrics, last_used = row[:10]
    return KeyRecord(
        kid, name, json.loads(adapters), bool(base), rate, created, expires, revoked,
        bool(metrics), last_used,
    )  # fmt: skip


def unknown_adapters(names: list[str]) -> tuple[list[str], list[str]]:
    """(names not registered, every registered name): a key may name an adapter registered later,
    so callers warn rather than refuse. ``*`` is never unknown."""
    from loft.registry import list_models

    registered = [m["name"] for m in list_models()]
    return [n for n in names if n != "*" and n not in registered], registered


class RateLimiter:
    """A token bucket per key id: capacity ``count``, refilled at ``count / seconds`` per second."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, int, float], tuple[float, float]] = {}

    def check(self, record: KeyRecord) -> None:
        """Take one token for ``record``; RateLimitedError (HTTP 429) if there is none."""
        limit = record.rate_limit
        if limit is None:
            return
        count, seconds = limit
        refill = count / seconds
        slot = (record.id, count, seconds)
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.get(slot, (float(count), now))
            tokens = min(float(count), tokens + max(0.0, now - last) * refill)
            if tokens >= 1.0 - 1e-9:  # float refill can land a hair under 1
                self._buckets[slot] = (tokens - 1.0, now)
                return
            self._buckets[slot] = (tokens, now)
        retry_after = (1.0 - tokens) / refill
        raise RateLimitedError(
            f"API key {record.name!r} is over its rate of {record.rate}; "
            f"retry after {retry_after:.1f} s",
            retry_after=retry_after,
        )
