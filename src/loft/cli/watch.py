"""loft watch: re-evaluate a registered alias against its gate; mark it degraded, roll back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def register(root: typer.Typer) -> None:
    @root.command("watch")
    def watch_cmd(
        ref: str = typer.Argument(
            ..., metavar="REF", help="An alias to follow, e.g. bot@champion."
        ),
        data: Path = typer.Option(..., "--data", help="Held-out records (jsonl/json/csv/parquet)."),
        gate: Path = typer.Option(..., "--gate", help="Gate YAML with `gate:` expressions."),
        rollback: bool = typer.Option(
            False, "--rollback", help="When the gate fails, move the alias back one version."
        ),
        metrics: str | None = typer.Option(
            None, "--metrics", help="Comma-separated metrics; default: those the gate names."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Evaluate the version behind REF on --data and run --gate on the fresh results.

        Absolute checks use the fresh metrics; relative checks (`champion + X`) compare with the
        recorded metrics of the version the alias pointed at before (skipped, with the reason,
        when there is none). A failing check marks the version degraded and, with --rollback,
        moves the alias back. Exit 0 when healthy, 3 when degraded.

        This is one check; running it on a schedule is the job of loft's job system (the future
        `loft jobs`) or of cron/systemd timers calling `loft watch` meanwhile.
        """
        from loft.cli.output import console, print_json
        from loft.core.errors import GateRefused
        from loft.evaluate.continuous import check_alias

        wanted = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
        result = check_alias(
            ref, data, gate, rollback=rollback, metrics=wanted, progress=not json_out
        )
        if json_out:
            print_json(result)
        else:
            _print(console, result)
        if not result["passed"]:
            name, version, back = ref.partition("@")[0], result["version"], result["rolled_back_to"]
            failed = ", ".join(c["expr"] for c in result["checks"] if not c["passed"])
            if back is not None:
                message = f"{ref} (version {version}) is degraded: {failed}; rolled back"
                hint = (
                    f"{ref} now serves version {back}; version {version} is marked degraded "
                    f"(`loft registry show {name}:{version}`)."
                )
            else:
                message = f"{ref} (version {version}) is degraded: {failed}"
                hint = (
                    f"See `loft registry show {name}:{version}`; roll back with "
                    f"`loft registry rollback {name}` (or watch with --rollback)."
                )
            raise GateRefused(message, promotion=result, hint=hint)


def _print(console: Any, result: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{result['ref']} (version {result['version']})")
    for col in ("check", "value", "result"):
        table.add_column(col)
    for c in result["checks"]:
        status = "[green]PASS[/]" if c["passed"] else "[red]FAIL[/]"
        if c["passed"] and c["reason"].startswith("skipped"):
            status = "[yellow]SKIP[/]"
        value = "-" if c["value"] is None else f"{c['value']:.6g}"
        table.add_row(c["expr"], value, f"{status} {c['reason']}")
    console.print(table)
    console.print("[green]healthy[/]" if result["passed"] else "[red]degraded[/]")
