"""The audit trail in PostgreSQL, for the team deployment (see loft.core.audit for when).

Table ``loft_audit``: one row an entry, the entry's fields as columns (``details`` as the
canonical JSON text, so what is hashed is exactly what is stored), plus ``id``, the insertion
order that ``verify`` walks (as it walks the file's lines). ``seq`` is unique too, so even a
writer that bypassed the lock could not fork the chain. An append takes a transaction-level
advisory lock, reads the newest row, inserts the next: appends from any number of processes and
machines extend one chain. psycopg (the ``team`` extra) is imported only when such a URL is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from loft.core.errors import ConfigError

TABLE = "loft_audit"
LOCK_KEY = 7418  # pg_advisory_xact_lock key of the trail (the job queue's schema lock is 7417)
COLS = "seq, ts, actor, action, target, details, prev, hash, hmac"
SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (id BIGSERIAL PRIMARY KEY, seq BIGINT NOT NULL UNIQUE, "
    "ts TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, "
    "details TEXT NOT NULL, prev TEXT NOT NULL, hash TEXT NOT NULL, hmac TEXT)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_actor ON {TABLE} (actor, id)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_target ON {TABLE} (target, id)",
)
_ready: set[str] = set()
_local = threading.local()  # this thread's open connections, by URL (and the pid that opened them)


class PgTrail:
    """The trail in the database at ``url`` (a ``postgresql://`` URL)."""

    def __init__(self, url: str) -> None:
        self.url = url

    @property
    def where(self) -> str:
        from loft.core.settings import redact

        return f"{redact(self.url)} (table {TABLE})"

    @contextlib.contextmanager
    def _conn(self) -> Iterator[Any]:
        """This thread's connection to the trail's database, opened once and kept (a connection
        costs more than an append); reopened when it broke, closed when it raised mid-use."""
        cache = _local.__dict__.setdefault("conns", {})
        held = cache.get(self.url)
        if held is None or held[0] != os.getpid() or held[1].closed or held[1].broken:
            cache[self.url] = held = (os.getpid(), self._connect())
        try:
            yield held[1]
        except BaseException:
            cache.pop(self.url, None)
            with contextlib.suppress(Exception):
                held[1].close()
            raise

    def _connect(self) -> Any:
        try:
            import psycopg
        except ImportError:
            raise ConfigError(
                "the audit trail is on PostgreSQL but psycopg is not installed",
                hint="pip install 'loft[team]' (psycopg 3).",
            ) from None
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=30)
        except psycopg.OperationalError as e:
            raise ConfigError(
                f"cannot reach the audit trail at {self.where}: {str(e).strip()}",
                hint="Check LOFT_AUDIT_URL (or audit.url in LOFT_HOME/settings.yaml; unset, the "
                "trail follows LOFT_JOBS_URL / jobs.url).",
            ) from None
        if self.url not in _ready:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
                for statement in SCHEMA:
                    conn.execute(statement)
            _ready.add(self.url)
        return conn

    def append(
        self, make: Callable[[dict[str, Any] | ValueError | None], dict[str, Any]]
    ) -> dict[str, Any]:
        """Insert ``make(newest entry, or None, or a ValueError for a row that is not one)``
        under the trail's lock; returns it. ``make`` refuses a head it cannot chain from."""
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            row = conn.execute(f"SELECT {COLS} FROM {TABLE} ORDER BY id DESC LIMIT 1").fetchone()
            entry = make(None if row is None else _entry(row))
            conn.execute(
                f"INSERT INTO {TABLE} ({COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (entry["seq"], entry["ts"], entry["actor"], entry["action"], entry["target"],
                 _details_text(entry["details"]), entry["prev"], entry["hash"], entry.get("hmac")),
            )  # fmt: skip
        return entry

    def entries(self) -> Iterator[dict[str, Any] | ValueError]:
        """Every entry in insertion order (a ValueError for a row whose details are not JSON),
        streamed through a server-side cursor."""
        with contextlib.closing(self._connect()) as conn, conn.transaction():
            cur = conn.cursor(name="loft_audit_verify")
            cur.itersize = 2000
            cur.execute(f"SELECT {COLS} FROM {TABLE} ORDER BY id")
            for row in cur:
                yield _entry(row)

    def read(
        self,
        limit: int,
        offset: int,
        actor: str | None,
        action: str | None,
        target: str | None,
        since: str | None,
        until: str | None,
    ) -> list[dict[str, Any]]:
        """``loft.core.audit.read`` in SQL (newest first, filtered, paged)."""
        where, params = [], []
        for clause, value in (
            ("actor = %s", actor),
            ("action LIKE %s ESCAPE '\\'", _prefix(action) if action is not None else None),
            ("target = %s", target),
            ("ts >= %s", since),
            ("ts < %s", until),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = f"SELECT {COLS} FROM {TABLE}" + (f" WHERE {' AND '.join(where)}" if where else "")
        with self._conn() as conn:
            rows = conn.execute(
                f"{sql} ORDER BY id DESC LIMIT %s OFFSET %s", (*params, limit, offset)
            ).fetchall()
        return [e for e in map(_entry, rows) if not isinstance(e, ValueError)]


def _details_text(details: Any) -> str:
    return json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _entry(row: tuple[Any, ...]) -> dict[str, Any] | ValueError:
    seq, ts, actor, action, target, details, prev, digest, mac = row
    try:
        parsed = json.loads(details)
    except ValueError as e:
        return ValueError(f"details are not valid JSON ({e})")
    entry = {"seq": seq, "ts": ts, "actor": actor, "action": action, "target": target,
             "details": parsed, "prev": prev, "hash": digest}  # fmt: skip
    if mac is not None:
        entry["hmac"] = mac
    return entry


__all__ = ["LOCK_KEY", "TABLE", "PgTrail"]
