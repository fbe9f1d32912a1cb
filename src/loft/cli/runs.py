"""loft runs list|show, and loft ui (the MLflow UI over the tracking store)."""

from __future__ import annotations

import contextlib
import math
import signal
import socket
import sys
from typing import Any

import typer

from loft.cli.output import console, print_json

app = typer.Typer(
    help="List and inspect training runs (LOFT_HOME/runs) and their metrics.",
    no_args_is_help=True,
)

STATUS_STYLE = {
    "completed": "green",
    "finished": "green",
    "running": "cyan",
    "failed": "red",
    "interrupted": "yellow",
    "killed": "yellow",
    "incomplete": "yellow",
}


@app.command("list")
def list_cmd(
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    limit: int = typer.Option(50, "--limit", "-n", min=1, help="Show at most this many runs."),
) -> None:
    """List runs, newest first."""
    from rich.table import Table

    from loft.core.paths import runs_dir
    from loft.tracking.runs import list_runs

    rows = list_runs(limit=limit)
    if json_out:
        print_json(rows)
        return
    if not rows:
        console.print(f"No runs yet in {runs_dir()}. Start one with `loft train CONFIG`.")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("run", "status", "method", "base model", "steps", "time", "loss", "eval loss"):
        left = name in ("run", "status", "method", "base model")
        wraps = name == "base model"  # the one column that gives way on a narrow terminal
        table.add_column(
            name,
            justify="left" if left else "right",
            no_wrap=not wraps,
            min_width=8 if wraps else None,
            overflow="fold",
        )
    for r in rows:
        status = str(r.get("status") or "?")
        table.add_row(
            str(r["run_id"]),
            f"[{STATUS_STYLE.get(status.lower(), 'white')}]{status}[/]",
            _text(r.get("method")),
            _text(r.get("base_model")),
            _count(r.get("steps")),
            _duration(r.get("wall_s")),
            _float(r.get("final_train_loss")),
            _float(r.get("eval_loss")),
        )
    console.print(table)


@app.command("show")
def show_cmd(
    run: str = typer.Argument(..., help="Run id, unique prefix, MLflow run id or run directory."),
    json_out: bool = typer.Option(
        False, "--json", help="Print JSON: summary, config and per-step metric history."
    ),
) -> None:
    """Show one run: its summary, config and metric history."""
    from loft.tracking.runs import SUMMARY_FIELDS, show_run

    info = show_run(run)
    if json_out:
        print_json(info)
        return
    console.print(f"[bold]run {info['run_id']}[/]  {info.get('path', '')}")
    for field in SUMMARY_FIELDS[1:]:
        value = info.get(field)
        if value is not None:
            console.print(f"  {field:<20} {_pretty(field, value)}")
    for s in (info.get("sessions") or [])[1:]:  # the first session is the run's own start
        ran = f", ran {s['steps_run']} steps" if "steps_run" in s else ""
        console.print(f"  {'resumed':<20} at step {s['start_step']} from {s['resumed_from']}{ran}")
    ml = info.get("mlflow")
    if ml:
        where = f"{ml['run_id']} ({ml['status']}) in {ml['tracking_uri']}"
        console.print(f"  {'mlflow run':<20} {where}")
    if info.get("metrics_error"):
        console.print(f"[yellow]metrics unavailable:[/] {info['metrics_error']}")
    _print_metrics(info.get("metrics") or {})
    config = info.get("config")
    if config:
        import yaml

        console.print("[bold]config[/] (resolved.yaml)")
        console.print(yaml.safe_dump(config, sort_keys=False).rstrip(), markup=False)


@app.command("delete")
def delete_cmd(
    run: str = typer.Argument(..., help="Run id, unique prefix, MLflow run id or run directory."),
    force: bool = typer.Option(
        False, "--force", help="Delete even if it says it is running (its process is gone)."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a run's directory (checkpoints, outputs) and mark its MLflow run deleted.
    Versions registered from it are copies in the registry and stay."""
    from loft.tracking import delete_run
    from loft.tracking.runs import find_run_dir

    if not yes:
        typer.confirm(f"Delete run {find_run_dir(run)}?", abort=True)
    out = delete_run(run, force=force)
    console.print(f"deleted run {out['run_id']} ({out['path']})")
    if out.get("registered"):
        console.print(f"  {out['registered']} stays in the registry (its files are a copy)")
    if out.get("mlflow_error"):
        console.print(f"[yellow]warning:[/] its MLflow run was not deleted: {out['mlflow_error']}")


def _print_metrics(metrics: dict[str, list[dict[str, Any]]]) -> None:
    if not metrics:
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", title="metrics", title_justify="left")
    for name in ("metric", "points", "steps", "first", "last", "min", "max"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for key, history in metrics.items():
        if not history:
            continue
        values = [p["value"] for p in history]
        table.add_row(
            key,
            str(len(history)),
            f"{history[0]['step']}–{history[-1]['step']}",
            _float(values[0]),
            _float(values[-1]),
            _float(min(values)),
            _float(max(values)),
        )
    console.print(table)


def register(root: typer.Typer) -> None:
    """Adds top-level commands owned by this module (loft ui)."""
    root.command("ui")(ui)


def ui(
    port: int = typer.Option(5000, "--port", "-p", min=1, max=65535, help="Port to listen on."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to bind; 0.0.0.0 exposes it to your network."
    ),
    uri: str | None = typer.Option(
        None,
        "--uri",
        help="Tracking store (default: MLFLOW_TRACKING_URI, else LOFT_HOME/mlflow.db).",
    ),
) -> None:
    """Open the MLflow UI on the local tracking store; Ctrl-C stops it."""
    import subprocess

    from loft.core.errors import LoftError
    from loft.tracking import resolve_tracking_uri, ui_command

    store = resolve_tracking_uri(uri)
    if store.startswith(("http://", "https://")):
        console.print(f"Tracking goes to a server already; open {store} in your browser.")
        return
    if not _port_free(host, port):
        raise LoftError(
            f"cannot start the UI: {host}:{port} is already in use",
            hint=f"Pick another port, e.g. `loft ui --port {port + 1}`.",
        )
    argv, env = ui_command(store, host=host, port=port)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    console.print(f"MLflow UI for {store}\n  [bold]http://{shown}:{port}/[/]  (Ctrl-C to stop)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] listening on {host} with no authentication.")
    proc = subprocess.Popen(
        argv,
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    previous = signal.signal(signal.SIGTERM, _interrupt)
    # Ctrl-C must stop us even when SIGINT was ignored by whoever started us (a nohup'd shell,
    # a CI runner, a test harness): an ignored SIGINT is inherited across exec.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        code = 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    if code:
        raise typer.Exit(code)


def _die_with_parent() -> None:
    """In the server's process (Linux): get SIGTERM when `loft ui` dies, even by SIGKILL."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop(proc: Any) -> None:
    """SIGINT the server (it shuts its workers down); escalate to its whole group after 15 s."""
    import os
    import subprocess

    steps = ((proc.send_signal, signal.SIGINT, 15), (os.killpg, signal.SIGTERM, 5))
    for send, sig, wait in (*steps, (os.killpg, signal.SIGKILL, 5)):
        try:
            send(proc.pid, sig) if send is os.killpg else send(sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _text(v: Any) -> str:
    return "-" if v is None else str(v)


def _count(v: Any) -> str:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return "-"
    return f"{v:,.0f}"


def _float(v: Any) -> str:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return "-"
    return "nan" if math.isnan(v) else f"{v:.4g}"


def _duration(v: Any) -> str:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return "-"
    s = int(round(v))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{v:.1f}s"


def _bytes(v: Any) -> str:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return "-"
    n = float(v)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _pretty(field: str, value: Any) -> str:
    if field == "wall_s":
        return _duration(value)
    if field == "peak_mem_bytes":
        return _bytes(value)
    if field in ("train_tokens", "steps", "tokens_per_s"):
        return _count(value)
    if field in ("final_train_loss", "eval_loss"):
        return _float(value)
    return str(value)
