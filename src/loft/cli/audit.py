"""loft audit: memorisation audits of trained models (canary exposure), and the audit trail of
every state change (hash-chained; LOFT_HOME/audit/trail.jsonl or the team database)."""

from __future__ import annotations

from typing import Any

import typer

app = typer.Typer(
    help="Audit what a trained model memorised (canaries inserted with `data.canaries: N`), "
    "and read or verify the audit trail of state changes.",
    no_args_is_help=True,
)


def log_cmd(
    limit: int = typer.Option(20, "--limit", "-n", min=1, max=10_000, help="Entries to show."),
    offset: int = typer.Option(0, "--offset", min=0, help="Skip this many (newest first)."),
    actor: str | None = typer.Option(None, "--actor", help="Only this user's entries."),
    action: str | None = typer.Option(
        None, "--action", help="Only actions starting with this (registry., job.cancel, ...)."
    ),
    target: str | None = typer.Option(None, "--target", help="Only this target (bot:3, ...)."),
    since: str | None = typer.Option(
        None, "--since", help="At or after this ISO date/time (UTC unless it says +HH:MM)."
    ),
    until: str | None = typer.Option(None, "--until", help="Before this ISO date/time."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """The newest entries of the audit trail, filtered: who changed what, when.

    `--since 2026-12-01 --until 2026-12-02` is the whole of 1 December (UTC)."""
    import json

    from loft.cli.output import console
    from loft.core import audit

    entries = audit.read(limit, offset, actor, action, target=target, since=since, until=until)
    if json_out:
        for e in entries:
            print(json.dumps(e, sort_keys=True))
        return
    where = audit.location()
    if not entries:
        filtered = any(v is not None for v in (actor, action, target, since, until))
        console.print(f"no entries{' match' if filtered else ''} in {where}", markup=False)
        return
    from rich.table import Table

    table = Table(title=where)
    for col in ("seq", "time (UTC)", "actor", "action", "target", "details"):
        table.add_column(col, overflow="fold")
    for e in entries:
        details = json.dumps(e["details"], sort_keys=True) if e.get("details") else ""
        table.add_row(str(e["seq"]), e["ts"], e["actor"], e["action"], str(e["target"]), details)
    console.print(table)


app.command("log")(log_cmd)
app.command("trail", hidden=True)(log_cmd)  # the name before `log`; scripts may still use it


@app.command("verify")
def verify_cmd() -> None:
    """Check the audit trail's hash chain end to end (and the HMACs, when a key is configured):
    exit 0 when intact, 1 naming the first entry that was edited, removed, added or moved (or
    cut short). Prints the newest entry's hash: keep a copy elsewhere, since a trail cut short
    after it still verifies but no longer ends with it."""
    from loft.cli.output import console, err_console
    from loft.core import audit

    where = audit.location()
    ok, _entries, _bad, reason = audit.verify()
    if not ok:
        err_console.print(f"{where}: BROKEN at {reason}", markup=False)
        raise typer.Exit(1)
    console.print(f"{where}: {reason}", markup=False)
    newest = audit.head()
    if newest is not None:
        console.print(f"newest entry #{newest['seq']}: {newest['hash']}", markup=False)


@app.command("canaries")
def canaries_cmd(
    ref: str = typer.Argument(
        ..., metavar="REF", help="Registry ref (name@champion, name:3) or a run dir."
    ),
    candidates: int = typer.Option(
        1000, "--candidates", min=1, help="Random secrets of the same shape to rank against."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for the random candidates."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Exposure of each canary the model was trained on (Carlini et al., "The Secret Sharer").

    exposure = log2(candidates + 1) - log2(rank), rank 1 = the true secret is the most likely.
    A canary counts as memorised at rank 1 or 2. For a registry ref the summary is recorded on
    the version (canary_exposure_mean, canary_exposure_max, canaries_memorised).
    """
    from loft.cli.output import console, print_json
    from loft.evaluate.audit import audit_canaries

    report = audit_canaries(ref, candidates=candidates, seed=seed, progress=not json_out)
    if json_out:
        print_json(report)
        return
    _print(console, report)


def _print(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    top = report["max_possible_exposure"]
    table = Table(title=f"{report['ref']}: canary exposure vs {report['candidates']} candidates")
    for col in ("canary", "rank", "exposure (bits)", "memorised"):
        table.add_column(col)
    for row in report["canaries"]:
        flag = "[red]yes[/]" if row["memorised"] else "no"
        table.add_row(row["canary"], str(row["rank"]), f"{row['exposure']:.2f} / {top:.2f}", flag)
    console.print(table)
    console.print(
        f"mean exposure {report['mean_exposure']:.2f} bits, max {report['max_exposure']:.2f}; "
        f"{report['n_memorised']} of {len(report['canaries'])} memorised "
        f"(threshold {report['memorised_threshold']:.2f} bits = rank 2)"
    )
