"""Training progress: a live bar on a terminal, periodic plain lines otherwise (CI, logs)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int, *, enabled: bool = True) -> None:
        self.console = Console(stderr=True, highlight=False)
        self.total = total_steps
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self._last_line = 0.0
        self._bar: Progress | None = None
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]train[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._bar.add_task(
                "train", total=total_steps, completed=start_step, info=""
            )
            self._bar.start()

    def update(
        self, step: int, loss: float, tok_s: float, lr: float, eta_s: float | None, extra: str = ""
    ) -> None:
        info = f"loss {loss:.4f}  {extra + '  ' if extra else ''}{tok_s:,.0f} tok/s  lr {lr:.2e}"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif self.enabled and (time.monotonic() - self._last_line > 10 or step == self.total):
            self._last_line = time.monotonic()
            eta = f"  eta {eta_s:,.0f}s" if eta_s is not None else ""
            print(f"step {step}/{self.total}  {info}{eta}", file=sys.stderr, flush=True)

    def note(self, text: str, *, always: bool = False) -> None:
        """A line on stderr; ``always`` for what -q must not hide (where the run resumed, the
        version it became, a warning)."""
        if self.enabled or always:
            self.console.print(text, soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
