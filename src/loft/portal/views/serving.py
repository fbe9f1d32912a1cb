"""Serving: /serving (which version each alias serves, traffic splits, per-adapter traffic and
latency from a running server's /metrics, serving API keys) and /api/serving/... .

Routing facts are the registry's (aliases, loft.registry.splits); traffic and latency come from
the server named by ``$LOFT_SERVE_URL`` (or ``serve.url`` in settings.yaml) with ``$LOFT_API_KEY``
(a key with the metrics scope: `loft keys create --name portal --metrics --adapters '*'`), through
loft.serve.client; the page says so when none is configured or it does not answer. Keys are
loft.serve.keys' KeyStore, as `loft keys` uses it (``keys.manage``: admins); the secret is shown
once.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from loft.core.errors import LoftError, http_status_for
from loft.portal import auth
from loft.portal.auth import Principal, require
from loft.portal.ui import Page, paging, render

router = APIRouter()
VIEW, KEYS = "serving.view", "keys.manage"


def _routes(page: Page) -> tuple[list[dict[str, Any]], int]:
    """``page`` of registered models with what a bare name serves, aliases and split."""
    from loft.core.errors import IntegrityError
    from loft.registry import get_split
    from loft.registry.splits import _default_alias, served_version
    from loft.registry.store import list_models_page

    rows, total = list_models_page(page.limit, page.offset)
    default = _default_alias()
    out = []
    for m in rows:
        try:
            split = get_split(m["name"])
        except IntegrityError as e:
            split = {"error": e.message}
        version = served_version(m["aliases"], m["latest"], default)
        out.append({**m, "serves": version, "default_alias": default, "split": split})
    return out, total


def live() -> dict[str, Any]:
    """The configured server's status and per-model traffic and latency; ``error`` says why
    there is none (not configured, not answering, a key without the metrics scope)."""
    from loft.serve.client import configured, fetch_metrics, fetch_status
    from loft.serve.metrics import summarise

    url, key = configured()
    out: dict[str, Any] = {
        "url": url,
        "configured": url is not None,
        "reachable": False,
        "status": None,
        "traffic": None,
        "error": None,
    }
    if url is None:
        out["error"] = (
            "no model server is configured: start the portal with LOFT_SERVE_URL (and "
            "LOFT_API_KEY, a key with the metrics scope) to see traffic and latency here."
        )
        return out
    try:
        out["status"] = fetch_status(url, key, timeout=3.0)
        out["reachable"] = True
        out["traffic"] = summarise(fetch_metrics(url, key, timeout=3.0))
    except LoftError as e:
        out["error"] = e.message + (f" {e.hint}" if e.hint else "")
    return out


def _keys(page: Page, include_revoked: bool) -> tuple[list[Any], int]:
    from loft.serve.keys import KeyStore

    return KeyStore().list_page(page.limit, page.offset, include_revoked)


def _create_key(
    me: Principal,
    request: Request,
    name: str,
    adapters: list[str],
    include_base: bool,
    rate: str | None,
    expires: str | None,
    metrics: bool,
) -> tuple[Any, str]:
    from loft.serve.keys import KeyStore

    return KeyStore().create(
        name, adapters, include_base=include_base, rate=rate, expires=expires, metrics=metrics,
        actor=me.name, context=auth.context(request, me.via),
    )  # fmt: skip


def _revoke_key(me: Principal, request: Request, key_id: str) -> Any:
    from loft.serve.keys import KeyStore

    return KeyStore().revoke(key_id, actor=me.name, context=auth.context(request, me.via))


# ----------------------------------------------------------------------------- pages


def _page(
    request: Request, me: Principal, page: Page, *, status: int = 200, **extra: Any
) -> Response:
    routes, total = _routes(page)
    keys = _keys(Page(100, 0), include_revoked=False)[0] if me.may(KEYS) else None
    return render(
        request,
        "serving.html",
        me,
        status=status,
        routes=routes,
        live=live(),
        keys=keys,
        links=page.links("/serving", page.offset + len(routes) < total),
        **extra,
    )


@router.get("/serving")
def serving_page(
    request: Request, me: Principal = require(VIEW), page: Page = Depends(paging)
) -> Response:
    return _page(request, me, page)


@router.post("/serving/keys")
def create_key_form(
    request: Request,
    me: Principal = require(KEYS),
    name: str = Form(...),
    adapters: str = Form(""),
    include_base: bool = Form(False),
    metrics: bool = Form(False),
    rate: str = Form(""),
    expires: str = Form(""),
) -> Response:
    names = [a.strip() for a in adapters.split(",") if a.strip()]
    try:
        record, secret = _create_key(
            me,
            request,
            name.strip(),
            names,
            include_base,
            rate.strip() or None,
            expires.strip() or None,
            metrics,
        )
    except LoftError as e:
        return _page(request, me, Page(), status=http_status_for(e), error=e)
    return _page(request, me, Page(), created=record, secret=secret)


@router.post("/serving/keys/{key_id}/revoke")
def revoke_key_form(request: Request, key_id: str, me: Principal = require(KEYS)) -> Response:
    try:
        record = _revoke_key(me, request, key_id)
    except LoftError as e:
        return _page(request, me, Page(), status=http_status_for(e), error=e)
    return _page(request, me, Page(), notice=f"revoked key {record.name} ({record.id})")


# ----------------------------------------------------------------------------- JSON API


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    adapters: list[str] = Field(default_factory=list, description="Model names, or ['*'].")
    include_base: bool = False
    metrics: bool = False
    rate: str | None = None
    expires: str | None = None


@router.get("/api/serving")
def api_routes(
    request: Request, me: Principal = require(VIEW), page: Page = Depends(paging)
) -> dict[str, Any]:
    rows, total = _routes(page)
    return page.body(rows, total=total)


@router.get("/api/serving/server")
def api_server(request: Request, me: Principal = require(VIEW)) -> dict[str, Any]:
    return live()


@router.get("/api/serving/keys")
def api_keys(
    request: Request, me: Principal = require(KEYS), page: Page = Depends(paging), all: bool = False
) -> dict[str, Any]:
    keys, total = _keys(page, include_revoked=all)
    return page.body([k.to_dict() for k in keys], total=total)


@router.post("/api/serving/keys", status_code=201)
def api_create_key(request: Request, body: NewKey, me: Principal = require(KEYS)) -> dict[str, Any]:
    """The new key with its secret under ``key``: the only time it is shown."""
    record, secret = _create_key(
        me,
        request,
        body.name,
        body.adapters,
        body.include_base,
        body.rate,
        body.expires,
        body.metrics,
    )
    return {**record.to_dict(), "key": secret}


@router.delete("/api/serving/keys/{key_id}")
def api_revoke_key(request: Request, key_id: str, me: Principal = require(KEYS)) -> dict[str, Any]:
    return _revoke_key(me, request, key_id).to_dict()
