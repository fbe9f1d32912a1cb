"""Which process owns a piece of shared work, and whether that process still lives; this
machine's memory.

An owner is (host, pid, the pid's start time): a pid alone is reused by the OS, so a record that
says "pid 4242 is running trial 3" would look alive forever once another process gets pid 4242.
The start time comes from ``/proc/PID/stat`` (clock ticks since boot) where there is one.
"""

from __future__ import annotations

import os
import socket
from typing import Any


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (the state) on, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces or ')'


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields else None  # field 22 of stat
    except (IndexError, ValueError):
        return None


def owner(pid: int | None = None) -> dict[str, Any]:
    """This process (or ``pid``) as an owner record: JSON-serialisable."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "start": start_ticks(pid)}


def owner_alive(rec: dict[str, Any] | None) -> bool | None:
    """True if the owner still runs, False if it does not, None if this host cannot tell
    (another host's process)."""
    if not rec or "pid" not in rec:
        return False
    if rec.get("host") != socket.gethostname():
        return None
    pid = int(rec["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, someone else's
    fields = _stat(pid)
    if fields is None:
        return not os.path.isdir("/proc")  # no /proc here: the signal test is all there is
    if fields[0] in ("Z", "X"):
        return False  # dead, not yet reaped by its parent
    started = start_ticks(pid)
    return rec.get("start") is None or started is None or started == rec["start"]


def ram_bytes() -> int:
    """This machine's physical memory in bytes; 0 where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


__all__ = ["owner", "owner_alive", "ram_bytes", "start_ticks"]
