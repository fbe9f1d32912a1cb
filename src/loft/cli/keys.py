"""loft keys: create, list and revoke API keys for `loft serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

app = typer.Typer(
    help="API keys for the model server: which adapters each key may use, and how fast.",
    no_args_is_help=True,
)

_DB_HELP = "Key store file (default LOFT_HOME/keys.db)."


def _store(db: Path | None) -> Any:
    from loft.serve.keys import KeyStore

    return KeyStore(db)


@app.command("create")
def create_cmd(
    name: str = typer.Option(..., "--name", help="A unique name for the key, e.g. ci or alice."),
    adapters: str = typer.Option(
        "", "--adapters", help="Comma-separated registered model names, or '*' for all."
    ),
    base: bool = typer.Option(False, "--base/--no-base", help="Also allow the bare base model."),
    metrics: bool = typer.Option(
        False,
        "--metrics",
        help="Also allow GET /metrics and the full `loft serve status` (for Prometheus and "
        "operators); may be given alone.",
    ),
    rate: str | None = typer.Option(
        None, "--rate", help="Request limit such as 10/s, 60/min, 1000/hour (default: none)."
    ),
    expires: str | None = typer.Option(
        None, "--expires", help="Lifetime such as 45m, 12h, 30d, 2w (default: never)."
    ),
    db: Path | None = typer.Option(None, "--db", help=_DB_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with the key."),
) -> None:
    """Create a key; it is shown once, alone on the last line of stdout.

    KEY=$(loft keys create --name ci --adapters support-bot | tail -1)

    Adapter names not (yet) in the registry are accepted with a warning: the key reaches such
    an adapter once a model of that name is registered.
    """
    from loft.cli.output import err_console, print_json

    names = [a.strip() for a in adapters.split(",") if a.strip()]
    from loft.core.audit import who

    record, key = _store(db).create(
        name, names, include_base=base, rate=rate, expires=expires, metrics=metrics,
        actor=who(), context={"via": "cli"},
    )  # fmt: skip
    _warn_unknown(names)
    if json_out:
        print_json({**record.to_dict(), "key": key})
        return
    err_console.print(
        f"created key [bold]{record.name}[/] (id {record.id}): "
        f"adapters {_adapters(record)}, base {'yes' if record.include_base else 'no'}, "
        f"metrics {'yes' if record.metrics else 'no'}, "
        f"rate {record.rate or 'unlimited'}, expires {record.expires or 'never'}",
        soft_wrap=True,
    )
    err_console.print(
        "[yellow]This is the only time the key is shown; loft stores only its hash. "
        "Copy it now.[/]",
        soft_wrap=True,
    )
    print(key)


@app.command("list")
def list_cmd(
    all_keys: bool = typer.Option(False, "--all", help="Include revoked keys."),
    db: Path | None = typer.Option(None, "--db", help=_DB_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the keys as JSON."),
) -> None:
    """List keys (never the keys themselves: names, ids, what they allow, when created and
    last used). A server records a key's last use at most once a minute."""
    from loft.cli.output import console, print_json

    records = _store(db).list_keys(include_revoked=all_keys)
    if json_out:
        print_json([r.to_dict() for r in records])
        return
    if not records:
        console.print("no keys; create one with: loft keys create --name NAME --adapters MODEL")
        return
    from rich.table import Table

    table = Table()
    for col in ("name", "id", "adapters", "base", "metrics", "rate", "created", "last used"):
        table.add_column(col)
    table.add_column("expires")
    table.add_column("status")
    colours = {"active": "green", "expired": "yellow", "revoked": "red"}
    for r in records:
        status = r.status()
        table.add_row(
            r.name,
            r.id,
            _adapters(r),
            "yes" if r.include_base else "no",
            "yes" if r.metrics else "no",
            r.rate or "-",
            _when(r.created),
            _when(r.last_used, never="never"),
            _when(r.expires),
            f"[{colours[status]}]{status}[/]",
        )
    console.print(table)
    console.print("times are UTC; last used is recorded at most once a minute per key")


@app.command("revoke")
def revoke_cmd(
    name_or_id: str = typer.Argument(..., metavar="NAME_OR_ID", help="Key name or 8-hex id."),
    db: Path | None = typer.Option(None, "--db", help=_DB_HELP),
) -> None:
    """Revoke a key. A running server stops accepting it within 5 seconds."""
    from loft.cli.output import console
    from loft.core.audit import who

    record = _store(db).revoke(name_or_id, actor=who(), context={"via": "cli"})
    console.print(f"revoked key {record.name} (id {record.id}) at {record.revoked}")


def _adapters(record: Any) -> str:
    if record.adapters == ["*"]:
        return "* (all)"
    return ", ".join(record.adapters) or "-"


def _when(iso: str | None, never: str = "never") -> str:
    """'2026-12-07T21:22:09+00:00' -> '2026-12-07 21:22' (stored times are all UTC)."""
    return iso[:16].replace("T", " ") if iso else never


def _warn_unknown(names: list[str]) -> None:
    """Warn, naming them, about adapters that are not registered (yet); never refuse."""
    import difflib

    from loft.cli.output import err_console
    from loft.core.errors import LoftError
    from loft.serve.keys import unknown_adapters

    if not names or names == ["*"]:
        return
    try:
        unknown, registered = unknown_adapters(names)
    except LoftError as e:
        err_console.print(
            f"[yellow]warning:[/] could not check the adapter names against the registry: "
            f"{e.message}",
            soft_wrap=True,
        )
        return
    for n in unknown:
        close = difflib.get_close_matches(n, registered, n=1)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        err_console.print(
            f"[yellow]warning:[/] no registered model is named {n!r}{guess}; the key is created "
            "anyway and will reach it once a model of that name is registered. Registered: "
            f"{', '.join(registered) or '(none)'}.",
            soft_wrap=True,
            markup=True,
        )
