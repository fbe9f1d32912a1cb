"""Server-rendered pages: the templates, the pages a role sees in its navigation, paging, and
one ``render`` that gives every page its layout, its user and its ``<meta name="csrf-token">``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import Query, Request
from fastapi.responses import HTMLResponse
from starlette.templating import Jinja2Templates

from loft.portal.auth import Principal

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")

# (path, title, action, what it is for): the pages that exist, in menu order. A signed-in user
# sees those their role may open.
PAGES = (
    ("/datasets", "Datasets", "datasets.view", "upload datasets, their versions and reports"),
    ("/labelling", "Labelling", "labelling.annotate", "labelling projects, your assigned records"),
    ("/jobs", "Jobs", "jobs.view", "submit jobs, follow runs and their curves"),
    ("/registry", "Registry", "registry.view", "model versions, lineage, promotion and rollback"),
    ("/compare", "Compare", "registry.compare", "the same prompts through versions side by side"),
    ("/serving", "Serving", "serving.view", "what each alias serves, traffic, latency, keys"),
    ("/tokens", "API tokens", "tokens.own", "create and revoke your personal API tokens"),
    ("/users", "Users", "users.manage", "add users, change roles, disable, reset passwords"),
    ("/audit", "Audit trail", "audit.view", "every change, who made it, and a check of the chain"),
)

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_OFFSET = 2**31 - 1  # far past any list; keeps offset + limit inside SQLite's INTEGER


@dataclass(frozen=True)
class Page:
    """A page of a list: ``limit`` rows from ``offset``."""

    limit: int = DEFAULT_LIMIT
    offset: int = 0

    def body(self, items: list[Any], *, total: int | None = None, has_more: bool = False) -> dict:
        """The JSON shape of a list: items, limit, offset, and total or has_more."""
        body: dict[str, Any] = {"items": items, "limit": self.limit, "offset": self.offset}
        if total is not None:
            body["total"] = total
            has_more = self.offset + len(items) < total
        body["has_more"] = has_more
        return body

    def links(self, path: str, has_more: bool, **params: Any) -> dict[str, str | None]:
        """URLs of the previous and next pages (None where there is none), keeping ``params``."""
        kept = {k: v for k, v in params.items() if v not in (None, "")}

        def url(offset: int) -> str:
            query = {**kept, "limit": self.limit, "offset": offset}
            return f"{path}?{urlencode(query)}"

        return {
            "prev": url(max(0, self.offset - self.limit)) if self.offset > 0 else None,
            "next": url(self.offset + self.limit) if has_more else None,
        }


def paging(
    limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="rows per page"),
    offset: int = Query(0, ge=0, le=MAX_OFFSET, description="rows to skip"),
) -> Page:
    """A FastAPI dependency: ``?limit=`` (1-500, default 50) and ``?offset=``."""
    return Page(limit, offset)


def nav(principal: Principal | None) -> list[dict[str, str]]:
    """The pages ``principal`` may open."""
    if principal is None:
        return []
    return [
        {"path": path, "title": title, "about": about}
        for path, title, action, about in PAGES
        if principal.may(action)
    ]


def render(
    request: Request,
    template: str,
    principal: Principal | None,
    *,
    status: int = 200,
    csrf: str | None = None,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    """A full page. ``csrf`` overrides the session's token in the page's meta tag (the sign-in
    page carries its own)."""
    if csrf is None:
        csrf = principal.csrf_token if principal is not None else ""
    return templates.TemplateResponse(
        request,
        template,
        {"me": principal, "nav": nav(principal), "csrf": csrf, **context},
        status_code=status,
        headers=headers,
    )
