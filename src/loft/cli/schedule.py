"""loft schedule add|list|show|remove|check|run-due: jobs on a cron, an interval, or a metric
trigger (jobs/schedules.py), fired by every `loft worker`."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import typer

from loft.cli.output import console, err_console, print_json

app = typer.Typer(
    help="Submit jobs on a schedule (cron, interval) or when a metric drops (`loft worker` "
    "fires them).",
    no_args_is_help=True,
)


def _say(message: str) -> None:
    err_console.print(message, markup=False, soft_wrap=True)


def _condition(when: str) -> tuple[str, Any]:
    """``REF METRIC OP NUMBER`` -> (REF, the parsed gate Check); ConfigError (exit 2) with the
    reason for anything else, before any model is loaded."""
    from loft.core.errors import ConfigError
    from loft.evaluate.gates import parse_gate
    from loft.evaluate.run import metric_problem
    from loft.jobs.schedules import split_condition

    ref, expr = split_condition(when)
    check = parse_gate([expr], source="--when")[0]
    if check.relative:
        raise ConfigError(
            f"--when {when!r}: a trigger compares a metric with a number, not with `champion`",
            hint='e.g. --when "support_tickets@champion json_exact_match < 0.85".',
        )
    why = metric_problem(check.metric)
    if why:
        raise ConfigError(f"--when {when!r}: {why}")
    return ref, check


def _rollout_running(ref: str) -> str | None:
    """Why a trigger on ``ref``'s model waits: a rollout of it is running (its outcome decides
    what the champion is; a retraining now would start a second one)."""
    from loft.registry import get_split, parse_ref

    name = parse_ref(ref)[0]
    split = get_split(name)
    if split is None:
        return None
    return f"a rollout of {name} is running ({name}:{split['candidate']} at {split['share']:.0%})"


@app.command("add")
def add_cmd(
    name: str = typer.Argument(..., help="The schedule's name (letters, digits, . _ -)."),
    args: list[str] = typer.Argument(
        None, metavar="[-- ARGS]", help="With --kind: the arguments of the kind's command."
    ),
    job: str | None = typer.Option(
        None, "--job", help="The job to submit: a training config or a pipeline file (`stages:`)."
    ),
    kind: str | None = typer.Option(
        None, "--kind", help="Instead of --job: a job of this kind, its command's ARGS after --."
    ),
    sets: list[str] = typer.Option([], "--set", "-s", help="--job CONFIG: override a key."),
    cron: str | None = typer.Option(
        None, "--cron", help="5-field cron expression, e.g. '0 3 * * 1' (or @daily, @weekly)."
    ),
    tz: str | None = typer.Option(None, "--tz", help="--cron's time zone (IANA name; UTC)."),
    every: str | None = typer.Option(
        None, "--every", help="Interval: 45s, 30m, 2h, 1d (a metric trigger's checks: 1h)."
    ),
    when: str | None = typer.Option(
        None,
        "--when",
        help="Metric trigger: 'REF METRIC OP NUMBER', e.g. "
        "'support_tickets@champion json_exact_match < 0.85' (needs --data).",
    ),
    data: str | None = typer.Option(None, "--data", help="--when: held-out records to score."),
    priority: int = typer.Option(0, "--priority", help="The submitted jobs' priority."),
    owner: str | None = typer.Option(None, "--owner", help="Default: $LOFT_USER or your login."),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="Tries before FAILED."),
    replace: bool = typer.Option(False, "--replace", help="Replace a schedule of this name."),
    json_out: bool = typer.Option(False, "--json", help="Print the schedule as JSON."),
) -> None:
    """Add a schedule: a job on --cron or --every, or when a --when condition holds.

    With --when, the condition is checked at each --every (default 1h) or --cron tick. The job is
    validated now as `loft jobs submit` validates it (exit 2 with the reason). It first fires at
    its next tick; ticks missed while no worker ran fire once, for the latest of them."""
    from loft.cli.jobs import _check_args, _owner, job_from_file
    from loft.core.errors import ConfigError
    from loft.jobs import KINDS, JobStore
    from loft.jobs.schedules import add_schedule

    args = list(args or [])
    if (job is None) == (kind is None):
        raise ConfigError(
            "loft schedule add: name the job with --job FILE (a training config or a pipeline "
            "file) or --kind KIND -- ARGS",
        )
    if when is not None:
        _condition(when)  # a bad condition fails here, exit 2, not at its first check
    store = JobStore()
    if job is not None:
        if args:
            raise ConfigError("ARGS after -- go with --kind; --job names a file")
        spec = job_from_file(job, list(sets), store=store, max_attempts=max_attempts)
        source = str(os.path.abspath(job))
    else:
        if kind not in KINDS or kind == "train":
            others = ", ".join(k for k in KINDS if k != "train")
            raise ConfigError(f"--kind {kind!r}: one of {others} (a training job: --job CONFIG)")
        if sets:
            raise ConfigError("--set is for --job CONFIG; pass the command's own options after --")
        _check_args(kind, args)
        spec = {"kind": kind, "spec": {"args": args}, "resources": {}, "max_attempts": max_attempts}
        source = None
    job_dict = {k: spec[k] for k in ("kind", "spec", "resources", "max_attempts")}
    sched = add_schedule(
        store, name, job=job_dict, every_s=every, cron=cron, tz=tz, when=when, data=data,
        owner=_owner(owner), priority=priority, replace=replace, source=source,
        actor=_owner(None),
    )  # fmt: skip
    if json_out:
        print_json(sched.to_dict())
        return
    d = sched.to_dict()
    _say(
        f"schedule {sched.name}: {sched.trigger}; submits {_job_text(d)}. Next tick "
        f"{d['next_tick']}. `loft worker` (or `loft up`) fires it; see `loft schedule show "
        f"{sched.name}`."
    )


def _job_text(d: dict[str, Any]) -> str:
    job = d["job"]
    spec = job["spec"]
    if spec.get("then") is not None:
        n = 1 + len(spec["then"])
        return f"the pipeline {job['source']} ({n} stage{'s' if n > 1 else ''})"
    if job["kind"] == "train":
        return f"train {spec['config']}" + "".join(f" --set {s}" for s in spec.get("set", []))
    return " ".join([job["kind"], *spec.get("args", [])])


@app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Schedules: trigger, next tick, the last tick fired and its job, the last metric check."""
    from loft.jobs import JobStore
    from loft.jobs.schedules import list_schedules

    now = time.time()
    rows = [s.to_dict(now) for s in list_schedules(JobStore())]
    if json_out:
        print_json(rows)
        return
    if not rows:
        console.print("No schedules. Add one with `loft schedule add NAME --cron ... --job FILE`.")
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("name", "trigger", "job", "next tick", "last fired", "last check"):
        table.add_column(col, no_wrap=col in ("name", "next tick"))
    for d in rows:
        nxt = f"due {d['due']}" if d["due"] else (d["next_tick"] or "?")
        fired = f"{d['fired_tick']} {d['fired_job']}" if d["fired_job"] else "-"
        table.add_row(d["name"], d["trigger"], _job_text(d), nxt, fired, _check_text(d))
    console.print(table, markup=False)


def _check_text(d: dict[str, Any]) -> str:
    c = d["last_check"]
    if not c:
        return "-" if d["when"] else ""
    if c.get("error"):
        return f"{c['tick']}: error: {c['error'][:60]}"
    value = "-" if c["value"] is None else f"{c['value']:.4g}"
    verdict = f"fired {c['job']}" if c.get("job") else "held, not fired" if c["holds"] else "ok"
    return f"{c['tick']}: {c['metric']} {value} ({verdict})"


@app.command("show")
def show_cmd(
    name: str = typer.Argument(...),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """One schedule: its trigger, job, owner, next tick, and what it fired last."""
    from loft.jobs import JobStore
    from loft.jobs.schedules import get_schedule

    d = get_schedule(JobStore(), name).to_dict()
    if json_out:
        print_json(d)
        return
    console.print(f"{'name:':<13}{d['name']}", markup=False)
    console.print(f"{'trigger:':<13}{d['trigger']}", markup=False, soft_wrap=True)
    console.print(f"{'job:':<13}{_job_text(d)}", markup=False, soft_wrap=True)
    for key in ("owner", "priority", "created", "next_tick", "due", "last_tick", "last_job",
                "fired_tick", "fired_job"):  # fmt: skip
        if d[key] is not None:
            console.print(f"{key + ':':<13}{d[key]}", markup=False)
    if d["last_check"]:
        console.print(f"{'last check:':<13}{json.dumps(d['last_check'])}", markup=False)
    console.print(f"{'spec:':<13}{json.dumps(d['job']['spec'])}", markup=False, soft_wrap=True)


@app.command("remove")
def remove_cmd(name: str = typer.Argument(...)) -> None:
    """Remove a schedule (the jobs it queued stay queued)."""
    from loft.core.errors import NotFoundError
    from loft.jobs import JobStore
    from loft.jobs.schedules import remove_schedule

    if not remove_schedule(JobStore(), name):
        raise NotFoundError(f"no schedule {name!r}", hint="See `loft schedule list`.")
    _say(f"schedule {name}: removed")


@app.command("run-due")
def run_due_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Fire the schedules that are due now, once.

    Every `loft worker` does this each second; this is for system cron, or a deployment without
    a worker running."""
    from loft.jobs import JobStore
    from loft.jobs.schedules import fire_due, iso

    fired = fire_due(JobStore())
    if json_out:
        print_json([f.to_dict() for f in fired])
        return
    for f in fired:
        if f.error:
            _say(f"schedule {f.schedule}: not fired: {f.error}")
        else:
            _say(f"schedule {f.schedule}: tick {iso(f.tick)}: queued {f.kind} job {f.job}")
    if not fired:
        _say("nothing due")


@app.command("check")
def check_cmd(
    name: str = typer.Argument(...),
    tick: str | None = typer.Option(
        None,
        "--tick",
        help="The check tick (epoch seconds or ISO time): when the condition holds, submit the "
        "schedule's job for it (once). Without: only measure and say.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the check as JSON."),
) -> None:
    """Evaluate a metric trigger's model on its data now.

    With --tick (as the scheduler's check jobs run it), record the value on the schedule and
    submit its job when the condition holds, once per tick."""
    from loft.core.errors import ConfigError, LoftError
    from loft.evaluate.gates import OPS
    from loft.evaluate.run import evaluate_model
    from loft.jobs import JobStore, job_dir
    from loft.jobs.schedules import get_schedule, parse_tick, record_check

    store = JobStore()
    sched = get_schedule(store, name)
    if not sched.when:
        raise ConfigError(
            f"schedule {name!r} has no metric trigger (it fires on {sched.trigger})",
            hint="`loft schedule check` evaluates schedules added with --when.",
        )
    at = parse_tick(tick) if tick is not None else None
    ref, check = _condition(sched.when)
    try:
        report = evaluate_model(
            ref, sched.data, metrics=[check.metric], progress=not json_out, source="schedule"
        )
    except LoftError as e:
        if at is not None:
            record_check(store, name, at, ref=ref, metric=check.metric, value=None, holds=False,
                         error=e.message)  # fmt: skip
        raise
    value = report.candidate.get(check.metric)
    holds = value is not None and math.isfinite(value) and OPS[check.op](value, check.value)
    if at is not None:
        rec = record_check(store, name, at, ref=report.ref, metric=check.metric, value=value,
                           holds=holds, hold=_rollout_running(ref))  # fmt: skip
    else:
        rec = {"tick": None, "ref": report.ref, "metric": check.metric, "value": value,
               "holds": holds, "job": None, "new": False}  # fmt: skip
    if os.environ.get("LOFT_JOB_ID"):  # run as a job: the check is that job's result
        out = job_dir(os.environ["LOFT_JOB_ID"]) / "result.json"
        out.write_text(json.dumps({k: v for k, v in rec.items() if k != "new"}))
    if json_out:
        print_json(rec)
        return
    shown = "nan" if value is None else f"{value:.6g}"
    said = f"{report.ref} on {sched.data}: {check.metric} = {shown}; `{check.expr}` "
    if not holds:
        _say(said + "does not hold: nothing to submit")
    elif at is None:
        _say(said + "holds: the schedule would fire (its check jobs pass --tick to submit)")
    elif rec.get("held"):
        _say(said + f"holds, but nothing is submitted: {rec['held']}")
    elif rec["new"]:
        _say(said + f"holds: queued {sched.kind} job {rec['job']} for tick {tick}")
    else:
        _say(said + f"holds: job {rec['job']} was queued for this tick already")
