"""loft demo (being written)."""

import typer


def register(root: typer.Typer) -> None:
    pass
