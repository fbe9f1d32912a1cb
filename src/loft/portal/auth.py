"""Who is asking, and may they: sessions (cookie), personal API tokens (Bearer), CSRF and the
role check, in one FastAPI dependency, ``require(action)``, that every page and API route uses.

- ``Authorization: Bearer loftp_<id>_<secret>`` authenticates as the token's user; such requests
  need no CSRF token (a browser never adds that header by itself).
- Otherwise the ``loft_session`` cookie (HttpOnly, SameSite=Lax, Secure over https). A request
  that changes state (POST, PUT, PATCH, DELETE) with it must also carry the session's CSRF token,
  as the ``X-CSRF-Token`` header or the ``csrf_token`` form field; every page has it in
  ``<meta name="csrf-token">``.
- Then the role: ``ACTIONS[action]`` (loft.portal.roles) must hold the user's role.

Failures raise LoftErrors (401, 403, 429); loft.portal.app turns them into JSON under /api and
into a redirect to /login or an HTML page elsewhere.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from loft.core.errors import (
    AuthenticationError,
    PermissionDeniedError,
    RateLimitedError,
)
from loft.portal.roles import ACTIONS, ROLES, allowed, roles_for
from loft.portal.store import PortalStore, Session

__all__ = ["ACTIONS", "ROLES", "Principal", "require", "signed_in"]

SESSION_COOKIE = "loft_session"
LOGIN_COOKIE = "loft_login_csrf"  # the sign-in form's own CSRF token (double submit)
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_SESSION_HOURS = 12.0
_SIGN_IN_HINT = (
    "Sign in at /login, or send 'Authorization: Bearer <token>' with a personal API token "
    "(the tokens page creates one)."
)


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    name: str
    role: str
    via: str  # "session" or "token"
    csrf_token: str = ""  # the session's; empty for a token
    session: Session | None = None
    token_id: str | None = None

    def may(self, action: str) -> bool:
        return allowed(self.role, action)


def context(request: Request, via: str) -> dict[str, Any]:
    """What the audit trail records about where a change came from."""
    return {"via": via, "ip": request.client.host if request.client else None}


def session_hours() -> float:
    """Session lifetime: $LOFT_PORTAL_SESSION_HOURS, else ``portal.session_hours`` in
    LOFT_HOME/settings.yaml, else 12."""
    from loft.core.settings import positive_setting

    return positive_setting(
        "LOFT_PORTAL_SESSION_HOURS", "portal.session_hours", DEFAULT_SESSION_HOURS,
        most=24 * 366, expected="a number of hours above 0 and at most a year, e.g. 12 or 0.5",
    )  # fmt: skip


def store_of(request: Request) -> PortalStore:
    """The app's PortalStore (loft.portal.app puts it in ``app.state``)."""
    return request.app.state.store


def authenticate(request: Request) -> Principal:
    """The caller, from a Bearer token or else the session cookie; AuthenticationError if
    neither is valid. Blocking (SQLite): call it from a thread."""
    store = store_of(request)
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthenticationError(
                "the Authorization header must read 'Bearer loftp_<id>_<secret>'.",
                hint=_SIGN_IN_HINT,
            )
        user, token = store.token_user(value)
        return Principal(user.name, user.role, "token", token_id=token.id)
    session_id = request.cookies.get(SESSION_COOKIE)
    if not session_id:
        raise AuthenticationError("not signed in.", hint=_SIGN_IN_HINT)
    session = store.session(session_id)
    return Principal(session.user.name, session.user.role, "session", session.csrf_token, session)


async def check_csrf(request: Request, expected: str) -> None:
    """The request's CSRF token (header, else form field) must equal ``expected``."""
    sent: Any = request.headers.get(CSRF_HEADER)
    content_type = request.headers.get("content-type", "")
    if sent is None and content_type.startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        sent = (await request.form()).get(CSRF_FIELD)
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise PermissionDeniedError(
            f"{'wrong' if sent else 'missing'} CSRF token: a change made with the session "
            "cookie must carry the session's CSRF token.",
            hint=f"Send the {CSRF_HEADER} header (or the {CSRF_FIELD} form field) with the value "
            'of the page\'s <meta name="csrf-token">; reload the page if it is old.',
        )


def require(action: str) -> Any:
    """A FastAPI dependency that returns the caller (a Principal) if they are signed in, carry
    the CSRF token where one is needed, and their role may take ``action``."""
    if action not in ACTIONS:
        raise KeyError(f"unknown action {action!r}; add it to ACTIONS in loft/portal/roles.py")
    return Depends(_checker(action))


def signed_in() -> Any:
    """Like ``require`` for what every signed-in user may do (the home page, signing out)."""
    return Depends(_checker(None))


def _checker(action: str | None) -> Any:
    async def dependency(request: Request) -> Principal:
        principal = await run_in_threadpool(authenticate, request)
        request.state.principal = principal  # for the error pages' navigation
        if request.method not in SAFE_METHODS and principal.via == "session":
            await check_csrf(request, principal.csrf_token)
        if action is not None and not principal.may(action):
            raise PermissionDeniedError(
                f"{principal.name} ({principal.role}) may not {action}; roles that may: "
                f"{', '.join(roles_for(action))}.",
                hint="Ask an admin for another role if you need this.",
            )
        return principal

    return dependency


def current(request: Request) -> Principal | None:
    """The caller if signed in, else None (never raises): for pages that anyone may see."""
    principal = getattr(request.state, "principal", None)
    if principal is not None:
        return principal
    try:
        return authenticate(request)
    except AuthenticationError:
        return None


class LoginThrottle:
    """At most ``limit`` failed sign-ins per user name in ``window`` seconds, per process;
    further attempts (right or wrong) get HTTP 429 until the oldest failure ages out."""

    def __init__(self, limit: int = 5, window: float = 60.0, clock: Any = time.monotonic):
        self.limit, self.window, self._clock = limit, window, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, name: str) -> None:
        now = self._clock()
        with self._lock:
            recent = self._recent(name.lower(), now)
            if len(recent) >= self.limit:
                wait = max(1.0, recent[0] + self.window - now)
                raise RateLimitedError(
                    f"too many failed sign-ins for {name[:64]!r}; wait {wait:.0f} s.",
                    retry_after=wait,
                )

    def failed(self, name: str) -> None:
        now = self._clock()
        with self._lock:
            self._recent(name.lower(), now).append(now)
            if len(self._failures) > 10_000:  # forget names with nothing recent
                for key in [k for k, q in self._failures.items() if not self._recent(k, now)]:
                    del self._failures[key]

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name.lower(), None)

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures.setdefault(key, deque())
        while q and q[0] <= now - self.window:
            q.popleft()
        return q


def sign_in(request: Request, name: str, password: str) -> tuple[str, Session]:
    """Check the throttle and the password, open a session: ``(session id, session)``."""
    throttle: LoginThrottle = request.app.state.login_throttle
    throttle.check(name)
    store = store_of(request)
    try:
        session_id, session = store.login(
            name, password, hours=session_hours(), context=context(request, "web")
        )
    except AuthenticationError:
        throttle.failed(name)
        raise
    throttle.succeeded(name)
    return session_id, session


def set_session_cookie(
    response: Response, request: Request, session_id: str, session: Session
) -> None:
    from datetime import UTC, datetime

    seconds = datetime.fromisoformat(session.expires) - datetime.now(UTC)
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=max(0, int(seconds.total_seconds())),
        path="/",
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        SESSION_COOKIE, path="/", httponly=True, samesite="lax",
        secure=request.url.scheme == "https",
    )  # fmt: skip


def login_csrf(request: Request) -> str:
    """The sign-in form's token: the one in its cookie, or a new one (set it with
    ``set_login_cookie``)."""
    return request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)


def set_login_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        LOGIN_COOKIE, token, max_age=3600, path="/login", httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip


def check_login_csrf(request: Request, sent: str) -> None:
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    if not cookie or not hmac.compare_digest(sent.encode(), cookie.encode()):
        raise PermissionDeniedError(
            "the sign-in form expired or came from another site.",
            hint="Reload /login and sign in again (cookies must be allowed for this site).",
        )
