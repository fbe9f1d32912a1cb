"""Signing in and out, the home page and GET /api/me."""

from __future__ import annotations

import math
import re

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from loft.core.errors import ConfigError, LoftError, RateLimitedError, http_status_for
from loft.portal import auth
from loft.portal.auth import Principal, signed_in
from loft.portal.roles import ROLE_HELP, actions_of
from loft.portal.ui import render

router = APIRouter()


_LOCAL_PATH = re.compile(r"/(?![/\\])[^\x00-\x20\\]*")


def safe_next(target: str | None) -> str:
    """A local path to go to after signing in, else '/': never another site ('//x', 'https://x',
    '/\\x', or a slash hidden behind a tab, which browsers drop)."""
    return target if target and _LOCAL_PATH.fullmatch(target) else "/"


def _login_page(
    request: Request, *, next_path: str, name: str = "", error: LoftError | None = None
) -> Response:
    token = auth.login_csrf(request)
    status = http_status_for(error) if error else 200
    headers = {}
    if isinstance(error, RateLimitedError):
        headers["Retry-After"] = str(math.ceil(error.retry_after))
    response = render(
        request, "login.html", None, status=status, csrf=token, headers=headers,
        next=next_path, name=name, error=error,
    )  # fmt: skip
    auth.set_login_cookie(response, request, token)
    return response


@router.get("/login")
def login_form(request: Request, next: str = "/") -> Response:
    if auth.current(request) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, next_path=safe_next(next))


@router.post("/login")
def login(
    request: Request,
    name: str = Form(""),
    password: str = Form(""),
    csrf_token: str = Form(""),
    next: str = Form("/"),
) -> Response:
    next_path = safe_next(next)
    try:
        auth.check_login_csrf(request, csrf_token)
        # names are lowercase: 'Alice' signs in as alice
        session_id, session = auth.sign_in(request, name.strip().lower(), password)
    except LoftError as e:
        return _login_page(request, next_path=next_path, name=name, error=e)
    response = RedirectResponse(next_path, status_code=303)
    auth.set_session_cookie(response, request, session_id, session)
    return response


@router.post("/logout")
def logout(request: Request, me: Principal = signed_in()) -> Response:
    if me.session is None:
        raise ConfigError(
            "a request authenticated with an API token has no session to end.",
            hint="Revoke the token instead (DELETE /api/tokens/{id}).",
        )
    auth.store_of(request).logout(me.session, context=auth.context(request, "web"))
    response = RedirectResponse("/login", status_code=303)
    auth.clear_session_cookie(response, request)
    return response


@router.get("/")
def home(request: Request, me: Principal = signed_in()) -> Response:
    return render(request, "home.html", me, role_help=ROLE_HELP[me.role])


@router.get("/api/me")
def api_me(me: Principal = signed_in()) -> dict:
    """Who the caller is, how they authenticated, and every action their role may take."""
    return {"name": me.name, "role": me.role, "via": me.via, "actions": actions_of(me.role)}
