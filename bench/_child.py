"""Run one bench path in its own spawned process (so peak RSS is that path's) and return the one
result it puts on its queue; a child that dies without one ends the bench with its exit code."""

from __future__ import annotations

import multiprocessing as mp
import queue
import sys
from collections.abc import Callable
from typing import Any


def _in_child(fn: Callable[[Any, Any], None], args: Any, q: Any) -> None:
    sys.stdout = sys.stderr  # libraries print their logs; stdout is the parent's (--json) alone
    fn(args, q)


def run_child(fn: Callable[[Any, Any], None], args: Any) -> Any:
    """``fn(args, queue)`` in a spawned child; what it put on the queue."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_in_child, args=(fn, args, q))
    p.start()
    while True:
        try:
            out = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                sys.exit(f"{fn.__name__} failed (exit code {p.exitcode}); see its traceback above")
    p.join()
    return out
