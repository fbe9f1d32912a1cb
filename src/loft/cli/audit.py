"""loft audit: memorisation audits of trained models (canary exposure)."""

from __future__ import annotations

from typing import Any

import typer

app = typer.Typer(
    help="Audit what a trained model memorised (canaries inserted with `data.canaries: N`).",
    no_args_is_help=True,
)


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
