"""``loft up``: this machine's share of a deployment in one command: ``--workers`` job workers, the
model server (``loft serve``, on 127.0.0.1 unless told otherwise) and the portal (``loft portal``),
each in its own process group, supervised together. SIGTERM or Ctrl-C stops them all (a running
job checkpoints and goes back to the queue); if one of them exits on its own, the others are
stopped and ``loft up`` exits non-zero, so a service manager restarts the set."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loft.cli.main", *args], start_new_session=True)


def up(
    *,
    workers: int = 1,
    worker_args: list[str] | None = None,
    serve_args: list[str] | None = None,
    portal_args: list[str] | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> int:
    """Run until stopped; returns the exit code (0 when stopped by a signal)."""
    procs: dict[str, subprocess.Popen] = {}
    for i in range(workers):
        procs[f"worker {i}"] = _start(["worker", *(worker_args or [])])
    if serve_args is not None:
        procs["server"] = _start(["serve", *serve_args])
    if portal_args is not None:
        procs["portal"] = _start(["portal", *portal_args])
    say("loft up: " + ", ".join(f"{name} (pid {p.pid})" for name, p in procs.items()))
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    failed = 0
    try:
        while not stopping and not failed:
            for name, p in procs.items():
                if p.poll() is not None:
                    say(f"loft up: {name} exited with {p.returncode}; stopping the others")
                    failed = p.returncode or 1
                    break
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for name, p in procs.items():
            try:
                p.wait(timeout=300)
            except subprocess.TimeoutExpired:
                say(f"loft up: {name} did not stop in 300 s; killing it")
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return failed


__all__ = ["up"]
