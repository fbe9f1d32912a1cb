"""Schedules: jobs submitted on a cron expression or an interval, or when a metric crosses a
threshold (``loft schedule``); rows in the job queue's database (the ``schedules`` table).

A schedule names one job (a kind and its spec: a training config, a pipeline's first stage, a
command's arguments), its owner and priority, and one trigger:

- ``cron``: a 5-field cron expression (``0 3 * * 1``, or ``@daily`` and its kin) in UTC or in
  ``tz`` (an IANA zone; daylight-saving changes as cronsim handles them: a skipped local time runs
  at the next one, a repeated one once);
- ``every_s``: an interval in whole seconds, its ticks counted from the moment it was added;
- ``when`` (with ``data``): a metric trigger, ``REF METRIC OP NUMBER`` such as
  ``support_tickets@champion json_exact_match < 0.85``, checked at each tick of its cron
  expression or interval (default every hour). At a check tick the scheduler queues a
  ``schedule-check`` job (``loft schedule check NAME --tick T``); that job evaluates REF on
  ``data`` and, when the condition holds, queues the schedule's job for that tick
  (``record_check``). jobs/ evaluates nothing itself (DESIGN.md): the CLI command does.

The scheduler is ``fire_due``: every ``loft worker`` calls it about once a second (and ``loft
schedule run-due`` once, for system cron or tests). For each schedule it takes the latest tick
that is due (after the schedule was added, after the last tick fired, not after now) and fires it
exactly once across all workers and restarts: the schedule's ``last_tick`` moves by
compare-and-set and the job is inserted with the unique dedup key ``schedule:NAME:TICK`` (a
metric check's job: ``schedule:NAME:TICK:check``), both in one transaction. Ticks missed while no
worker ran fire once, for the latest of them, not as a burst; a schedule added now first fires at
its next tick, never for one before it was added.

The job a schedule submits was validated when the schedule was added; it is stored as its spec
(a training config by path, so edits to the config apply at the next firing). A pipeline starts
under a fresh pipeline id each time.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loft.core import audit
from loft.core.errors import ConfigError, NotFoundError
from loft.jobs.kinds import KINDS
from loft.jobs.pipelines import renewed
from loft.jobs.store import TERMINAL, JobStore, NewJob

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_CHECK_EVERY_S = 3600
CHECK_KIND = "schedule-check"
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_EVERY_RE = re.compile(r"^(?:\d+[dhms])+$")
CRON_ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}  # fmt: skip
_COLS = (
    "name, kind, spec, resources, max_attempts, source, owner, priority, cron, tz, every_s, "
    "cond, data, created, last_tick, last_job, fired_tick, fired_job, last_check"
)


def iso(t: float | None) -> str | None:
    """A tick as ``2025-01-06T03:00:00Z``."""
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def parse_tick(text: str | float) -> int:
    """A tick from epoch seconds or an ISO-8601 time (UTC unless it names its offset)."""
    try:
        return int(float(text))
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--tick {text!r}: not a time", hint="Pass epoch seconds or e.g. 2025-01-06T03:00:00Z."
        ) from None
    return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp())


def parse_duration(text: str | float) -> int:
    """``45s``, ``30m``, ``2h``, ``1d``, ``1h30m`` (or a number of seconds, rounded to a whole
    one) -> whole seconds, at least 1."""
    if isinstance(text, int | float):
        seconds = float(round(text)) if math.isfinite(text) else float(text)
    else:
        t = text.strip().lower().replace(" ", "")
        if not _EVERY_RE.match(t):
            raise ConfigError(
                f"--every {text!r}: not an interval",
                hint="Write a number and a unit: 45s, 30m, 2h, 1d (or several, as in 1h30m).",
            )
        seconds = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([dhms])", t))
    if not math.isfinite(seconds) or seconds < 1:
        raise ConfigError(f"--every {text!r}: an interval is at least 1 s")
    return int(seconds)


def duration(seconds: int) -> str:
    """Seconds as ``parse_duration`` reads them (``5400`` -> ``1h30m``)."""
    out, rest = "", int(seconds)
    for unit, size in _UNITS.items():
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out or "0s"


def _zone(tz: str | None) -> Any:
    if not tz or tz.upper() == "UTC":
        return UTC
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"--tz {tz!r}: no such time zone here",
            hint="Name an IANA zone such as Europe/Berlin or America/New_York (or leave it UTC).",
        ) from None


def check_cron(expr: str, tz: str | None = None) -> str:
    """The expression as stored (``@daily`` spelled out), once it is known to be a valid 5-field
    cron expression that fires at all; ConfigError with cronsim's reason otherwise."""
    from cronsim import CronSim, CronSimError

    text = CRON_ALIASES.get(expr.strip().lower(), expr.strip())
    fields = text.split()
    hint = (
        "Five fields: minute hour day-of-month month day-of-week, e.g. `0 3 * * 1` (Mondays at "
        "03:00) or `*/15 * * * *`; or @hourly, @daily, @weekly, @monthly, @yearly."
    )
    if len(fields) != 5:
        raise ConfigError(f"--cron {expr!r}: {len(fields)} fields, expected 5", hint=hint)
    try:
        next(CronSim(" ".join(fields), datetime.now(_zone(tz))))
    except (CronSimError, StopIteration) as e:
        raise ConfigError(f"--cron {expr!r}: {e or 'it never fires'}", hint=hint) from None
    return " ".join(fields)


def split_condition(when: str) -> tuple[str, str]:
    """``REF EXPR`` -> (REF, EXPR); REF a registry reference (``name@alias``, ``name:N``). The
    expression itself is parsed by loft's gate parser in the CLI (jobs/ imports no evaluate)."""
    ref, _, expr = when.strip().partition(" ")
    if not expr.strip() or not re.match(r"^[^@:\s]+[@:][^@:\s]+$", ref):
        raise ConfigError(
            f"--when {when!r}: expected `REF METRIC OP VALUE`",
            hint='e.g. --when "support_tickets@champion json_exact_match < 0.85": a model '
            "reference (NAME@ALIAS or NAME:VERSION), then a condition on one metric.",
        )
    return ref, expr.strip()


@dataclass
class Schedule:
    name: str
    kind: str
    spec: dict[str, Any]
    owner: str
    priority: int = 0
    resources: dict[str, Any] = field(default_factory=dict)
    max_attempts: int = 3
    source: str | None = None
    cron: str | None = None
    tz: str | None = None
    every_s: int | None = None
    when: str | None = None
    data: str | None = None
    created: float = 0.0
    last_tick: float | None = None  # the latest tick fired (the job, or a metric check's job)
    last_job: str | None = None
    fired_tick: float | None = None  # the latest tick at which the schedule's own job was queued
    fired_job: str | None = None
    last_check: dict[str, Any] | None = None

    @property
    def trigger(self) -> str:
        cadence = (
            f"cron {self.cron!r} ({self.tz or 'UTC'})" if self.cron
            else f"every {duration(self.every_s or DEFAULT_CHECK_EVERY_S)}"
        )  # fmt: skip
        if self.when:
            return f"when {self.when} on {Path(self.data or '').name}, checked {cadence}"
        return cadence

    def latest_tick(self, now: float) -> float | None:
        """The latest tick at or before ``now`` and after the schedule was added."""
        if self.cron:
            from cronsim import CronSim

            start = datetime.fromtimestamp(math.floor(now) + 1, _zone(self.tz))
            tick = next(CronSim(self.cron, start, reverse=True)).timestamp()
            return tick if tick > self.created else None
        every, anchor = self._every()
        k = math.floor((now - anchor) / every)
        return anchor + k * every if k >= 1 else None

    def next_tick(self, now: float) -> float:
        """The first tick after ``now``."""
        if self.cron:
            from cronsim import CronSim

            start = datetime.fromtimestamp(math.floor(max(now, self.created)), _zone(self.tz))
            return next(CronSim(self.cron, start)).timestamp()
        every, anchor = self._every()
        return anchor + (max(0, math.floor((now - anchor) / every)) + 1) * every

    def due(self, now: float) -> float | None:
        """The tick to fire now (the latest one due, not fired yet), or None."""
        tick = self.latest_tick(now)
        if tick is None or (self.last_tick is not None and tick <= self.last_tick):
            return None
        return tick

    def _every(self) -> tuple[int, int]:
        return int(self.every_s or DEFAULT_CHECK_EVERY_S), math.floor(self.created)

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """The stable JSON form (``loft schedule list/show --json``)."""
        now = time.time() if now is None else now
        try:
            nxt, due = iso(self.next_tick(now)), self.due(now)
        except ConfigError:  # a time zone this machine does not know
            nxt, due = None, None
        check = dict(self.last_check) if self.last_check else None
        if check:
            check["tick"] = iso(check.get("tick"))
        return {
            "name": self.name,
            "trigger": self.trigger,
            "cron": self.cron,
            "tz": self.tz,
            "every_s": self.every_s,
            "when": self.when,
            "data": self.data,
            "job": {"kind": self.kind, "spec": self.spec, "source": self.source},
            "owner": self.owner,
            "priority": self.priority,
            "created": iso(self.created),
            "next_tick": nxt,
            "due": iso(due),
            "last_tick": iso(self.last_tick),
            "last_job": self.last_job,
            "fired_tick": iso(self.fired_tick),
            "fired_job": self.fired_job,
            "last_check": check,
        }


def _row(r: tuple) -> Schedule:
    (name, kind, spec, res, max_att, source, owner, prio, cron, tz, every_s, cond, data, created,
     last_tick, last_job, fired_tick, fired_job, last_check) = r  # fmt: skip
    return Schedule(name, kind, json.loads(spec), owner, prio, json.loads(res), max_att, source,
                    cron, tz, every_s, cond, data, created, last_tick, last_job, fired_tick,
                    fired_job, json.loads(last_check) if last_check else None)  # fmt: skip


@dataclass
class Firing:
    """One tick fired by ``fire_due`` (or, with ``error``, a schedule it could not fire)."""

    schedule: str
    tick: float | None
    job: str | None = None
    kind: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "tick": iso(self.tick), "job": self.job,
                "kind": self.kind, "error": self.error}  # fmt: skip


def _check_job(job: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any], int]:
    """``{"kind", "spec", "resources"?, "max_attempts"?}`` checked for shape (the caller has
    validated its content as a job of its kind)."""
    kind, spec = job.get("kind"), job.get("spec")
    if kind not in KINDS:
        raise ConfigError(f"schedule job kind {kind!r}: one of {', '.join(KINDS)}")
    if not isinstance(spec, dict):
        raise ConfigError(f"schedule job spec: a mapping, got {type(spec).__name__}")
    if kind == "train" and not isinstance(spec.get("config"), str):
        raise ConfigError("a train job's spec names its config: {'config': PATH, 'set': [...]}")
    args = spec.get("args", [])
    if kind != "train" and not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
        raise ConfigError(f"a {kind} job's spec is {{'args': [strings]}}, got {spec!r}")
    extra = set(job) - {"kind", "spec", "resources", "max_attempts"}
    if extra:
        raise ConfigError(f"schedule job: unknown key(s) {', '.join(sorted(extra))}")
    json.dumps(spec)  # JSON or nothing: never pickles
    return kind, spec, dict(job.get("resources") or {}), int(job.get("max_attempts", 3))


def add_schedule(
    store: JobStore,
    name: str,
    *,
    job: dict[str, Any],
    every_s: float | None = None,
    cron: str | None = None,
    tz: str | None = None,
    when: str | None = None,
    data: str | None = None,
    owner: str,
    priority: int = 0,
    replace: bool = False,
    source: str | None = None,
    actor: str | None = None,
) -> Schedule:
    """Add (or, with ``replace``, replace) the schedule ``name`` that submits ``job``
    (``{"kind": K, "spec": {...}}``, validated by the caller as a job of its kind) on ``cron``
    (in ``tz``) or every ``every_s`` seconds; with ``when`` (and ``data``), only when that
    metric condition holds at a check tick (default every hour). It first fires at its next
    tick. ConfigError (exit 2) for a bad name, trigger or job, or a name in use. Audited as
    ``schedule.add`` by ``actor`` (default ``owner``); the jobs it submits later are not (the
    schedule is the change; each job's history says which schedule queued it)."""
    if not NAME_RE.match(name or ""):
        raise ConfigError(
            f"schedule name {name!r}: letters, digits, '.', '_' and '-', up to 64, starting with "
            "a letter or digit"
        )
    kind, spec, resources, max_attempts = _check_job(job)
    if "then" in spec:  # a pipeline: each firing starts it under a pipeline id of its own
        spec = {k: v for k, v in spec.items() if k != "pipeline"}
    if cron is not None and every_s is not None:
        raise ConfigError("a schedule has one cadence: --cron or --every, not both")
    if cron is None and every_s is None and when is None:
        raise ConfigError(
            "a schedule needs a trigger: --cron EXPR, --every INTERVAL or --when CONDITION"
        )
    if tz and cron is None:
        raise ConfigError("--tz applies to --cron expressions (an interval has no time zone)")
    cron = check_cron(cron, tz) if cron is not None else None
    every = parse_duration(every_s) if every_s is not None else None
    if when is not None:
        split_condition(when)
        if not data:
            raise ConfigError("--when needs --data: the held-out records the metric is taken on")
        data_path = Path(data).resolve()
        if not data_path.is_file():
            raise NotFoundError(f"--data {data}: no such file", hint="Pass held-out records.")
        data = str(data_path)
        if cron is None and every is None:
            every = DEFAULT_CHECK_EVERY_S
    elif data:
        raise ConfigError("--data is for a metric trigger (--when)")
    s = Schedule(name, kind, spec, owner, priority, resources, max_attempts, source, cron,
                 tz if cron else None, every, when, data, time.time())  # fmt: skip
    with store.transaction() as c:
        exists = c.execute("SELECT 1 FROM schedules WHERE name = ?", (name,)).fetchone()
        if exists and not replace:
            raise ConfigError(
                f"a schedule named {name!r} exists already",
                hint=f"Replace it with --replace, or remove it first: loft schedule remove {name}",
            )
        c.execute("DELETE FROM schedules WHERE name = ?", (name,))
        c.execute(
            "INSERT INTO schedules (name, kind, spec, resources, max_attempts, source, owner,"
            " priority, cron, tz, every_s, cond, data, created)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (name, kind, json.dumps(spec), json.dumps(resources), max_attempts, source, owner,
             priority, s.cron, s.tz, s.every_s, when, data, s.created),
        )  # fmt: skip
        details = {"kind": kind, "owner": owner, "trigger": s.trigger, "replaced": bool(exists)}
        audit.append(audit.who(actor or owner), "schedule.add", name, details)
    return get_schedule(store, name)


def remove_schedule(store: JobStore, name: str, *, actor: str | None = None) -> bool:
    """Remove the schedule ``name``; False when there was none. Jobs it queued stay queued.
    Audited as ``schedule.remove`` by ``actor`` (default the OS user)."""
    with store.transaction() as c:
        gone = c.execute("DELETE FROM schedules WHERE name = ?", (name,)).rowcount == 1
        if gone:
            audit.append(audit.who(actor), "schedule.remove", name, {})
    return gone


def get_schedule(store: JobStore, name: str) -> Schedule:
    with store.reading() as c:
        r = c.execute(f"SELECT {_COLS} FROM schedules WHERE name = ?", (name,)).fetchone()
    if r is None:
        raise NotFoundError(
            f"no schedule {name!r} in {store.where}", hint="See `loft schedule list`."
        )
    return _row(r)


def list_schedules(store: JobStore) -> list[Schedule]:
    with store.reading() as c:
        rows = c.execute(f"SELECT {_COLS} FROM schedules ORDER BY name").fetchall()
    return [_row(r) for r in rows]


def _job_for(s: Schedule, tick: int, *, fired: bool = False) -> NewJob:
    """What firing ``s`` at ``tick`` queues: its job, or for a metric trigger the check (its
    job once the check ``fired``)."""
    if s.when and not fired:
        args = [s.name, "--tick", str(tick)]
        return NewJob(CHECK_KIND, {"args": args, "schedule": s.name}, s.owner, s.priority,
                      dedup=f"schedule:{s.name}:{tick}:check")  # fmt: skip
    return NewJob(s.kind, {**renewed(s.spec), "schedule": s.name}, s.owner, s.priority,
                  dict(s.resources), s.max_attempts, dedup=f"schedule:{s.name}:{tick}")  # fmt: skip


def fire_due(store: JobStore, now: float | None = None) -> list[Firing]:
    """Fire every schedule's latest due tick, each exactly once however many workers call this
    at once (see the module's docstring). Returns what this call fired; a schedule that cannot
    be fired here (a time zone this machine lacks) is returned with its ``error``."""
    now = time.time() if now is None else now
    out: list[Firing] = []
    for s in list_schedules(store):
        try:
            tick = s.due(now)
        except ConfigError as e:
            out.append(Firing(s.name, None, error=e.message))
            continue
        if tick is None:
            continue
        new = _job_for(s, int(tick))
        mine = not s.when
        with store.transaction() as c:
            won = c.execute(
                "UPDATE schedules SET last_tick = ?, last_job = ?"
                + (", fired_tick = ?, fired_job = ?" if mine else "")
                + " WHERE name = ? AND created = ? AND COALESCE(last_tick, -1) = ?",
                (tick, new.id, *((tick, new.id) if mine else ()), s.name, s.created,
                 -1 if s.last_tick is None else s.last_tick),
            ).rowcount  # fmt: skip
            if won != 1:
                continue  # another worker fired this tick (or the schedule was just replaced)
            job_id, _ = store.insert(c, new)
            if job_id != new.id:  # queued before under its dedup key: that job stands
                c.execute(
                    "UPDATE schedules SET last_job = ?"
                    + (", fired_job = ?" if mine else "")
                    + " WHERE name = ?",
                    (job_id, *((job_id,) if mine else ()), s.name),
                )
        out.append(Firing(s.name, tick, job_id, new.kind))
    return out


def _unfinished(c: Any, job_id: str | None) -> str | None:
    """Why a trigger must wait: the job it fired (or a stage of its pipeline) is not done yet."""
    if not job_id:
        return None
    r = c.execute("SELECT pipeline FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if r is None:
        return None
    if r[0]:
        q = c.execute(
            "SELECT id, status FROM jobs WHERE pipeline = ? AND status NOT IN (?, ?, ?)",
            (r[0], *TERMINAL),
        ).fetchone()
    else:
        q = c.execute(
            "SELECT id, status FROM jobs WHERE id = ? AND status NOT IN (?, ?, ?)",
            (job_id, *TERMINAL),
        ).fetchone()
    if q is None:
        return None
    return f"job {q[0]} it fired before is {q[1]}" + (f" (pipeline {r[0]})" if r[0] else "")


def record_check(
    store: JobStore,
    name: str,
    tick: int | None,
    *,
    ref: str,
    metric: str,
    value: float | None,
    holds: bool,
    error: str | None = None,
    hold: str | None = None,
) -> dict[str, Any]:
    """Record a metric check of ``name`` on its row (``last_check``, unless a later tick's check
    is there already) and, when its condition ``holds`` at ``tick``, queue the schedule's job for
    that tick, once: a check run again for the same tick finds the job queued before. Returns
    the record, with ``job`` (the queued job's id, or None) and ``new`` (queued by this call).

    A condition that holds does not queue anything while the job it fired last (or any stage of
    that job's pipeline) has not finished, nor when the caller says why not (``hold``: e.g. a
    rollout of the model is running): a drop that lasts must not queue a retraining per check.
    The record then says ``held`` and why."""
    value = None if value is None or not math.isfinite(value) else float(value)
    record: dict[str, Any] = {"tick": tick, "at": iso(time.time()), "ref": ref, "metric": metric,
                              "value": value, "holds": holds, "job": None}  # fmt: skip
    if error:
        record["error"] = error
    with store.transaction() as c:
        r = c.execute(f"SELECT {_COLS} FROM schedules WHERE name = ?", (name,)).fetchone()
        if r is None:
            raise NotFoundError(f"no schedule {name!r} in {store.where}")
        s = _row(r)
        new = False
        if holds and tick is not None and s.fired_tick != tick:
            hold = hold or _unfinished(c, s.fired_job)
        if holds and hold:
            record["held"] = hold
        elif holds and tick is not None:
            record["job"], new = store.insert(c, _job_for(s, tick, fired=True))
        sets: dict[str, Any] = {}
        before = (s.last_check or {}).get("tick")
        if tick is not None and (before is None or tick >= before):
            sets["last_check"] = json.dumps(record)
        if record["job"] and (s.fired_tick is None or tick >= s.fired_tick):
            sets.update(fired_tick=tick, fired_job=record["job"])
        if sets:
            c.execute(
                f"UPDATE schedules SET {', '.join(f'{k} = ?' for k in sets)} WHERE name = ?",
                (*sets.values(), name),
            )
    return {**record, "new": new}


__all__ = [
    "CHECK_KIND",
    "Firing",
    "Schedule",
    "add_schedule",
    "check_cron",
    "duration",
    "fire_due",
    "get_schedule",
    "iso",
    "list_schedules",
    "parse_duration",
    "parse_tick",
    "record_check",
    "remove_schedule",
    "split_condition",
]
