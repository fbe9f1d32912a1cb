"""Users (admins): the /users page and /api/users. Both call the same store methods, which
validate, keep at least one enabled admin, and write the audit trail."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from loft.core.errors import ConfigError, LoftError, http_status_for
from loft.portal import auth
from loft.portal.auth import Principal, require
from loft.portal.roles import ROLES
from loft.portal.store import User, check_password, check_role
from loft.portal.ui import Page, paging, render

router = APIRouter()
MANAGE = "users.manage"


def _page(
    request: Request,
    me: Principal,
    page: Page,
    *,
    notice: str | None = None,
    error: LoftError | None = None,
) -> Response:
    users, total = auth.store_of(request).list_users(page.limit, page.offset)
    return render(
        request, "users.html", me, status=http_status_for(error) if error else 200,
        users=users, total=total, roles=ROLES, notice=notice, error=error,
        links=page.links("/users", page.offset + len(users) < total),
    )  # fmt: skip


def _act(request: Request, me: Principal, change: Callable[[dict], User], notice: str) -> Response:
    """Make a change from a page's form, then show the page with what happened."""
    try:
        change(auth.context(request, me.via))
    except LoftError as e:
        return _page(request, me, Page(), error=e)
    return _page(request, me, Page(), notice=notice)


@router.get("/users")
def users_page(request: Request, me: Principal = require(MANAGE), page: Page = Depends(paging)):
    return _page(request, me, page)


@router.post("/users")
def add_user_form(
    request: Request,
    me: Principal = require(MANAGE),
    name: str = Form(...),
    role: str = Form(...),
    password: str = Form(...),
) -> Response:
    store = auth.store_of(request)
    return _act(
        request, me,
        lambda ctx: store.add_user(name.strip(), role, password, actor=me.name, context=ctx),
        f"added {name.strip()} ({role})",
    )  # fmt: skip


@router.post("/users/{name}/role")
def set_role_form(
    request: Request, name: str, me: Principal = require(MANAGE), role: str = Form(...)
) -> Response:
    store = auth.store_of(request)
    return _act(
        request, me,
        lambda ctx: store.set_role(name, role, actor=me.name, context=ctx),
        f"{name}'s role is now {role}",
    )  # fmt: skip


@router.post("/users/{name}/disable")
def disable_form(request: Request, name: str, me: Principal = require(MANAGE)) -> Response:
    store = auth.store_of(request)
    return _act(
        request, me,
        lambda ctx: store.set_disabled(name, True, actor=me.name, context=ctx),
        f"disabled {name}: their sessions ended and their tokens stopped working",
    )  # fmt: skip


@router.post("/users/{name}/enable")
def enable_form(request: Request, name: str, me: Principal = require(MANAGE)) -> Response:
    store = auth.store_of(request)
    return _act(
        request, me,
        lambda ctx: store.set_disabled(name, False, actor=me.name, context=ctx),
        f"enabled {name}",
    )  # fmt: skip


@router.post("/users/{name}/password")
def password_form(
    request: Request, name: str, me: Principal = require(MANAGE), password: str = Form(...)
) -> Response:
    store = auth.store_of(request)
    return _act(
        request, me,
        lambda ctx: store.set_password(name, password, actor=me.name, context=ctx),
        f"set a new password for {name}; their sessions ended",
    )  # fmt: skip


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    role: str
    password: str


class UserChange(BaseModel):
    """Any of: a new role, disabled true/false, a new password (applied in that order, each an
    audited change of its own)."""

    model_config = ConfigDict(extra="forbid")
    role: str | None = None
    disabled: bool | None = None
    password: str | None = None


@router.get("/api/users")
def list_users(
    request: Request, me: Principal = require(MANAGE), page: Page = Depends(paging)
) -> dict[str, Any]:
    users, total = auth.store_of(request).list_users(page.limit, page.offset)
    return page.body([u.to_dict() for u in users], total=total)


@router.post("/api/users", status_code=201)
def add_user(request: Request, body: NewUser, me: Principal = require(MANAGE)) -> dict[str, Any]:
    user = auth.store_of(request).add_user(
        body.name, body.role, body.password, actor=me.name, context=auth.context(request, me.via)
    )
    return user.to_dict()


@router.patch("/api/users/{name}")
def change_user(
    request: Request, name: str, body: UserChange, me: Principal = require(MANAGE)
) -> dict[str, Any]:
    store, ctx = auth.store_of(request), auth.context(request, me.via)
    if body.role is None and body.disabled is None and body.password is None:
        raise ConfigError(
            "nothing to change: give one or more of role, disabled, password.",
            hint='e.g. PATCH /api/users/alice {"role": "curator"}',
        )
    if body.role is not None:  # all checked before any change is made
        check_role(body.role)
    if body.password is not None:
        check_password(body.password)
    user = store.get_user(name)
    if body.role is not None:
        user = store.set_role(name, body.role, actor=me.name, context=ctx)
    if body.disabled is not None:
        user = store.set_disabled(name, body.disabled, actor=me.name, context=ctx)
    if body.password is not None:
        user = store.set_password(name, body.password, actor=me.name, context=ctx)
    return user.to_dict()
