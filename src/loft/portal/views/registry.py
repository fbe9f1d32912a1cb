"""The model registry: /registry (models), /registry/<name> (versions against the champion),
/registry/<name>/<version> (card, lineage graph, metrics, history, promote and roll back), and
/api/registry/... with the same checks. The side-by-side comparison lives in views/compare.py.

Thin: every read and change is loft.registry's or loft.evaluate.promotion's, as `loft registry`
calls them (mlflow is imported inside those, on first use). Promotion runs the same gate as
`loft registry promote`, except that the portal never loads a model to measure the champion
(``measure=False``: no torch here); force is allowed as the CLI allows it, and recorded.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from loft.core.errors import ConfigError, GateRefused, LoftError, http_status_for
from loft.portal import auth
from loft.portal.auth import Principal, require
from loft.portal.ui import Page, paging, render
from loft.portal.views import compare

router = APIRouter()
router.include_router(compare.router)
VIEW, PROMOTE = "registry.view", "registry.promote"


# ----------------------------------------------------------------------------- reads


def _models(page: Page) -> tuple[list[dict[str, Any]], int]:
    from loft.registry.store import list_models_page

    return list_models_page(page.limit, page.offset)


def _champion_card(name: str, aliases: dict[str, int]) -> dict[str, Any] | None:
    from loft.registry.store import _card

    return _card(name, aliases["champion"]) if "champion" in aliases else None


def _versions(name: str, page: Page) -> dict[str, Any]:
    """The model, and ``page`` of its versions (newest first) with metrics against the
    champion; only the cards on the page are read."""
    from loft.registry.evaluations import versus
    from loft.registry.store import _aliases, _card, reader

    r = reader()
    aliases = _aliases(r, name)
    numbers = sorted(r.versions(name), reverse=True)
    champion = _champion_card(name, aliases)
    rows = []
    for v in numbers[page.offset : page.offset + page.limit]:
        card = _card(name, v)
        pref = card.get("preference") or {}
        rows.append(
            {
                "version": v,
                "ref": f"{name}:{v}",
                "kind": card.get("kind"),
                "created": card.get("created"),
                "aliases": sorted(a for a, n in aliases.items() if n == v),
                "metrics": versus(card, champion if aliases.get("champion") != v else None),
                "win_rate": pref.get("win_rate"),
                "votes": pref.get("votes", 0),
                "degraded": card.get("degraded"),
            }
        )
    return {
        "name": name,
        "aliases": dict(sorted(aliases.items())),
        "total": len(numbers),
        "champion": aliases.get("champion"),
        "versions": rows,
    }


def _version(name: str, version: int) -> dict[str, Any]:
    """One version: its card as `loft registry show --json` gives it, metrics against the
    champion, win rate, and its lineage graph."""
    from loft.registry.evaluations import versus
    from loft.registry.lineage import lineage_graph
    from loft.registry.store import _aliases, get_version, reader

    mv = get_version(f"{name}:{version}", verify=False)
    aliases = _aliases(reader(), name)
    champion = aliases.get("champion")
    champ_card = _champion_card(name, aliases) if champion != version else None
    graph = lineage_graph(f"{name}:{version}")
    config = (mv.card.get("lineage") or {}).get("config") or {}
    return {
        **mv.to_dict(),
        "model_aliases": dict(sorted(aliases.items())),
        "champion": champion,
        "versus_champion": versus(mv.card, champ_card),
        "preference": mv.card.get("preference"),
        "config_gate": list(config.get("gate") or []) if isinstance(config, dict) else [],
        "lineage_graph": graph,
    }


def _history(name: str, page: Page, version: int | None = None) -> tuple[list[dict], int]:
    """Alias moves (and splits, deletions) newest first; only those touching ``version``."""
    from loft.registry import history

    rows = list(reversed(history(name)))
    if version is not None:
        rows = [h for h in rows if version in (h.get("from"), h.get("to"), h.get("deleted"))]
    return rows[page.offset : page.offset + page.limit], len(rows)


# ----------------------------------------------------------------------------- changes


def _promote(
    me: Principal,
    request: Request,
    name: str,
    version: int,
    to: str,
    gate: list[str] | None,
    force: bool,
    reason: str,
) -> Any:
    """`loft registry promote NAME:VERSION --to TO [--force]`, with the gate given or the
    version's config gate; loft.evaluate.promotion records it in the history and the audit
    trail either way (a refusal too), as the acting user with the request's context."""
    from loft.evaluate.promotion import promote

    return promote(
        f"{name}:{version}", to=to, gate=gate, force=force, reason=reason, actor=me.name,
        measure=False, context=auth.context(request, me.via),
    )  # fmt: skip


def _rollback(me: Principal, request: Request, name: str, alias: str, reason: str) -> dict:
    from loft.registry import rollback

    return rollback(
        name, alias, reason=reason or "rollback", actor=me.name,
        context=auth.context(request, me.via),
    )  # fmt: skip


def _gate_lines(text: str) -> list[str] | None:
    """The form's gate textarea: one expression a line (blank: the version's config gate)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines or None


# ----------------------------------------------------------------------------- pages


@router.get("/registry")
def models_page(request: Request, me: Principal = require(VIEW), page: Page = Depends(paging)):
    rows, total = _models(page)
    return render(
        request,
        "registry.html",
        me,
        models=rows,
        total=total,
        links=page.links("/registry", page.offset + len(rows) < total),
    )


@router.get("/registry/{name}")
def model_page(
    request: Request, name: str, me: Principal = require(VIEW), page: Page = Depends(paging)
):
    model = _versions(name, page)
    history, _ = _history(name, Page(10, 0))
    has_more = page.offset + len(model["versions"]) < model["total"]
    return render(
        request,
        "registry_model.html",
        me,
        model=model,
        history=history,
        links=page.links(f"/registry/{name}", has_more),
    )


def _version_page(
    request: Request,
    me: Principal,
    name: str,
    version: int,
    *,
    page: Page | None = None,
    status: int = 200,
    **extra: Any,
) -> Response:
    page = page or Page(20, 0)
    v = _version(name, version)
    history, total = _history(name, page, version)
    return render(
        request,
        "registry_version.html",
        me,
        status=status,
        v=v,
        graph=v["lineage_graph"],
        history=history,
        links=page.links(f"/registry/{name}/{version}", page.offset + len(history) < total),
        can_promote=me.may(PROMOTE),
        **extra,
    )


@router.get("/registry/{name}/{version:int}")
def version_page(
    request: Request,
    name: str,
    version: int,
    me: Principal = require(VIEW),
    page: Page = Depends(paging),
):
    alias = request.query_params.get("rolled_back")
    notice = f"rolled @{alias} back: it serves this version again" if alias else None
    return _version_page(request, me, name, version, page=page, notice=notice)


@router.post("/registry/{name}/{version:int}/promote")
def promote_form(
    request: Request,
    name: str,
    version: int,
    me: Principal = require(PROMOTE),
    to: str = Form("champion"),
    gate: str = Form(""),
    force: bool = Form(False),
    reason: str = Form(""),
) -> Response:
    try:
        promo = _promote(
            me, request, name, version, to.strip(), _gate_lines(gate), force, reason.strip()
        )
    except GateRefused as e:
        return _version_page(
            request,
            me,
            name,
            version,
            status=409,
            error=e,
            promotion=e.promotion.to_dict() if e.promotion else None,
        )
    except LoftError as e:
        return _version_page(request, me, name, version, status=http_status_for(e), error=e)
    moved = f"{name}@{promo.alias}: {promo.previous or '-'} → {promo.version}"
    if promo.forced:
        moved += " (forced past a failing gate" if not promo.gate.passed else " (forced"
        moved += "; recorded)"
    notice = moved
    return _version_page(request, me, name, version, notice=notice, promotion=promo.to_dict())


@router.post("/registry/{name}/rollback")
def rollback_form(
    request: Request,
    name: str,
    me: Principal = require(PROMOTE),
    alias: str = Form("champion"),
    reason: str = Form(""),
) -> Response:
    try:
        entry = _rollback(me, request, name, alias.strip(), reason.strip())
    except LoftError as e:
        model = _versions(name, Page())
        return render(
            request,
            "registry_model.html",
            me,
            status=http_status_for(e),
            error=e,
            model=model,
            history=_history(name, Page(10, 0))[0],
            links=Page().links(f"/registry/{name}", False),
        )
    return RedirectResponse(f"/registry/{name}/{entry['to']}?rolled_back={alias}", status_code=303)


# ----------------------------------------------------------------------------- JSON API


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = "champion"
    gate: list[str] | None = Field(None, description="Expressions; default the config gate.")
    force: bool = False
    reason: str = ""


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alias: str = "champion"
    reason: str = ""


@router.get("/api/registry")
def api_models(
    request: Request, me: Principal = require(VIEW), page: Page = Depends(paging)
) -> dict[str, Any]:
    rows, total = _models(page)
    return page.body(rows, total=total)


@router.get("/api/registry/{name}")
def api_model(
    request: Request, name: str, me: Principal = require(VIEW), page: Page = Depends(paging)
) -> dict[str, Any]:
    model = _versions(name, page)
    body = page.body(model.pop("versions"), total=model["total"])
    return {**model, **body}


@router.get("/api/registry/{name}/history")
def api_history(
    request: Request, name: str, me: Principal = require(VIEW), page: Page = Depends(paging)
) -> dict[str, Any]:
    rows, total = _history(name, page)
    return page.body(rows, total=total)


@router.get("/api/registry/{name}/{version:int}")
def api_version(
    request: Request, name: str, version: int, me: Principal = require(VIEW)
) -> dict[str, Any]:
    v = _version(name, version)
    v["lineage_graph"] = v["lineage_graph"].to_dict()
    return v


@router.post("/api/registry/{name}/{version:int}/promote")
def api_promote(
    request: Request, name: str, version: int, body: PromoteBody, me: Principal = require(PROMOTE)
) -> Response:
    """200 with every check when the alias moved; 409 ``gate_refused`` with every check when
    the gate refused (and ``force`` was not set)."""
    if body.gate is not None and not [g for g in body.gate if g.strip()]:
        raise ConfigError("gate is an empty list; omit it to use the version's config gate.")
    try:
        promo = _promote(me, request, name, version, body.to, body.gate, body.force, body.reason)
    except GateRefused as e:
        error = {"type": "gate_refused", "message": e.message, "hint": e.hint}
        promotion = e.promotion.to_dict() if e.promotion else None
        return JSONResponse({"error": error, "promotion": promotion}, status_code=409)
    return JSONResponse(promo.to_dict())


@router.post("/api/registry/{name}/rollback")
def api_rollback(
    request: Request, name: str, body: RollbackBody, me: Principal = require(PROMOTE)
) -> dict[str, Any]:
    return _rollback(me, request, name, body.alias, body.reason)
