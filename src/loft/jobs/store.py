"""Jobs are rows: the queue in SQLite (WAL) under LOFT_HOME/jobs.db, or in PostgreSQL when
``LOFT_JOBS_URL`` (or ``jobs.url`` in LOFT_HOME/settings.yaml) is a ``postgresql://`` URL; the
same SQL on both (placeholders translated), claims serialised by ``BEGIN IMMEDIATE`` on SQLite and
``FOR UPDATE SKIP LOCKED`` on PostgreSQL.

A job moves ADMITTED (accepted at submit: its spec validated, its memory estimate fits a worker)
→ RUNNING (claimed by a worker) → SUCCEEDED | FAILED | CANCELLED; a RUNNING job whose worker
stops renewing its lease, or that its worker hands back (SIGTERM), is claimable again.

Every claim increments the job's ``fence`` (a fencing token). A worker passes the fence it got
with every write about the job (heartbeat, progress, finish, requeue); a write whose fence is no
longer the job's changes nothing and returns False, so a worker that lost its lease (paused,
partitioned, presumed dead) cannot overwrite what the job's new owner does. Specs, resources,
progress and results are JSON (never pickles).

The claim order is priority (higher first), then fair share between owners (the owner with fewer
jobs running first), then age.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError, NotFoundError
from loft.core.paths import loft_home

SCHEMA_VERSION = 1
STATES = ("ADMITTED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
RETRY_ATTEMPTS = 3  # `loft jobs retry` allows this many more attempts

_SCHEMA = """
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


@dataclass
class Job:
    id: str
    kind: str
    spec: dict[str, Any]
    owner: str
    priority: int
    resources: dict[str, Any]
    status: str
    attempts: int
    max_attempts: int
    created: float
    started: float | None = None
    finished: float | None = None
    worker: str | None = None
    fence: int = 0
    lease_until: float | None = None
    cancel: bool = False
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form (``loft jobs list/show --json``)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "owner": self.owner,
            "priority": self.priority,
            "status": self.status,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "created": _iso(self.created),
            "started": _iso(self.started),
            "finished": _iso(self.finished),
            "worker": self.worker,
            "spec": self.spec,
            "resources": self.resources,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
            "history": self.history,
            "log": str(job_dir(self.id) / "log.txt"),
        }


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def jobs_root() -> Path:
    return loft_home() / "jobs"


def job_dir(job_id: str) -> Path:
    return jobs_root() / job_id


def new_id() -> str:
    """Sortable by submit time: milliseconds in hex, then 4 random hex digits."""
    return f"j{int(time.time() * 1000):011x}{secrets.token_hex(2)}"


_COLS = (
    "id, kind, spec, owner, priority, resources, status, attempts, max_attempts, created, "
    "started, finished, worker, fence, lease_until, cancel, progress, result, error, history"
)


def _row(r: tuple) -> Job:
    (id_, kind, spec, owner, prio, res, status, att, max_att, created, started, finished,
     worker, fence, lease, cancel, progress, result, error, history) = r  # fmt: skip
    return Job(id_, kind, json.loads(spec), owner, prio, json.loads(res), status, att, max_att,
               created, started, finished, worker, fence, lease, bool(cancel),
               json.loads(progress), json.loads(result), error, json.loads(history))  # fmt: skip


class _Pg:
    """A psycopg connection that takes SQLite's ``?`` placeholders."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: tuple | list = ()) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), params)


def store_url() -> str:
    """Where the queue lives: LOFT_JOBS_URL, else ``jobs.url`` in LOFT_HOME/settings.yaml, else
    LOFT_HOME/jobs.db."""
    from loft.core.settings import setting

    return str(setting("LOFT_JOBS_URL", "jobs.url") or loft_home() / "jobs.db")


class JobStore:
    """The queue. Every method opens its own short connection: safe across threads and
    processes (SQLite's WAL and ``BEGIN IMMEDIATE``, or PostgreSQL's row locks, serialise the
    writers)."""

    def __init__(self, url: str | Path | None = None) -> None:
        url = str(url) if url else store_url()
        self.pg = url.startswith(("postgresql://", "postgres://"))
        self.url = url
        self.path = Path(url.removeprefix("sqlite:///")) if not self.pg else None
        self._ready = False
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def where(self) -> str:
        from loft.core.settings import redact

        return redact(self.url) if self.pg else str(self.path)

    def _connect(self) -> Any:
        if self.pg:
            try:
                import psycopg
            except ImportError:
                raise ConfigError(
                    "the job queue is on PostgreSQL but psycopg is not installed",
                    hint="pip install 'loft[team]' (psycopg 3).",
                ) from None
            try:
                return _Pg(psycopg.connect(self.url, autocommit=True, connect_timeout=30))
            except psycopg.OperationalError as e:
                raise ConfigError(
                    f"cannot reach the job queue at {self.where}: {str(e).strip()}",
                    hint="Check LOFT_JOBS_URL (or jobs.url in LOFT_HOME/settings.yaml).",
                ) from None
        return sqlite3.connect(self.path, timeout=60, isolation_level=None)

    def _close(self, conn: Any) -> None:
        (conn.conn if self.pg else conn).close()

    def _conn(self) -> Any:
        """This thread's connection, opened once and kept (a connection per call costs more
        than the claim itself on PostgreSQL: bench/jobs.py)."""
        if not self._ready:
            self._init()
        local = self._local
        if getattr(local, "conn", None) is None or local.pid != os.getpid():
            local.conn, local.pid = self._connect(), os.getpid()
        return local.conn

    def _drop(self) -> None:
        """Forget this thread's connection after an error (the next call opens a fresh one)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with contextlib.suppress(Exception):
                self._close(conn)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        """One write transaction (SQLite: BEGIN IMMEDIATE, no lock-upgrade deadlocks)."""
        conn = self._conn()
        try:
            conn.execute("BEGIN" if self.pg else "BEGIN IMMEDIATE")
        except Exception:
            self._drop()
            raise
        try:
            yield conn
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except Exception:
                self._drop()
            raise
        try:
            conn.execute("COMMIT")
        except Exception:
            self._drop()
            raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[Any]:
        conn = self._conn()
        try:
            yield conn
        except Exception:
            self._drop()
            raise

    def _init(self) -> None:
        with self._lock:
            if self._ready:
                return
            if self.pg:
                self._init_pg()
            else:
                self._init_sqlite()
            self._ready = True

    def _init_sqlite(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        with contextlib.closing(conn):
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")  # one process creates the schema
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                raise self._too_new(version)
            if version == 0:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")

    def _init_pg(self) -> None:
        conn = self._connect()
        try:
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock(7417)")  # one process creates the schema
            conn.execute("CREATE TABLE IF NOT EXISTS loft_jobs_meta (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM loft_jobs_meta").fetchone()
            if row and row[0] > SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                raise self._too_new(row[0])
            if not row:
                schema = (
                    _SCHEMA.replace(" REAL", " DOUBLE PRECISION")
                    .replace("mem_bytes INTEGER", "mem_bytes BIGINT")
                    .replace("capacity_bytes INTEGER", "capacity_bytes BIGINT")
                )
                for statement in filter(str.strip, schema.split(";")):
                    conn.execute(statement)
                conn.execute("INSERT INTO loft_jobs_meta VALUES (?)", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        finally:
            self._close(conn)

    def _too_new(self, version: int) -> ConfigError:
        return ConfigError(
            f"{self.where} has job-queue schema version {version}; this loft understands up to "
            f"{SCHEMA_VERSION}.",
            hint="Upgrade loft.",
        )

    # ------------------------------------------------------------------ submit and read

    def submit(
        self,
        kind: str,
        spec: dict[str, Any],
        *,
        owner: str,
        priority: int = 0,
        resources: dict[str, Any] | None = None,
        max_attempts: int = 3,
    ) -> Job:
        resources = resources or {}
        job_id, now = new_id(), time.time()
        with self._tx() as c:
            c.execute(
                "INSERT INTO jobs (id, kind, spec, owner, priority, resources, mem_bytes, status,"
                " max_attempts, created, history) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, kind, json.dumps(spec), owner, priority, json.dumps(resources),
                 int(resources.get("mem_bytes") or 0), "ADMITTED", max_attempts, now,
                 json.dumps([{"at": _iso(now), "event": "admitted"}])),
            )  # fmt: skip
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        with self._read() as c:
            r = c.execute(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if r is None:  # a unique prefix is enough, as with git
                rows = c.execute(
                    f"SELECT {_COLS} FROM jobs WHERE id LIKE ? LIMIT 2", (job_id + "%",)
                ).fetchall()
                r = rows[0] if len(rows) == 1 else None
        if r is None:
            raise NotFoundError(f"no job {job_id!r} in {self.where}", hint="See `loft jobs list`.")
        return _row(r)

    def list(self, *, status: str | None = None, limit: int = 100) -> list[Job]:
        with self._read() as c:
            if status:
                rows = c.execute(
                    f"SELECT {_COLS} FROM jobs WHERE status = ? ORDER BY created DESC LIMIT ?",
                    (status.upper(), limit),
                ).fetchall()
            else:
                rows = c.execute(
                    f"SELECT {_COLS} FROM jobs ORDER BY created DESC LIMIT ?", (limit,)
                ).fetchall()
        return [_row(r) for r in rows]

    # ------------------------------------------------------------------ workers

    def register_worker(self, worker_id: str, host: str, pid: int, capacity: int,
                        devices: list[str]) -> None:  # fmt: skip
        with self._tx() as c:
            c.execute(
                "INSERT INTO workers (id, host, pid, capacity_bytes, devices, seen) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET host = excluded.host,"
                " pid = excluded.pid, capacity_bytes = excluded.capacity_bytes,"
                " devices = excluded.devices, seen = excluded.seen, stopped = NULL",
                (worker_id, host, pid, capacity, json.dumps(devices), time.time()),
            )

    def worker_seen(self, worker_id: str, stopped: bool = False) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE workers SET seen = ?, stopped = ? WHERE id = ?",
                (time.time(), time.time() if stopped else None, worker_id),
            )

    def worker_capacities(self, within_s: float = 3600) -> list[tuple[str, int]]:
        """(worker id, capacity in bytes) of workers seen recently and not stopped."""
        with self._read() as c:
            rows = c.execute(
                "SELECT id, capacity_bytes FROM workers WHERE stopped IS NULL AND seen > ?",
                (time.time() - within_s,),
            ).fetchall()
        return [(r[0], int(r[1])) for r in rows]

    # ------------------------------------------------------------------ claim and lease

    def claim(self, worker_id: str, *, capacity: int, lease_s: float) -> Job | None:
        """The next job this worker can hold, leased to it with a new fence; None if none.
        A RUNNING job whose lease expired is claimable (its worker is presumed dead)."""
        now = time.time()
        with self._tx() as c:
            r = c.execute(
                f"SELECT {_COLS} FROM jobs j WHERE mem_bytes <= ? AND cancel = 0 AND"
                " (status = 'ADMITTED' OR (status = 'RUNNING' AND lease_until < ?))"
                " ORDER BY priority DESC,"
                " (SELECT COUNT(*) FROM jobs o WHERE o.owner = j.owner AND o.status = 'RUNNING'"
                "  AND o.lease_until >= ?) ASC, created ASC LIMIT 1"
                + (" FOR UPDATE SKIP LOCKED" if self.pg else ""),
                (capacity, now, now),
            ).fetchone()
            if r is None:
                return None
            job = _row(r)
            event = {"at": _iso(now), "event": "claimed", "worker": worker_id,
                     "attempt": job.attempts + 1}  # fmt: skip
            if job.status == "RUNNING":
                event["after"] = f"lease of {job.worker} expired"
            c.execute(
                "UPDATE jobs SET status = 'RUNNING', worker = ?, fence = fence + 1,"
                " lease_until = ?, attempts = attempts + 1, started = COALESCE(started, ?),"
                " history = ? WHERE id = ?",
                (worker_id, now + lease_s, now, json.dumps([*job.history, event]), job.id),
            )
        return self.get(job.id)

    def heartbeat(self, job_id: str, fence: int, lease_s: float,
                  progress: dict[str, Any] | None = None) -> tuple[bool, bool]:  # fmt: skip
        """Renew the lease (and record progress). Returns (still ours, cancel requested)."""
        with self._tx() as c:
            if progress is None:
                cur = c.execute(
                    "UPDATE jobs SET lease_until = ? WHERE id = ? AND fence = ?"
                    " AND status = 'RUNNING'",
                    (time.time() + lease_s, job_id, fence),
                )
            else:
                cur = c.execute(
                    "UPDATE jobs SET lease_until = ?, progress = ? WHERE id = ? AND fence = ?"
                    " AND status = 'RUNNING'",
                    (time.time() + lease_s, json.dumps(progress), job_id, fence),
                )
            ours = cur.rowcount == 1
            cancel = c.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return ours, bool(cancel and cancel[0])

    def finish(self, job_id: str, fence: int, status: str, *, result: dict[str, Any] | None = None,
               error: str | None = None) -> bool:  # fmt: skip
        """End the job (SUCCEEDED, FAILED or CANCELLED) if the fence is still its own."""
        if status not in TERMINAL:
            raise ValueError(status)
        return self._update(
            job_id, fence, status,
            {"finished": time.time(), "lease_until": None, "result": json.dumps(result or {}),
             "error": error},
            {"event": status.lower(), **({"error": error} if error else {})},
        )  # fmt: skip

    def requeue(self, job_id: str, fence: int, reason: str) -> bool:
        """Hand the job back to the queue (its worker is stopping; it resumes elsewhere)."""
        return self._update(
            job_id, fence, "ADMITTED", {"lease_until": None, "worker": None},
            {"event": "requeued", "reason": reason},
        )  # fmt: skip

    def _update(self, job_id: str, fence: int, status: str, cols: dict[str, Any],
                event: dict[str, Any]) -> bool:  # fmt: skip
        with self._tx() as c:
            r = c.execute(
                "SELECT history FROM jobs WHERE id = ? AND fence = ? AND status = 'RUNNING'",
                (job_id, fence),
            ).fetchone()
            if r is None:
                return False  # fenced out: another worker holds the job now
            history = [*json.loads(r[0]), {"at": _iso(time.time()), **event}]
            sets = ", ".join(f"{k} = ?" for k in cols)
            c.execute(
                f"UPDATE jobs SET status = ?, {sets}, history = ? WHERE id = ?",
                (status, *cols.values(), json.dumps(history), job_id),
            )
        return True

    # ------------------------------------------------------------------ the user's verbs

    def cancel(self, job_id: str) -> Job:
        """ADMITTED: cancelled at once. RUNNING: its worker stops it at the next heartbeat."""
        job = self.get(job_id)
        with self._tx() as c:
            now = time.time()
            history = json.dumps([*job.history, {"at": _iso(now), "event": "cancel requested"}])
            c.execute(
                "UPDATE jobs SET cancel = 1, history = ? WHERE id = ? AND status IN"
                " ('ADMITTED', 'RUNNING')",
                (history, job.id),
            )
            c.execute(
                "UPDATE jobs SET status = 'CANCELLED', finished = ? WHERE id = ? AND"
                " status = 'ADMITTED'",
                (now, job.id),
            )
        return self.get(job.id)

    def retry(self, job_id: str) -> Job:
        """A FAILED or CANCELLED job back in the queue, with a fresh allowance of attempts."""
        job = self.get(job_id)
        if job.status not in ("FAILED", "CANCELLED"):
            raise ConfigError(
                f"job {job.id} is {job.status}; only a FAILED or CANCELLED job can be retried"
            )
        with self._tx() as c:
            history = json.dumps([*job.history, {"at": _iso(time.time()), "event": "retry"}])
            c.execute(
                "UPDATE jobs SET status = 'ADMITTED', cancel = 0, finished = NULL, error = NULL,"
                " worker = NULL, max_attempts = attempts + ?, history = ? WHERE id = ?",
                (RETRY_ATTEMPTS, history, job.id),
            )
        return self.get(job.id)


__all__ = ["STATES", "TERMINAL", "Job", "JobStore", "job_dir", "jobs_root", "new_id"]
