"""One JSON line per served request: who, which model and version, how much, how long, outcome.

``route`` is the traffic split's arm a request took ("champion" / "candidate"; null when no split
applied). A rating posted to ``/v1/feedback`` is a line too: ``about`` is the rated request's id,
``score`` its score in [0, 1], ``resolved`` and ``route`` those of the rated response.
Prompt, completion and feedback comment text are written only when ``log_prompts`` is on. Each
line goes out in a single ``write`` on an ``O_APPEND`` descriptor, so lines from concurrent
requests (and from other processes appending to the same file) never interleave.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loft.core.specs import ServeConfig

FIELDS = (
    "time",
    "request_id",
    "key",
    "endpoint",
    "model",
    "resolved",
    "route",
    "sha256",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "status",
    "error",
    "stream",
    "n",
    "about",
    "score",
)
# ``messages``: a chat request's messages as sent (what `loft data from-audit` turns back into
# training records); ``prompt``: the text the model saw, template applied
TEXT_FIELDS = ("prompt", "messages", "completion", "comment")


def default_audit_path(config: ServeConfig) -> Path:
    """``config.audit_log`` when set, else ``LOFT_HOME/serve/audit.jsonl``."""
    if config.audit_log:
        return Path(config.audit_log).expanduser()
    from loft.core.paths import loft_home

    return loft_home() / "serve" / "audit.jsonl"


class AuditLog:
    """Appends request records to ``path`` (JSON lines); safe to share across threads."""

    def __init__(self, path: Path, log_prompts: bool = False) -> None:
        self.path = Path(path)
        self.log_prompts = log_prompts
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, **fields: Any) -> dict[str, Any]:
        """Write one record; missing known fields are null, text fields dropped unless enabled."""
        entry: dict[str, Any] = {k: fields.get(k) for k in FIELDS}
        entry["time"] = fields.get("time") or datetime.now(UTC).isoformat(timespec="milliseconds")
        if self.log_prompts:
            for k in TEXT_FIELDS:
                entry[k] = fields.get(k)
        line = (json.dumps(entry, ensure_ascii=False, default=str) + "\n").encode()
        with self._lock:
            if self._fd is None:
                raise ValueError(f"audit log {self.path} is closed")
            os.write(self._fd, line)
        return entry

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:  # best effort; close() is the real API
        with contextlib.suppress(Exception):
            self.close()
