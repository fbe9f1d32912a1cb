"""Quantities as people read them; shared by the CLI and the portal."""

from __future__ import annotations


def human_size(n: float | None) -> str:
    """Bytes in binary units (KiB, MiB, GiB), as `ls -h` and `du -h` show them; ``-`` for None."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
