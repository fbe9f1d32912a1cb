"""One family of errors a user can act on; one table maps each class to exit code and HTTP status.

Every message says what was found, where (file:line, key path, record index) and what to do next.
"""

from __future__ import annotations


class LoftError(Exception):
    """Base class. ``hint`` is the next thing the user should do, printed on its own line."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class ConfigError(LoftError):
    """A config file or override is malformed, has unknown keys or bad values."""


class DataError(LoftError):
    """A dataset file is unreadable or has invalid records. ``problems`` holds every one found."""

    def __init__(self, message: str, *, problems: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.problems = problems or []


class NotFoundError(LoftError):
    """A model, dataset, run or file the user named does not exist."""


class IntegrityError(LoftError):
    """A stored artifact does not match its recorded sha256 (tampered or truncated)."""


class HardwareError(LoftError):
    """The requested path needs hardware (CUDA, bf16, memory) this machine does not have."""


class TrainingInterrupted(LoftError):
    """A run stopped on SIGINT/SIGTERM after saving a checkpoint; resume with --resume."""


class RunPruned(LoftError):
    """A study's pruner stopped the run at an evaluation: not a failure; the run's summary says
    ``pruned`` and its last checkpoint is kept."""


class TrainingDiverged(LoftError):
    """The loss became NaN or infinite, or training left the weights as they were: the run
    stopped (with a checkpoint from before the bad step, where there was one)."""


class GateRefused(LoftError):
    """A promotion gate failed; ``promotion`` holds every check with its value."""

    def __init__(self, message: str, *, promotion: object = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.promotion = promotion


class AuthenticationError(LoftError):
    """A request carried no API key, an unknown one, or a revoked or expired one."""


class PermissionDeniedError(LoftError):
    """The caller's key may not use what it asked for (never says whether that exists)."""


class RateLimitedError(LoftError):
    """Over a key's request rate; ``retry_after`` is the number of seconds to wait."""

    def __init__(self, message: str, *, retry_after: float, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class OverloadedError(LoftError):
    """The server is at its concurrency limit or shutting down; try again after ``retry_after``."""

    def __init__(self, message: str, *, retry_after: float = 1.0, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class RequestTooLargeError(LoftError):
    """A request body over the server's max_body_bytes (HTTP 413); a prompt or ``max_tokens`` over
    its limits is a bad request (400, ``InvalidRequestError`` in ``loft.serve.protocol``)."""


# class -> (CLI exit code, HTTP status). Looked up by walking the MRO, so subclasses inherit.
ERROR_TABLE: dict[type[LoftError], tuple[int, int]] = {
    ConfigError: (2, 400),
    DataError: (2, 422),
    NotFoundError: (2, 404),
    HardwareError: (2, 400),
    IntegrityError: (1, 409),
    TrainingInterrupted: (130, 503),
    TrainingDiverged: (1, 500),
    GateRefused: (3, 409),
    AuthenticationError: (2, 401),
    PermissionDeniedError: (2, 403),
    RateLimitedError: (1, 429),
    RequestTooLargeError: (2, 413),
    OverloadedError: (1, 503),
    LoftError: (1, 500),
}


def exit_code_for(err: BaseException) -> int:
    for cls in type(err).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls][0]
    return 1


def http_status_for(err: BaseException) -> int:
    for cls in type(err).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls][1]
    return 500
