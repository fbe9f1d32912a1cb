"""The tracking protocol the trainer codes against, and a tracker that records nothing.

The training loop sees only :class:`Tracker`; which vendor sits behind it (MLflow today) is chosen
by :func:`loft.tracking.open_tracker`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
FINAL_STATUSES: tuple[str, ...] = ("FINISHED", "FAILED", "KILLED")


@runtime_checkable
class Tracker(Protocol):
    """Where a run's params, per-step metrics, tags and artifacts go.

    ``run_id`` is the tracking store's id for the run (``None`` when nothing is recorded).
    Implementations must be cheap to call once per training step.
    """

    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Accepts every call and records nothing; for tests, dry runs and ``tracking.uri: none``."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.finished_status: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        return None

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        return None

    def set_tags(self, tags: dict[str, str]) -> None:
        return None

    def finish(self, status: str = "FINISHED") -> None:
        check_status(status)
        self.finished_status = status

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.finish(status_for_exception(exc_type))


def check_status(status: str) -> None:
    if status not in FINAL_STATUSES:
        raise ValueError(f"finish(status={status!r}): expected one of {', '.join(FINAL_STATUSES)}")


def status_for_exception(exc_type: type[BaseException] | None) -> str:
    """The final run status for leaving a ``with tracker:`` block with ``exc_type`` raised."""
    if exc_type is None:
        return "FINISHED"
    if issubclass(exc_type, KeyboardInterrupt):
        return "KILLED"
    from loft.core.errors import TrainingInterrupted

    return "KILLED" if issubclass(exc_type, TrainingInterrupted) else "FAILED"
