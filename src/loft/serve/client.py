"""Ask a running `loft serve` about itself (``GET /v1/loft/status``); stdlib only, no torch."""

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
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(endpoint, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        raise _http_error(endpoint, e, key) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise NotFoundError(
            f"no server answers at {url} ({reason}).",
            hint="Check --url (the address `loft serve` printed), or start one with `loft serve`.",
        ) from None
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
