"""Side by side: /compare (start a comparison, list them), /compare/<id> (blind pairwise votes,
then every answer under its version, tallies, "save as a preference dataset"), and
/api/compare/... with the same checks (``registry.compare``).

The answers come from a running `loft serve` (``$LOFT_SERVE_URL``, ``$LOFT_API_KEY``; see
loft.serve.client), which serves every registered adapter of its base model by ``name:version``:
the portal never loads a model. Comparisons and votes are loft.registry.comparisons'; a saved
dataset is a loft.data.catalog version whose source names the comparison.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from loft.core import audit
from loft.core.errors import ConfigError, LoftError, http_status_for
from loft.portal import auth
from loft.portal.auth import Principal, require
from loft.portal.ui import Page, paging, render

router = APIRouter()
COMPARE = "registry.compare"


def _store() -> Any:
    from loft.registry.comparisons import ComparisonStore

    return ComparisonStore()


def server() -> dict[str, Any]:
    """Which model server answers the prompts: ``{url, configured}``."""
    from loft.serve.client import configured

    url, _ = configured()
    return {"url": url, "configured": url is not None}


def _generate(ref: str, prompt: str, max_tokens: int) -> str:
    from loft.serve.client import chat, configured

    url, key = configured()
    if url is None:
        raise ConfigError(
            "no model server is configured, so nothing can answer the prompts.",
            hint="Start `loft serve` (or `loft up`) on this LOFT_HOME and start the portal with "
            "LOFT_SERVE_URL=http://127.0.0.1:8000 (and LOFT_API_KEY, a key that reaches the "
            "adapters), or set serve.url in settings.yaml.",
        )
    return chat(url, key, ref, [{"role": "user", "content": prompt}], max_tokens=max_tokens)


def _create(
    me: Principal, request: Request, versions: list[str], prompts: list[str], max_tokens: int
) -> Any:
    comp = _store().create(versions, prompts, _generate, created_by=me.name, max_tokens=max_tokens)
    audit.append(
        me.name,
        "compare.create",
        comp.id,
        {**auth.context(request, me.via), "versions": comp.versions, "prompts": len(comp.prompts)},
    )
    return comp


def _vote(
    me: Principal, request: Request, cid: str, prompt: int, pair: int, choice: str
) -> dict[str, Any]:
    store = _store()
    reveal = store.vote(cid, me.name, prompt, pair, choice)
    audit.append(
        me.name,
        "compare.vote",
        cid,
        {**auth.context(request, me.via), "prompt": prompt, "pair": pair, **reveal},
    )
    store.record_win_rates([reveal["left"], reveal["right"]])
    return reveal


def _save(me: Principal, request: Request, cid: str, name: str) -> Any:
    from loft.data.catalog import add_version

    store = _store()
    comp = store.get(cid)
    records = store.preference_records(cid)
    if not records:
        raise ConfigError(
            f"comparison {cid} has no task with a majority choice yet (ties and even splits "
            "give no preference pair), so there is nothing to save.",
            hint="Vote on it first.",
        )
    source = {
        "kind": "comparison",
        "comparison": cid,
        "versions": comp.versions,
        "prompts": len(comp.prompts),
        "votes": store.votes_count(cid),
    }
    # one audit entry (dataset.version, by add_version), its source naming the comparison
    dv = add_version(
        name.strip(), records, source=source, created_by=me.name,
        filename=f"comparison-{cid}.jsonl", context=auth.context(request, me.via),
    )  # fmt: skip
    store.mark_saved(cid, dv.ref)
    return dv


def _prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- pages


def _index(
    request: Request, me: Principal, page: Page, *, status: int = 200, **extra: Any
) -> Response:
    rows, total = _store().list_page(page.limit, page.offset)
    return render(
        request,
        "compare.html",
        me,
        status=status,
        comparisons=rows,
        server=server(),
        links=page.links("/compare", page.offset + len(rows) < total),
        **extra,
    )


@router.get("/compare")
def compare_page(
    request: Request, me: Principal = require(COMPARE), page: Page = Depends(paging)
) -> Response:
    versions = [v for v in request.query_params.getlist("v") if v]
    return _index(request, me, page, form={"versions": versions, "prompts": "", "max_tokens": 64})


@router.post("/compare")
def create_form(
    request: Request,
    me: Principal = require(COMPARE),
    versions: str = Form(...),
    prompts: str = Form(...),
    max_tokens: int = Form(64),
) -> Response:
    refs = [v.strip() for v in versions.replace(",", "\n").splitlines() if v.strip()]
    try:
        comp = _create(me, request, refs, _prompt_lines(prompts), max_tokens)
    except LoftError as e:
        form = {"versions": refs, "prompts": prompts, "max_tokens": max_tokens}
        return _index(request, me, Page(), status=http_status_for(e), error=e, form=form)
    return RedirectResponse(f"/compare/{comp.id}", status_code=303)


def _comparison_page(
    request: Request, me: Principal, cid: str, *, status: int = 200, **extra: Any
) -> Response:
    store = _store()
    comp = store.get(cid)
    task = store.next_task(cid, me.name)
    return render(
        request,
        "compare_run.html",
        me,
        status=status,
        c=comp.to_dict(outputs=task is None),
        task=task,
        tally=store.tally(cid),
        **extra,
    )


@router.get("/compare/{cid}")
def comparison_page(request: Request, cid: str, me: Principal = require(COMPARE)) -> Response:
    return _comparison_page(request, me, cid)


@router.post("/compare/{cid}/vote")
def vote_form(
    request: Request,
    cid: str,
    me: Principal = require(COMPARE),
    prompt: int = Form(...),
    pair: int = Form(...),
    choice: str = Form(...),
) -> Response:
    try:
        reveal = _vote(me, request, cid, prompt, pair, choice)
    except LoftError as e:
        return _comparison_page(request, me, cid, status=http_status_for(e), error=e)
    return _comparison_page(request, me, cid, reveal=reveal)


@router.post("/compare/{cid}/dataset")
def save_form(
    request: Request, cid: str, me: Principal = require(COMPARE), name: str = Form(...)
) -> Response:
    try:
        dv = _save(me, request, cid, name)
    except LoftError as e:
        return _comparison_page(request, me, cid, status=http_status_for(e), error=e)
    return _comparison_page(
        request,
        me,
        cid,
        notice=(
            f"saved {dv.records} preference pair{'' if dv.records == 1 else 's'} as dataset "
            f"{dv.ref}"
        ),
    )


# ----------------------------------------------------------------------------- JSON API


class NewComparison(BaseModel):
    model_config = ConfigDict(extra="forbid")
    versions: list[str] = Field(description="Two or more NAME:VERSION or NAME@ALIAS.")
    prompts: list[str]
    max_tokens: int = 64


class Vote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: int
    pair: int
    choice: str = Field(description="left, right or tie")


class SaveDataset(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


@router.get("/api/compare")
def api_list(
    request: Request, me: Principal = require(COMPARE), page: Page = Depends(paging)
) -> dict[str, Any]:
    rows, total = _store().list_page(page.limit, page.offset)
    return {**page.body(rows, total=total), "server": server()}


@router.post("/api/compare", status_code=201)
def api_create(
    request: Request, body: NewComparison, me: Principal = require(COMPARE)
) -> dict[str, Any]:
    comp = _create(me, request, body.versions, body.prompts, body.max_tokens)
    return comp.to_dict(outputs=False)


@router.get("/api/compare/{cid}")
def api_get(request: Request, cid: str, me: Principal = require(COMPARE)) -> dict[str, Any]:
    """The comparison with its tallies; its answers under their versions only once the caller
    has voted on every task (before that, ``GET .../next`` gives the blind pairs)."""
    store = _store()
    done = store.finished(cid, me.name)
    return {**store.get(cid).to_dict(outputs=done), "tally": store.tally(cid), "finished": done}


@router.get("/api/compare/{cid}/next")
def api_next(request: Request, cid: str, me: Principal = require(COMPARE)) -> dict[str, Any]:
    task = _store().next_task(cid, me.name)
    return {"task": task.to_dict() if task else None}


@router.post("/api/compare/{cid}/votes", status_code=201)
def api_vote(
    request: Request, cid: str, body: Vote, me: Principal = require(COMPARE)
) -> dict[str, Any]:
    return _vote(me, request, cid, body.prompt, body.pair, body.choice)


@router.post("/api/compare/{cid}/dataset", status_code=201)
def api_save(
    request: Request, cid: str, body: SaveDataset, me: Principal = require(COMPARE)
) -> dict[str, Any]:
    return _save(me, request, cid, body.name).to_dict()
