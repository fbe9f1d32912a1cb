"""The audit trail, read-only: the /audit page and /api/audit (newest first, filtered by actor
and action), and a check of the whole hash chain."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from loft.core import audit
from loft.portal.auth import Principal, require
from loft.portal.ui import Page, paging, render, templates

router = APIRouter()
VIEW = "audit.view"


def _check() -> dict[str, Any]:
    ok, entries, first_bad, reason = audit.verify()
    newest = audit.head()
    return {
        "ok": ok,
        "entries": entries,
        "first_bad": first_bad,
        "reason": reason,
        "head": {"seq": newest["seq"], "hash": newest["hash"]} if newest else None,
    }


def _entries(page: Page, actor: str | None, action: str | None) -> tuple[list[dict], bool]:
    rows = audit.read(page.limit + 1, page.offset, actor=actor or None, action=action or None)
    return rows[: page.limit], len(rows) > page.limit


@router.get("/audit")
def audit_page(
    request: Request,
    me: Principal = require(VIEW),
    page: Page = Depends(paging),
    actor: str | None = None,
    action: str | None = None,
    verify: bool = False,
) -> Response:
    entries, more = _entries(page, actor, action)
    return render(
        request, "audit.html", me, entries=entries, actor=actor, action=action,
        path=audit.location(), head=audit.head(), check=_check() if verify else None,
        links=page.links("/audit", more, actor=actor, action=action),
    )  # fmt: skip


@router.get("/audit/verify")
async def audit_verify_fragment(request: Request, me: Principal = require(VIEW)) -> Response:
    """The chain check as an HTML fragment (the audit page loads it with htmx)."""
    check = await run_in_threadpool(_check)
    return templates.TemplateResponse(request, "_verify.html", {"check": check})


@router.get("/api/audit")
def api_audit(
    me: Principal = require(VIEW),
    page: Page = Depends(paging),
    actor: str | None = None,
    action: str | None = None,
) -> dict[str, Any]:
    entries, more = _entries(page, actor, action)
    return page.body(entries, has_more=more)


@router.get("/api/audit/verify")
def api_audit_verify(me: Principal = require(VIEW)) -> dict[str, Any]:
    """``ok``, ``entries``, ``first_bad`` (1-based line), ``reason``, and the newest entry's
    ``seq`` and ``hash`` (to copy elsewhere: a trail cut short no longer ends with it)."""
    return _check()
