"""loft jobs submit|list|show|logs|cancel|retry, and loft worker (LOFT_HOME/jobs.db).

``loft jobs submit FILE`` takes a training config or a pipeline file (top-level ``stages:``,
jobs/pipelines.py); ``job_from_file`` reads either, for ``loft schedule add --job FILE`` too."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from loft.cli.output import console, err_console, print_json

app = typer.Typer(
    help="Queue fine-tunes, evaluations, merges, exports and studies for `loft worker`.",
    no_args_is_help=True,
)

STATUS_STYLE = {"ADMITTED": "cyan", "RUNNING": "bold cyan", "SUCCEEDED": "green",
                "FAILED": "red", "CANCELLED": "yellow"}  # fmt: skip


_ROOT: list[typer.Typer] = []


def _owner(owner: str | None) -> str:

    from loft.core.audit import who

    return who(owner)


def _check_args(kind: str, args: list[str]) -> None:
    """Parse ARGS as `loft <command>` would (unknown options, missing arguments: exit 2 now, not
    when a worker runs the job)."""
    from loft.core.errors import ConfigError
    from loft.jobs.kinds import COMMANDS

    cmd = typer.main.get_command(_ROOT[0])
    words = COMMANDS[kind]
    ctx = cmd.context_class(cmd, info_name="loft")
    for word in words:
        cmd = cmd.get_command(ctx, word)  # type: ignore[attr-defined]
        if cmd is None:
            raise ConfigError(
                f"job of kind {kind}: this loft has no `loft {' '.join(words)}` command",
                hint="Upgrade loft on the machine that submits (and on the workers).",
            )
    try:
        cmd.make_context(" ".join(words), list(args), parent=ctx)
    except Exception as e:  # typer's (vendored) click usage errors
        if not hasattr(e, "format_message"):
            raise
        raise ConfigError(
            f"job of kind {kind}: `loft {' '.join(words)} {' '.join(args)}`: {e.format_message()}",
            hint=f"See `loft {' '.join(words)} --help`.",
        ) from None


def job_from_file(
    path: str | Path, sets: list[str], *, store: Any, max_attempts: int = 3
) -> dict[str, Any]:
    """The job a file describes, validated: a pipeline file (top-level ``stages:``, every stage
    checked, problems with FILE:LINE and key path) or a training config (as `loft train` reads
    it, against the planner's estimate). ``{kind, spec, resources, max_attempts, stages}``:
    ``stages`` is how many (1 for a training config)."""
    from loft.core.errors import ConfigError
    from loft.jobs import kinds, pipelines

    capacities = [c for _, c in store.worker_capacities()]
    if pipelines.is_pipeline(path):
        if sets:
            raise ConfigError(
                f"{path} is a pipeline: --set applies to one training config; set keys in the "
                "pipeline file, under the train stage's `set:`"
            )
        stages = pipelines.load_pipeline(
            path, capacities=capacities, check_args=_check_args, max_attempts=max_attempts
        )
        first = pipelines.first_job(stages, owner="")
        return {"kind": first.kind, "spec": first.spec, "resources": first.resources,
                "max_attempts": max_attempts, "stages": len(stages)}  # fmt: skip
    adm = kinds.admit_train(path, list(sets), capacities=capacities)
    return {"kind": "train", "spec": adm.spec, "resources": adm.resources,
            "max_attempts": max_attempts, "stages": 1}  # fmt: skip


@app.command("submit")
def submit_cmd(
    args: list[str] = typer.Argument(
        None,
        metavar="CONFIG | PIPELINE | -- ARGS",
        help="A training config (kind train), a pipeline file (top-level `stages:`), or after "
        "`--` the arguments of the kind's command.",
    ),
    kind: str = typer.Option(
        "train",
        "--kind",
        help="train, eval, merge, export, tune, data-prepare, data-validate, watch, rollout.",
    ),
    sets: list[str] = typer.Option([], "--set", "-s", help="train: override a config key."),
    priority: int = typer.Option(0, "--priority", help="Higher runs first."),
    owner: str | None = typer.Option(None, "--owner", help="Default: $LOFT_USER or your login."),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="Tries before FAILED."),
    json_out: bool = typer.Option(False, "--json", help="Print the job as JSON."),
) -> None:
    """Validate a job now (exit 2 with the reason when it cannot run) and queue it; prints the
    job id and returns. A training job is checked against the planner's memory estimate: one that
    fits no worker is refused with the itemised estimate. A pipeline file queues its first stage;
    each later stage is queued when the one before it succeeds (README: "Pipelines and
    schedules")."""
    from loft.core.errors import ConfigError
    from loft.jobs import KINDS, JobStore

    args = list(args or [])
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: one of {', '.join(KINDS)}")
    store = JobStore()
    stages = 1
    if kind == "train":
        if len(args) != 1:
            raise ConfigError(
                "loft jobs submit CONFIG: one training config (or pipeline file)",
                hint="--kind for others.",
            )
        found = job_from_file(args[0], list(sets), store=store, max_attempts=max_attempts)
        kind, spec, resources, stages = (found["kind"], found["spec"], found["resources"],
                                         found["stages"])  # fmt: skip
    else:
        if sets:
            raise ConfigError("--set is for training jobs; pass the command's own options after --")
        _check_args(kind, args)
        spec, resources = {"args": args}, {}
    job = store.submit(kind, spec, owner=_owner(owner), priority=priority, resources=resources,
                       max_attempts=max_attempts, actor=_owner(None))  # fmt: skip
    if json_out:
        print_json(job.to_dict())
        return
    console.print(job.id, markup=False)
    need = resources.get("mem_bytes")
    err_console.print(
        f"queued {kind} job {job.id} (priority {priority}"
        + (f", needs ~{need / 2**30:.2f} GiB" if need else "")
        + f"). Follow: loft jobs logs {job.id} -f   Cancel: loft jobs cancel {job.id}",
        markup=False,
        soft_wrap=True,
    )
    if job.pipeline:
        later = ", ".join(st["kind"] for st in job.spec.get("then", []))
        err_console.print(
            f"pipeline {job.pipeline}: stage 1 of {stages}"
            + (f"; then {later}, each queued when the one before it succeeds" if later else "")
            + f". Its jobs: loft jobs list --pipeline {job.pipeline}",
            markup=False,
            soft_wrap=True,
        )


@app.command("list")
def list_cmd(
    status: str | None = typer.Option(None, "--status", help="Only jobs in this state."),
    pipeline: str | None = typer.Option(
        None, "--pipeline", help="Only the stages of this pipeline (its id, or a prefix)."
    ),
    limit: int = typer.Option(100, "--limit", "-n", min=1),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Jobs, newest first."""
    from loft.jobs import JobStore

    jobs = JobStore().list(status=status, pipeline=pipeline, limit=limit)
    if json_out:
        print_json([j.to_dict() for j in jobs])
        return
    if not jobs:
        console.print("No jobs. Queue one with `loft jobs submit CONFIG`.")
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("job", "kind", "owner", "prio", "status", "tries", "age", "progress / result"):
        table.add_column(col, no_wrap=col != "progress / result")
    now = time.time()
    for j in jobs:
        style = STATUS_STYLE.get(j.status, "")
        table.add_row(
            j.id, j.kind, j.owner, str(j.priority), f"[{style}]{j.status}[/]",
            f"{j.attempts}/{j.max_attempts}", _age(now - j.created), _brief(j),
        )  # fmt: skip
    console.print(table)


def _age(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _brief(j) -> str:
    if j.status == "RUNNING" and j.progress.get("step"):
        p = j.progress
        eta = f", eta {p['eta_s']}s" if "eta_s" in p else ""
        return f"step {p['step']}/{p['total']}, loss {p['loss']:.4f}{eta}"
    if j.result.get("registered"):
        return f"registered {j.result['registered']}"
    if j.error:
        return j.error[:80]
    if j.result.get("pipeline_stopped"):
        return f"pipeline stopped: {j.result['pipeline_stopped']}"[:80]
    if j.pipeline:
        return f"pipeline {j.pipeline} stage {int(j.spec.get('stage', 0)) + 1}"
    return ""


@app.command("show")
def show_cmd(
    job_id: str = typer.Argument(..., metavar="ID"),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """One job: its spec, state, attempts, history, progress and result."""
    from loft.jobs import JobStore

    d = JobStore().get(job_id).to_dict()
    if json_out:
        print_json(d)
        return
    import json

    for key in ("id", "kind", "owner", "priority", "status", "attempts", "max_attempts",
                "created", "started", "finished", "worker", "log", "error"):  # fmt: skip
        if d[key] is not None:
            console.print(f"{key + ':':<14}{d[key]}", markup=False)
    if d["pipeline"]:
        _show_pipeline(d)
    for key in ("spec", "resources", "progress", "result"):
        if d[key]:
            console.print(f"{key + ':':<14}{json.dumps(d[key])}", markup=False)
    for h in d["history"]:
        rest = ", ".join(f"{k} {v}" for k, v in h.items() if k not in ("at", "event"))
        console.print(f"  {h['at']}  {h['event']}{'  ' + rest if rest else ''}", markup=False)


def _show_pipeline(d: dict[str, Any]) -> None:
    """A pipeline stage's place: the pipeline, its stage, the job before it, what comes next."""
    from loft.jobs.pipelines import describe

    then = d["spec"].get("then", [])
    stage = int(d["spec"].get("stage", 0))
    console.print(
        f"{'pipeline:':<14}{d['pipeline']} (stage {stage + 1} of {stage + 1 + len(then)}; "
        f"all its jobs: loft jobs list --pipeline {d['pipeline']})",
        markup=False,
    )
    if d["parent"]:
        console.print(f"{'after:':<14}{d['parent']}", markup=False)
    if d["result"].get("next_job"):
        console.print(f"{'next job:':<14}{d['result']['next_job']}", markup=False)
    elif d["result"].get("pipeline_stopped"):
        console.print(f"{'stopped:':<14}{d['result']['pipeline_stopped']}", markup=False)
    elif then and d["status"] in ("FAILED", "CANCELLED"):
        console.print(
            f"{'stopped:':<14}this stage is {d['status']}; `loft jobs retry {d['id']}` "
            "continues the pipeline once it succeeds",
            markup=False,
        )
    for i, st in enumerate(then, start=stage + 1):
        console.print(f"  then stages[{i}]: {describe(st)}", markup=False, soft_wrap=True)


@app.command("logs")
def logs_cmd(
    job_id: str = typer.Argument(..., metavar="ID"),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until it ends."),
) -> None:
    """The job's log (every attempt's output, each under its own header)."""
    import sys

    from loft.jobs import TERMINAL, JobStore, job_dir

    store = JobStore()
    job = store.get(job_id)
    path = job_dir(job.id) / "log.txt"
    pos = 0
    while True:
        if path.is_file():
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
        if not follow or store.get(job.id).status in TERMINAL and _drained(path, pos):
            break
        time.sleep(0.5)


def _drained(path, pos: int) -> bool:
    return not path.is_file() or path.stat().st_size <= pos


@app.command("cancel")
def cancel_cmd(job_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Cancel a queued job at once, or a running one (its worker stops it at a checkpoint)."""
    from loft.jobs import JobStore

    job = JobStore().cancel(job_id)
    say = "cancelled" if job.status == "CANCELLED" else f"{job.status}: cancel requested"
    err_console.print(f"job {job.id}: {say}", markup=False)


@app.command("retry")
def retry_cmd(job_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Queue a FAILED or CANCELLED job again (a training job resumes from its checkpoint)."""
    from loft.jobs import JobStore

    job = JobStore().retry(job_id)
    err_console.print(f"job {job.id}: queued again ({job.status})", markup=False)


def register(root: typer.Typer) -> None:
    _ROOT.append(root)  # the whole CLI, to parse a job's command line as the command would

    @root.command("worker")
    def worker_cmd(
        lease: float = typer.Option(
            30.0, "--lease", min=0.3, help="Lease seconds (renewed every third)."
        ),
        poll: float = typer.Option(
            1.0, "--poll", min=0.01, help="Seconds between claims when idle."
        ),
        max_jobs: int | None = typer.Option(None, "--max-jobs", min=1, help="Stop after N jobs."),
        until_idle: bool = typer.Option(
            False, "--until-idle", help="Stop when the queue is empty."
        ),
        capacity_gb: float | None = typer.Option(
            None, "--capacity-gb", help="Memory this worker offers (default: this machine's RAM)."
        ),
        gpus: str | None = typer.Option(
            None, "--gpus", help="GPU indices its jobs get, e.g. 0,1 (CUDA_VISIBLE_DEVICES)."
        ),
        executor: str | None = typer.Option(
            None,
            "--executor",
            help="local (processes here) or ray (Ray's Jobs API); default LOFT_EXECUTOR or "
            "executor.kind in settings.yaml, else local.",
        ),
        ray_address: str | None = typer.Option(
            None, "--ray-address", help="The Ray dashboard, http://HEAD:8265 (or LOFT_RAY_ADDRESS)."
        ),
        no_scheduler: bool = typer.Option(
            False, "--no-scheduler", help="Do not fire due schedules from this worker."
        ),
    ) -> None:
        """Claim and run queued jobs on this machine, one at a time, each in its own process
        group with its log under LOFT_HOME/jobs/ID (or, with --executor ray, as a Ray job on the
        cluster, its output and status mirrored here). SIGTERM or Ctrl-C: the running job
        checkpoints and goes back to the queue. Run several for several jobs at once.
        Every worker also fires the schedules that are due (`loft schedule`), each tick once
        however many workers run."""
        from loft.jobs import Worker

        cap = int(capacity_gb * 2**30) if capacity_gb is not None else None
        devices = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else None
        w = Worker(capacity=cap, lease_s=lease, poll_s=poll, max_jobs=max_jobs,
                   until_idle=until_idle, gpus=devices, executor=executor,
                   ray_address=ray_address, scheduler=not no_scheduler,
                   say=lambda m: err_console.print(m, markup=False, soft_wrap=True))  # fmt: skip
        n = w.run()
        err_console.print(f"worker {w.id}: ran {n} job(s)", markup=False)


def register_up(root: typer.Typer) -> None:
    @root.command("up")
    def up_cmd(
        serve_args: list[str] = typer.Argument(
            None, metavar="[-- SERVE_ARGS]", help="Options for `loft serve` (after --)."
        ),
        workers: int = typer.Option(1, "--workers", min=0, help="Job workers to run here."),
        no_serve: bool = typer.Option(False, "--no-serve", help="No model server."),
        no_portal: bool = typer.Option(False, "--no-portal", help="No portal."),
        portal_port: int = typer.Option(8600, "--portal-port", help="The portal's port."),
        portal_host: str = typer.Option(
            "127.0.0.1", "--portal-host", help="The portal's interface (0.0.0.0: your network)."
        ),
        gpus: str | None = typer.Option(None, "--gpus", help="Passed to each worker."),
    ) -> None:
        """Start this machine's part of the deployment: job workers, the model server
        (`loft serve`, 127.0.0.1:8000 unless SERVE_ARGS say otherwise) and the portal (`loft
        portal`, 127.0.0.1:8600), supervised together. SIGTERM or Ctrl-C stops all of them;
        running jobs go back to the queue. If one exits, the others are stopped."""
        from loft.jobs.up import up

        worker_args = ["--gpus", gpus] if gpus else []
        portal_args = ["--host", portal_host, "--port", str(portal_port)]
        code = up(
            workers=workers, worker_args=worker_args,
            serve_args=None if no_serve else list(serve_args or []),
            portal_args=None if no_portal else portal_args,
            say=lambda m: err_console.print(m, markup=False, soft_wrap=True),
        )  # fmt: skip
        raise typer.Exit(code)
