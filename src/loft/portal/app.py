"""``create_app()``: the portal as one FastAPI app: server-rendered pages, /api, /static.

Errors are answered in the caller's language: under /api a JSON body
``{"error": {"type", "message", "hint"}}`` with the status from loft.core.errors' table; on a
page, a redirect to /login when not signed in, else an HTML page. Never a traceback.
"""

from __future__ import annotations

import logging
import math
import re
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from loft.core.errors import AuthenticationError, LoftError, RateLimitedError, http_status_for
from loft.portal import auth, openapi
from loft.portal.store import PortalStore
from loft.portal.ui import STATIC_DIR, render
from loft.portal.views import (
    audit,
    datasets,
    jobs,
    labelling,
    registry,
    serving,
    session,
    tokens,
    users,
)

log = logging.getLogger("loft.portal")

HEADINGS = {400: "Bad request", 401: "Sign in", 403: "Not allowed", 404: "Not found",
            405: "Not allowed here", 409: "Conflict", 422: "Bad request",
            429: "Too many attempts", 500: "Something went wrong"}  # fmt: skip
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def create_app(store: PortalStore | None = None) -> FastAPI:
    """The portal over ``store`` (default ``LOFT_HOME/portal.db``)."""
    app = FastAPI(title="loft portal", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store or PortalStore()
    app.state.login_throttle = auth.LoginThrottle()
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for module in (session, datasets, labelling, jobs, registry, serving, users, tokens, audit):
        app.include_router(module.router)
    openapi.describe(app)

    @app.middleware("http")
    async def _headers(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(LoftError)
    async def _loft_error(request: Request, exc: LoftError) -> Response:
        headers = {}
        if isinstance(exc, RateLimitedError):
            headers["Retry-After"] = str(math.ceil(exc.retry_after))
        if _is_api(request):
            if isinstance(exc, AuthenticationError):
                headers["WWW-Authenticate"] = "Bearer"
            return error_json(http_status_for(exc), exc, headers)
        if isinstance(exc, AuthenticationError):
            return _to_login(request)
        return _error_page(request, http_status_for(exc), exc.message, exc.hint, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        if status == 404:
            message = f"nothing at {request.url.path}"
        elif status == 405:
            message = f"{request.url.path} does not take {request.method}"
        else:
            message = str(exc.detail)
        if _is_api(request):
            return error_json(status, _Plain(message, _code_for_status(status)), exc.headers)
        return _error_page(request, status, message, None, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(_problem(e) for e in exc.errors())
        if _is_api(request):
            return error_json(422, _Plain(f"invalid request: {problems}", "invalid_request"))
        return _error_page(request, 400, f"invalid request: {problems}", None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        message = f"internal error ({type(exc).__name__}); the portal's log has the details"
        if _is_api(request):
            return error_json(500, _Plain(message, "internal"))
        return _error_page(request, 500, message, None)

    return app


class _Plain:
    """An error that is not a LoftError (no route, a malformed request), shaped like one."""

    def __init__(self, message: str, code: str) -> None:
        self.message, self.hint, self.code = message, None, code


def error_code(exc: object) -> str:
    """``PermissionDeniedError`` -> ``permission_denied``: a stable machine-readable type."""
    if isinstance(exc, _Plain):
        return exc.code
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()
    return name.removesuffix("_error") or "error"


def error_json(
    status: int, exc: LoftError | _Plain, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"type": error_code(exc), "message": exc.message, "hint": exc.hint}}
    return JSONResponse(body, status_code=status, headers=headers)


def _code_for_status(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")


def _problem(error: dict) -> str:
    where = ".".join(str(p) for p in error.get("loc", ()))
    return f"{where}: {error.get('msg', 'invalid')}"


def _is_api(request: Request) -> bool:
    return request.url.path == "/api" or request.url.path.startswith("/api/")


def _to_login(request: Request) -> Response:
    """Not signed in on a page: to /login, and back here afterwards (GET only)."""
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    target = "/login" + (f"?next={quote(here, safe='')}" if request.method == "GET" else "")
    if request.headers.get("HX-Request"):  # htmx: a whole-page navigation, not a swapped body
        return Response(status_code=204, headers={"HX-Redirect": target})
    response = RedirectResponse(target, status_code=303)
    if request.cookies.get(auth.SESSION_COOKIE):  # an ended or expired session
        auth.clear_session_cookie(response, request)
    return response


def _error_page(
    request: Request,
    status: int,
    message: str,
    hint: str | None,
    headers: dict[str, str] | None = None,
) -> Response:
    me = auth.current(request)
    return render(
        request, "error.html", me, status=status, headers=dict(headers or {}),
        heading=HEADINGS.get(status, "Error"), message=message, hint=hint,
    )  # fmt: skip
