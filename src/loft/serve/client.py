"""Ask a running `loft serve` about itself (``GET /v1/loft/status``, ``GET /metrics``) and for
chat completions; stdlib only, no torch.

The server to ask, where a caller has no ``--url`` (the portal): ``$LOFT_SERVE_URL``, else
``serve.url`` in LOFT_HOME/settings.yaml; its key: ``$LOFT_API_KEY`` (the variables `loft serve
status` reads)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from loft.core.errors import (
    AuthenticationError,
    ConfigError,
    LoftError,
    NotFoundError,
    PermissionDeniedError,
)

STATUS_PATH = "/v1/loft/status"
METRICS_PATH = "/metrics"
CHAT_PATH = "/v1/chat/completions"


def configured() -> tuple[str | None, str | None]:
    """(the server's URL or None when none is configured, its API key or None)."""
    import os

    from loft.core.settings import setting

    url = setting("LOFT_SERVE_URL", "serve.url")
    return (str(url) if url else None), (os.environ.get("LOFT_API_KEY") or None)


def _root(url: str) -> str:
    return status_url(url).removesuffix(STATUS_PATH)


def _call(
    url: str,
    path: str,
    key: str | None,
    *,
    body: dict | None = None,
    timeout: float,
    fix: str = "Start one with `loft serve` (or `loft up`), and point LOFT_SERVE_URL at it.",
) -> bytes:
    endpoint = _root(url) + path
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(endpoint, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise _http_error(endpoint, e, key) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise NotFoundError(f"no server answers at {url} ({reason}).", hint=fix) from None


def fetch_metrics(url: str, key: str | None, *, timeout: float = 10.0) -> str:
    """The server's Prometheus text (``GET /metrics``: a key with the metrics scope)."""
    return _call(url, METRICS_PATH, key, timeout=timeout).decode()


def chat(
    url: str,
    key: str | None,
    model: str,
    messages: list[dict[str, str]],
    *,
    max_tokens: int = 64,
    timeout: float = 120.0,
) -> str:
    """The greedy reply of ``model`` (``name:version``, ``name@alias``, an adapter name or the
    base model's name) to ``messages``."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    raw = _call(url, CHAT_PATH, key, body=body, timeout=timeout)
    try:
        return str(json.loads(raw)["choices"][0]["message"]["content"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise LoftError(f"{_root(url)}{CHAT_PATH} did not answer with a chat completion.") from None


def status_url(url: str) -> str:
    """``http://host:8000`` or an OpenAI ``base_url`` (``.../v1``) -> the status endpoint."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"--url {url!r} is not an http(s) URL.", hint="Example: --url http://127.0.0.1:8000"
        )
    root = url.rstrip("/")
    return root.removesuffix("/v1") + STATUS_PATH


def fetch_status(url: str, key: str | None, *, timeout: float = 10.0) -> dict[str, Any]:
    """The server's status document; a LoftError that says what to do when there is none."""
    endpoint = status_url(url)
    fix = "Check --url (the address `loft serve` printed), or start one with `loft serve`."
    body = _call(url, STATUS_PATH, key, timeout=timeout, fix=fix)
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("object") != "loft.status":
        raise LoftError(f"{endpoint} did not answer with a loft status document.")
    return doc


def _http_error(endpoint: str, e: urllib.error.HTTPError, key: str | None) -> LoftError:
    try:
        message = json.loads(e.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        message = f"HTTP {e.code} {e.reason}"
    if e.code == 401:
        hint = None if key else "Pass --key (or set LOFT_API_KEY) with a key of that server."
        return AuthenticationError(f"{endpoint}: {message}", hint=hint)
    if e.code == 403:
        return PermissionDeniedError(f"{endpoint}: {message}")
    if e.code == 404:
        return NotFoundError(
            f"{endpoint} does not exist there: is it a loft server, of this version or newer?"
        )
    return LoftError(f"{endpoint}: {message}")
