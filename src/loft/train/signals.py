"""SIGINT/SIGTERM ask the loop to stop at the next step boundary (checkpoint, then exit)."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class GracefulStop:
    """Context manager: the first signal sets ``requested``; a second one stops immediately."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # second signal: the user means it
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
