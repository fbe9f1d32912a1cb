"""A SQLite file of loft's own state (keys.db, portal.db): WAL mode, created or migrated once per
process in one IMMEDIATE transaction (one process at a time), then a connection per transaction."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path


class SqliteFile:
    """``migrate(conn)`` creates or upgrades the schema; it runs inside the first transaction any
    thread of this process opens, under a write lock every other process waits on."""

    def __init__(
        self,
        path: Path,
        migrate: Callable[[sqlite3.Connection], None],
        *,
        rows: bool = False,
        foreign_keys: bool = False,
    ) -> None:
        self.path, self._migrate = Path(path), migrate
        self._rows, self._foreign_keys = rows, foreign_keys
        self._lock = threading.Lock()
        self._ready = False

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A connection in a transaction: committed on success, rolled back on error, closed."""
        if not self._ready:
            self._init()
        conn = sqlite3.connect(self.path, timeout=30)
        if self._rows:
            conn.row_factory = sqlite3.Row
        if self._foreign_keys:
            conn.execute("PRAGMA foreign_keys = ON")
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    def _init(self) -> None:
        with self._lock:
            if self._ready:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            with contextlib.closing(conn):
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("BEGIN IMMEDIATE")  # one process creates or migrates at a time
                try:
                    self._migrate(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            self._ready = True


def migrate_component(
    conn: sqlite3.Connection,
    path: Path,
    component: str,
    what: str,
    schema: str,
    migrations: dict[int, str],
    version: int,
) -> None:
    """Create or upgrade one component's tables in a file several parts of loft share (e.g.
    portal.db: accounts, labelling): its row in ``schema_version`` says which of ``migrations``
    (version -> statements) it still needs; a file from a newer loft is refused."""
    from loft.core.errors import ConfigError

    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version "
        "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
    )
    row = conn.execute(
        "SELECT version FROM schema_version WHERE component = ?", (component,)
    ).fetchone()
    have = row[0] if row else 0
    if have > version:
        raise ConfigError(
            f"{path} has {what} schema version {have}; this loft understands up to {version}.",
            hint="Upgrade loft (on every machine that opens this LOFT_HOME).",
        )
    script = schema if have == 0 else ";".join(migrations[v] for v in range(have + 1, version + 1))
    for statement in filter(str.strip, script.split(";")):
        conn.execute(statement)
    conn.execute(
        "INSERT INTO schema_version (component, version) VALUES (?, ?) "
        "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
        (component, version),
    )
