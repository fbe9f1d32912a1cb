"""`loft models`: list, show and add base models. Parses, calls loft.models, prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from loft.cli.output import console, human_size, print_json

app = typer.Typer(
    help="Base models: the builtin SmolLM2-135M-Instruct, local directories, added models.",
    no_args_is_help=True,
)


_size = human_size


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K"


@app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the builtin model (converted or not) and models added with `loft models add`."""
    from rich.table import Table

    from loft.models import list_models

    rows = list_models()
    if as_json:
        print_json(rows)
        return
    table = Table(title="loft models")
    table.add_column("name", no_wrap=True)
    for col in ("source", "converted", "params", "size"):
        table.add_column(col)
    table.add_column("path", overflow="fold")
    for r in rows:
        table.add_row(
            r["name"],
            r["source"],
            "yes" if r["converted"] else "no (on first use)",
            _params(r["params"]),
            _size(r["size_bytes"]),
            r["path"],
        )
    console.print(table)


def _show_table(d: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(show_header=False, title=f"model {d['name']}")
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    heads = f"{d['num_attention_heads']} (kv {d['num_key_value_heads']})"
    rows = [
        ("name", d["name"]),
        ("source", d["source"]),
        ("path", d["path"]),
        ("sha256", d["sha256"]),
        ("weights", ", ".join(d["files"])),
        ("architecture", f"{d['architecture']} ({d['model_type']})"),
        ("hidden size", str(d["hidden_size"])),
        ("layers", str(d["num_hidden_layers"])),
        ("attention heads", heads),
        ("vocab size", str(d["vocab_size"])),
        ("max positions", str(d["max_position_embeddings"])),
        ("params", f"{_params(d['params'])} ({d['params']:,})"),
        ("size", _size(d["size_bytes"])),
        ("dtype", str(d["dtype"])),
        ("chat template", "yes" if d["chat_template"] else "no"),
        ("pad token", str(d["pad_token"])),
        ("eos token", str(d["eos_token"])),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table, markup=False)


@app.command("show")
def show_cmd(
    ref: str = typer.Argument(..., help="Model name, local directory, or cached hub id org/name."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    no_verify: bool = typer.Option(
        False, "--no-verify", help="Skip re-hashing the weights against MANIFEST.json."
    ),
) -> None:
    """Resolve a model reference (converting the builtin on first use) and describe it."""
    from loft.models import describe_model, resolve_model

    details = describe_model(resolve_model(ref, verify=not no_verify))
    if as_json:
        print_json(details)
    else:
        _show_table(details)


@app.command("add")
def add_cmd(
    path: Path = typer.Argument(
        ..., help="A local HF model directory (config.json + safetensors)."
    ),
    name: str = typer.Option(..., "--name", "-n", help="Name to use it by, e.g. my-model."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a message."),
) -> None:
    """Copy a local model directory into the loft model store under NAME."""
    from loft.models import add_model

    info = add_model(path, name)
    if as_json:
        print_json(info.to_dict())
        return
    console.print(f"added model [bold]{info.name}[/] at {info.path} (sha256 {info.sha256[:16]}…)")
    console.print(f"use it with: base_model: {info.name}   or   loft models show {info.name}")


@app.command("remove")
def remove_cmd(
    name: str = typer.Argument(..., help="A model in loft's store (see `loft models list`)."),
    force: bool = typer.Option(
        False, "--force", help="Remove it even if registered versions are built on it."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove a stored model (added, or the builtin's conversion, which its next use redoes).
    Refused while registered versions name it as their base, unless --force."""
    from loft.core.errors import ConfigError
    from loft.models import remove_model
    from loft.registry import versions_built_on

    dependents = versions_built_on(name)
    if dependents and not force:
        shown = ", ".join(dependents[:8]) + (" …" if len(dependents) > 8 else "")
        raise ConfigError(
            f"{len(dependents)} registered version(s) are built on {name!r}: {shown}; without it "
            "they can be neither evaluated nor served.",
            hint="Delete those versions first (`loft registry delete NAME:VERSION`), or pass "
            "--force.",
        )
    if not yes:
        typer.confirm(f"Remove model {name!r} from the store?", abort=True)
    path = remove_model(name)
    console.print(f"removed model {name} ({path})")
