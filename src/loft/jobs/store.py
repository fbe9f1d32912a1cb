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

A job may carry a ``dedup`` key (unique: a second insert with the same key inserts nothing and
returns the first job), its ``pipeline`` id and its ``parent`` job (the pipeline stage before it,
submitted in the same transaction as that stage's finish). The same database holds the
``schedules`` of ``loft schedule`` (jobs/schedules.py); its tables and their migrations are in
jobs/schema.py.
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

from loft.core import audit
from loft.core.errors import ConfigError, NotFoundError
from loft.core.paths import loft_home
from loft.jobs.schema import SCHEMA_VERSION, pg_sql, upgrade

STATES = ("ADMITTED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
RETRY_ATTEMPTS = 3  # `loft jobs retry` allows this many more attempts


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
    dedup: str | None = None
    pipeline: str | None = None
    parent: str | None = None

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
            "pipeline": self.pipeline,
            "parent": self.parent,
            "dedup": self.dedup,
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


@dataclass
class NewJob:
    """A job to insert: what ``submit`` takes, and what a pipeline's finished stage or a
    schedule's firing inserts inside its own transaction (``JobStore.insert``)."""

    kind: str
    spec: dict[str, Any]
    owner: str
    priority: int = 0
    resources: dict[str, Any] = field(default_factory=dict)
    max_attempts: int = 3
    dedup: str | None = None
    parent: str | None = None
    id: str = field(default_factory=new_id)


_COLS = (
    "id, kind, spec, owner, priority, resources, status, attempts, max_attempts, created, "
    "started, finished, worker, fence, lease_until, cancel, progress, result, error, history, "
    "dedup, pipeline, parent"
)


def _row(r: tuple) -> Job:
    (id_, kind, spec, owner, prio, res, status, att, max_att, created, started, finished,
     worker, fence, lease, cancel, progress, result, error, history, dedup, pipeline,
     parent) = r  # fmt: skip
    return Job(id_, kind, json.loads(spec), owner, prio, json.loads(res), status, att, max_att,
               created, started, finished, worker, fence, lease, bool(cancel),
               json.loads(progress), json.loads(result), error, json.loads(history), dedup,
               pipeline, parent)  # fmt: skip


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

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        """One write transaction, for the jobs package's own modules (schedules): a connection
        whose ``execute`` takes ``?`` placeholders, committed on exit, rolled back on an error."""
        return self._tx()

    def reading(self) -> contextlib.AbstractContextManager[Any]:
        """This thread's connection for reads (as ``transaction``, without a transaction)."""
        return self._read()

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
            if version < SCHEMA_VERSION:
                for statement in upgrade(version):
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
            version = row[0] if row else 0
            if version < SCHEMA_VERSION:
                for statement in upgrade(version):
                    conn.execute(pg_sql(statement))
                if row:
                    conn.execute("UPDATE loft_jobs_meta SET version = ?", (SCHEMA_VERSION,))
                else:
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
        dedup: str | None = None,
        parent: str | None = None,
        actor: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> Job:
        """Queue a job (validated by the caller). With ``dedup``, a key already used returns
        the job that used it and inserts nothing. Audited as ``job.submit`` by ``actor``
        (default: ``owner``), ``context`` in the details, in the same transaction."""
        new = NewJob(kind, spec, owner, priority, dict(resources or {}), max_attempts, dedup,
                     parent)  # fmt: skip
        with self._tx() as c:
            job_id, inserted = self.insert(c, new)
            if inserted:
                details = {
                    "kind": kind, "owner": owner, "priority": priority,
                    "mem_bytes": new.resources.get("mem_bytes"),
                    **{k: spec[k] for k in ("config", "args", "dataset", "label") if k in spec},
                    **(context or {}),
                }  # fmt: skip
                audit.append(audit.who(actor or owner), "job.submit", job_id, details)
        return self.get(job_id)

    def insert(self, c: Any, new: NewJob) -> tuple[str, bool]:
        """Insert ``new`` inside the transaction ``c``: (its id, True), or (the id of the job
        that already holds its dedup key, False)."""
        now = time.time()
        event: dict[str, Any] = {"at": _iso(now), "event": "admitted"}
        if new.parent:
            event["after"] = new.parent
        cur = c.execute(
            "INSERT INTO jobs (id, kind, spec, owner, priority, resources, mem_bytes, status,"
            " max_attempts, created, history, dedup, pipeline, parent)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (dedup) DO NOTHING",
            (new.id, new.kind, json.dumps(new.spec), new.owner, new.priority,
             json.dumps(new.resources), int(new.resources.get("mem_bytes") or 0), "ADMITTED",
             new.max_attempts, now, json.dumps([event]), new.dedup, new.spec.get("pipeline"),
             new.parent),
        )  # fmt: skip
        if cur.rowcount == 1:
            return new.id, True
        r = c.execute("SELECT id FROM jobs WHERE dedup = ?", (new.dedup,)).fetchone()
        return r[0], False

    def by_dedup(self, key: str) -> Job | None:
        """The job submitted under dedup ``key``, or None."""
        with self._read() as c:
            r = c.execute(f"SELECT {_COLS} FROM jobs WHERE dedup = ?", (key,)).fetchone()
        return _row(r) if r else None

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

    def list(
        self, *, status: str | None = None, pipeline: str | None = None, limit: int = 100
    ) -> list[Job]:
        """Jobs, newest first; only those in ``status`` and of ``pipeline`` (an id or a unique
        prefix of one) when given."""
        where, params = [], []
        if status:
            where.append("status = ?")
            params.append(status.upper())
        if pipeline:  # a unique prefix is enough, as with job ids
            where.append("pipeline LIKE ?")
            params.append(pipeline + "%")
        sql = f"SELECT {_COLS} FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
        with self._read() as c:
            rows = c.execute(f"{sql} ORDER BY created DESC LIMIT ?", (*params, limit)).fetchall()
        return [_row(r) for r in rows]

    def page(
        self,
        *,
        limit: int,
        offset: int = 0,
        status: str | None = None,
        kind: str | None = None,
        owner: str | None = None,
    ) -> tuple[list[Job], int]:
        """One page of jobs, newest first, and how many match: ``limit`` rows from ``offset``,
        only those in ``status``, of ``kind`` and by ``owner`` when given. Paged in SQL, by the
        primary key (ids sort by submit time), so a page costs the same at any queue size."""
        where, params = [], []
        for column, value in (("status", status and status.upper()), ("kind", kind),
                              ("owner", owner)):  # fmt: skip
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        cond = f" WHERE {' AND '.join(where)}" if where else ""
        with self._read() as c:
            total = c.execute(f"SELECT COUNT(*) FROM jobs{cond}", params).fetchone()[0]
            rows = c.execute(
                f"SELECT {_COLS} FROM jobs{cond} ORDER BY id DESC LIMIT ? OFFSET ?",
                (*params, limit, offset),
            ).fetchall()
        return [_row(r) for r in rows], int(total)

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
            # each owner's running jobs counted once, not once per candidate row
            r = c.execute(
                f"SELECT {_COLS} FROM jobs j LEFT JOIN (SELECT owner AS o, COUNT(*) AS n"
                " FROM jobs WHERE status = 'RUNNING' AND lease_until >= ? GROUP BY owner) r"
                " ON r.o = j.owner WHERE mem_bytes <= ? AND cancel = 0 AND"
                " (status = 'ADMITTED' OR (status = 'RUNNING' AND lease_until < ?))"
                " ORDER BY priority DESC, COALESCE(r.n, 0) ASC, created ASC LIMIT 1"
                + (" FOR UPDATE OF j SKIP LOCKED" if self.pg else ""),
                (now, capacity, now),
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
               error: str | None = None, then: NewJob | None = None) -> bool:  # fmt: skip
        """End the job (SUCCEEDED, FAILED or CANCELLED) if the fence is still its own; with
        ``then`` (a pipeline's next stage), insert that job in the same transaction, its id
        recorded in this job's result (``next_job``) and history."""
        if status not in TERMINAL:
            raise ValueError(status)
        result = dict(result or {})
        event: dict[str, Any] = {"event": status.lower(), **({"error": error} if error else {})}
        if result.get("pipeline_stopped"):
            event["pipeline stopped"] = result["pipeline_stopped"]
        cols = {"finished": time.time(), "lease_until": None, "result": result, "error": error}
        return self._update(job_id, fence, status, cols, event, then=then)

    def requeue(self, job_id: str, fence: int, reason: str) -> bool:
        """Hand the job back to the queue (its worker is stopping; it resumes elsewhere)."""
        return self._update(
            job_id, fence, "ADMITTED", {"lease_until": None, "worker": None},
            {"event": "requeued", "reason": reason},
        )  # fmt: skip

    def _update(self, job_id: str, fence: int, status: str, cols: dict[str, Any],
                event: dict[str, Any], then: NewJob | None = None) -> bool:  # fmt: skip
        with self._tx() as c:
            r = c.execute(
                "SELECT history FROM jobs WHERE id = ? AND fence = ? AND status = 'RUNNING'",
                (job_id, fence),
            ).fetchone()
            if r is None:
                return False  # fenced out: another worker holds the job now
            if then is not None:  # the pipeline's next stage: queued with this finish, or not
                next_id, _ = self.insert(c, then)
                cols = {**cols, "result": {**cols["result"], "next_job": next_id}}
                event = {**event, "next": next_id}
            if isinstance(cols.get("result"), dict):
                cols = {**cols, "result": json.dumps(cols["result"])}
            history = [*json.loads(r[0]), {"at": _iso(time.time()), **event}]
            sets = ", ".join(f"{k} = ?" for k in cols)
            c.execute(
                f"UPDATE jobs SET status = ?, {sets}, history = ? WHERE id = ?",
                (status, *cols.values(), json.dumps(history), job_id),
            )
        return True

    # ------------------------------------------------------------------ the user's verbs

    def cancel(
        self, job_id: str, *, actor: str | None = None, context: dict[str, Any] | None = None
    ) -> Job:
        """ADMITTED: cancelled at once. RUNNING: its worker stops it at the next heartbeat.
        Audited as ``job.cancel`` by ``actor`` (default the OS user) when the job was queued or
        running (a finished job is left as it is, and nothing is recorded)."""
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
            if job.status in ("ADMITTED", "RUNNING"):
                details = {"kind": job.kind, "owner": job.owner, "status": job.status}
                audit.append(audit.who(actor), "job.cancel", job.id, {**details, **(context or {})})
        return self.get(job.id)

    def retry(
        self, job_id: str, *, actor: str | None = None, context: dict[str, Any] | None = None
    ) -> Job:
        """A FAILED or CANCELLED job back in the queue, with a fresh allowance of attempts.
        Audited as ``job.retry`` (see ``cancel``)."""
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
            details = {"kind": job.kind, "owner": job.owner, "status": job.status}
            audit.append(audit.who(actor), "job.retry", job.id, {**details, **(context or {})})
        return self.get(job.id)


__all__ = ["STATES", "TERMINAL", "Job", "JobStore", "NewJob", "job_dir", "jobs_root", "new_id"]
