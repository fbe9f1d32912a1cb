"""The job queue's tables, the same SQL on SQLite and PostgreSQL, and the migrations between
schema versions: 1, the queue; 2, ``dedup``, ``pipeline`` and ``parent`` on ``jobs`` and the
``schedules`` table. An older database is migrated in place by the first loft that opens it."""

from __future__ import annotations

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    owner TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    resources TEXT NOT NULL DEFAULT '{}',
    mem_bytes INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 3,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    worker TEXT,
    fence INTEGER NOT NULL DEFAULT 0,
    lease_until REAL,
    cancel INTEGER NOT NULL DEFAULT 0,
    progress TEXT NOT NULL DEFAULT '{}',
    result TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    history TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (status, priority, created);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    capacity_bytes INTEGER NOT NULL,
    devices TEXT NOT NULL DEFAULT '[]',
    seen REAL NOT NULL,
    stopped REAL
)
"""
# version -> the statements that bring the schema from the version before it up to it
MIGRATIONS = {
    2: """
ALTER TABLE jobs ADD COLUMN dedup TEXT;
ALTER TABLE jobs ADD COLUMN pipeline TEXT;
ALTER TABLE jobs ADD COLUMN parent TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_dedup ON jobs (dedup);
CREATE INDEX IF NOT EXISTS jobs_pipeline ON jobs (pipeline);
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    resources TEXT NOT NULL DEFAULT '{}',
    max_attempts INTEGER NOT NULL DEFAULT 3,
    source TEXT,
    owner TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    cron TEXT,
    tz TEXT,
    every_s INTEGER,
    cond TEXT,
    data TEXT,
    created REAL NOT NULL,
    last_tick REAL,
    last_job TEXT,
    fired_tick REAL,
    fired_job TEXT,
    last_check TEXT
)
"""
}


def pg_sql(sql: str) -> str:
    """The schema's SQLite spelling in PostgreSQL's (64-bit floats and byte counts)."""
    return (
        sql.replace(" REAL", " DOUBLE PRECISION")
        .replace("mem_bytes INTEGER", "mem_bytes BIGINT")
        .replace("capacity_bytes INTEGER", "capacity_bytes BIGINT")
    )


def statements(sql: str) -> list[str]:
    return [s for s in sql.split(";") if s.strip()]


def upgrade(version: int) -> list[str]:
    """The statements from schema ``version`` (0: none yet) to SCHEMA_VERSION."""
    out = statements(SCHEMA) if version == 0 else []
    for v in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
        out += statements(MIGRATIONS[v])
    return out


__all__ = ["MIGRATIONS", "SCHEMA", "SCHEMA_VERSION", "pg_sql", "statements", "upgrade"]
