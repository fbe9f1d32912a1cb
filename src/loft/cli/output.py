"""Shared consoles and tiny print helpers for CLI modules."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

from loft.core.units import human_size as human_size  # re-exported for the commands


def _width(stream: Any) -> int | None:
    """A terminal's own width; when piped or redirected, COLUMNS if set, else wide enough that
    tables are never cut to 80 columns (a pipe has no width; `| grep` must see whole cells)."""
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else 10_000


console = Console(highlight=False, width=_width(sys.stdout))
err_console = Console(stderr=True, highlight=False, width=_width(sys.stderr))


def print_json(obj: Any) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else."""
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))
