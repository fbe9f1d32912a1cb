"""Personal API tokens: the /tokens page and /api/tokens. Everyone manages their own; a token
acts with its user's role, and its secret is shown once, at creation."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from loft.core.errors import LoftError, http_status_for
from loft.portal import auth
from loft.portal.auth import Principal, require
from loft.portal.store import Token
from loft.portal.ui import Page, paging, render

router = APIRouter()
OWN = "tokens.own"


def _page(
    request: Request,
    me: Principal,
    page: Page,
    *,
    notice: str | None = None,
    error: LoftError | None = None,
    created: Token | None = None,
    secret: str | None = None,
) -> Response:
    tokens, total = auth.store_of(request).list_tokens(me.name, page.limit, page.offset)
    return render(
        request, "tokens.html", me, status=http_status_for(error) if error else 200,
        tokens=tokens, notice=notice, error=error, created=created, secret=secret,
        links=page.links("/tokens", page.offset + len(tokens) < total),
    )  # fmt: skip


@router.get("/tokens")
def tokens_page(request: Request, me: Principal = require(OWN), page: Page = Depends(paging)):
    return _page(request, me, page)


@router.post("/tokens")
def create_form(request: Request, me: Principal = require(OWN), name: str = Form(...)) -> Response:
    try:
        token, secret = auth.store_of(request).create_token(
            me.name, name.strip(), actor=me.name, context=auth.context(request, me.via)
        )
    except LoftError as e:
        return _page(request, me, Page(), error=e)
    return _page(request, me, Page(), created=token, secret=secret)


@router.post("/tokens/{token_id}/revoke")
def revoke_form(request: Request, token_id: str, me: Principal = require(OWN)) -> Response:
    try:
        token = auth.store_of(request).revoke_token(
            me.name, token_id, actor=me.name, context=auth.context(request, me.via)
        )
    except LoftError as e:
        return _page(request, me, Page(), error=e)
    return _page(request, me, Page(), notice=f"revoked {token.name} ({token.id})")


class NewToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


@router.get("/api/tokens")
def list_tokens(
    request: Request, me: Principal = require(OWN), page: Page = Depends(paging)
) -> dict[str, Any]:
    tokens, total = auth.store_of(request).list_tokens(me.name, page.limit, page.offset)
    return page.body([t.to_dict() for t in tokens], total=total)


@router.post("/api/tokens", status_code=201)
def create_token(request: Request, body: NewToken, me: Principal = require(OWN)) -> dict[str, Any]:
    """The new token with its secret under ``token``: the only time it is shown."""
    token, secret = auth.store_of(request).create_token(
        me.name, body.name, actor=me.name, context=auth.context(request, me.via)
    )
    return {**token.to_dict(), "token": secret}


@router.delete("/api/tokens/{token_id}")
def revoke_token(request: Request, token_id: str, me: Principal = require(OWN)) -> dict[str, Any]:
    token = auth.store_of(request).revoke_token(
        me.name, token_id, actor=me.name, context=auth.context(request, me.via)
    )
    return token.to_dict()
