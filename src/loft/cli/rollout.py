"""loft rollout start|status|tick|abort: a candidate takes a growing share of live traffic while a
gate holds on the live comparison with the champion (loft.serve.rollout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from loft.cli.output import console, err_console, print_json

app = typer.Typer(
    help="Roll a new version out gradually: a weighted split of live traffic, gated step by step.",
    no_args_is_help=True,
)

TICK_SCHEDULE = "rollout-{name}"
MIN_TICK_S = 5.0


def _candidate(name: str, text: str) -> int:
    from loft.core.errors import ConfigError
    from loft.registry import parse_ref

    if text.isdigit():
        return int(text)
    cand, alias, version = parse_ref(text)
    if cand != name or version is None:
        raise ConfigError(
            f"--candidate {text!r}: a rollout of {name} takes a version of {name} "
            f"({name}:VERSION or VERSION); the champion it competes with is {name}@champion.",
            hint=f"Versions: `loft registry show {name}`.",
        )
    return version


def _schedule_ticks(name: str, every_s: float, owner: str | None) -> str:
    """The interval schedule that runs `loft rollout tick NAME` as a job on the workers."""
    from loft.cli.jobs import _owner
    from loft.jobs import JobStore
    from loft.jobs.schedules import add_schedule

    sched = TICK_SCHEDULE.format(name=name)
    add_schedule(
        JobStore(), sched, job={"kind": "rollout", "spec": {"args": ["tick", name]}},
        every_s=max(every_s / 4, MIN_TICK_S), owner=_owner(owner), replace=True,
    )  # fmt: skip
    return sched


def _unschedule(name: str) -> None:
    from loft.jobs import JobStore
    from loft.jobs.schedules import remove_schedule

    remove_schedule(JobStore(), TICK_SCHEDULE.format(name=name))


@app.command("start")
def start_cmd(
    name: str = typer.Argument(..., help="The registered model whose traffic is split."),
    candidate: str = typer.Option(
        ..., "--candidate", help="NAME:VERSION (or VERSION) to roll out."
    ),
    steps: str = typer.Option(
        "5,25,50,100", "--steps", help="Candidate's share per step, in percent; the last is 100."
    ),
    gate: Path = typer.Option(..., "--gate", help="Gate YAML over live metrics, run every step."),
    every: str = typer.Option("30m", "--every", help="Time per step before its decision."),
    min_requests: int = typer.Option(
        20, "--min-requests", min=0, help="Requests each arm needs before a step is judged."
    ),
    max_wait: int = typer.Option(
        4, "--max-wait", min=1, help="Intervals a step waits for enough data before aborting."
    ),
    audit: list[Path] = typer.Option(
        [], "--audit", help="The servers' audit logs (default: LOFT_HOME/serve/audit.jsonl)."
    ),
    promote_gate: Path | None = typer.Option(
        None, "--promote-gate", help="Gate for the final promotion (default: the version's own)."
    ),
    scorer: list[str] = typer.Option(
        [],
        "--scorer",
        help="Live metric over logged outputs (log_prompts on): `module.path:function`, called "
        "as function(completion, prompt) -> float, named after the function.",
    ),  # fmt: skip
    schedule: bool = typer.Option(
        True,
        "--schedule/--no-schedule",
        help="Let `loft worker` run the decisions (else run `loft rollout tick` yourself).",
    ),  # fmt: skip
    owner: str | None = typer.Option(None, "--owner", help="Owner of the scheduled tick jobs."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Send the first step's share of NAME's traffic to the candidate; the champion keeps the rest.

    Each client stays on one version (sticky per X-Loft-Route-Key header, the request's `user`,
    or the API key). After each --every, the gate runs on the two arms' live metrics from the
    audit log (requests, error_rate, latency_p50_ms, latency_p95_ms, feedback, feedback_score,
    json_valid): pass moves to the next step, fail sends everything back to the champion, and
    passing the step before 100 promotes the candidate through the normal gated promotion. Every
    decision is in `loft registry history NAME`.
    """
    from dataclasses import asdict

    from loft.jobs.schedules import parse_duration
    from loft.serve import rollout

    plan = rollout.start(
        name, _candidate(name, candidate), steps=rollout.parse_steps(steps), gate=gate,
        every_s=parse_duration(every), audit=audit or None, min_requests=min_requests,
        max_wait=max_wait, promote_gate=promote_gate, scorers=scorer,
    )  # fmt: skip
    try:
        sched = _schedule_ticks(name, plan.every_s, owner) if schedule else None
    except BaseException:
        rollout.abort(name, reason="its schedule could not be created")
        raise
    if json_out:
        print_json({**asdict(plan), "schedule": sched})
        return
    err_console.print(
        f"rolling out {name}:{plan.candidate} against {name}:{plan.champion}: "
        f"{plan.steps[0]:g}% of {name}'s traffic now, steps "
        f"{', '.join(f'{s:g}' for s in plan.steps)}%, a decision every {every}"
        + (f" (schedule {sched}, run by `loft worker`)" if sched else " (run `loft rollout tick`)")
        + f". Watch: loft rollout status {name}   Stop: loft rollout abort {name}",
        markup=False,
        soft_wrap=True,
    )


@app.command("tick")
def tick_cmd(
    name: str = typer.Argument(..., help="The registered model."),
    json_out: bool = typer.Option(False, "--json", help="Print the decision as JSON."),
) -> None:
    """Decide the current step if its interval has passed (what the schedule runs).

    Exits 0 whatever the decision; a rollout that ended removes its schedule."""
    from loft.serve import rollout

    decision = rollout.tick(name)
    if decision.ended:
        _unschedule(name)
    if json_out:
        print_json(decision.to_dict())
        return
    _print_metrics(decision.metrics)
    console.print(f"{decision.action}: {decision.reason}", markup=False, soft_wrap=True)


@app.command("status")
def status_cmd(
    name: str = typer.Argument(..., help="The registered model."),
    json_out: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """The running rollout: step, share, requests and metrics per version, the gate's verdict."""
    from loft.serve import rollout

    st = rollout.status(name)
    if json_out:
        print_json(st)
        return
    if not st["running"]:
        console.print(f"no rollout of {name} is running (see `loft registry history {name}`)")
        return
    console.print(
        f"{st['candidate']} vs {st['champion']}: step {st['step']}/{len(st['steps'])}, "
        f"{st['share']:.0%} of traffic to the candidate since {st['step_started']}; "
        f"next decision in {st['next_decision_in_s']:.0f} s",
        markup=False,
    )
    _print_metrics(st["metrics"])
    if st["waiting_for"]:
        console.print(f"waiting: {st['waiting_for']}", markup=False)
    else:
        _print_checks(st["checks"])
        style = "green" if st["verdict"] == "pass" else "red"
        console.print(f"verdict now: [{style}]{st['verdict']}[/]")


@app.command("abort")
def abort_cmd(
    name: str = typer.Argument(..., help="The registered model."),
    reason: str = typer.Option("", "--reason", help="Recorded in the history."),
) -> None:
    """Send every request back to the champion now and stop the rollout's schedule."""
    from loft.serve import rollout

    decision = rollout.abort(name, reason=reason)
    _unschedule(name)
    console.print(decision.reason, markup=False)


def _print_metrics(metrics: dict[str, dict[str, Any]]) -> None:
    if not metrics:
        return
    from rich.table import Table

    from loft.serve.rollout import LIVE_METRICS

    table = Table()
    table.add_column("metric")
    for ref in metrics:
        table.add_column(ref, justify="right")
    for m in LIVE_METRICS:
        cells = [metrics[ref].get(m) for ref in metrics]
        if all(c is None for c in cells):
            continue
        table.add_row(m, *("-" if c is None else f"{c:.4g}" for c in cells))
    console.print(table)


def _print_checks(checks: list[dict[str, Any]]) -> None:
    for c in checks:
        mark = "[green]PASS[/]" if c["passed"] else "[red]FAIL[/]"
        console.print(f"  {mark} {c['expr']}: {c['reason']}")
