"""Labelling: the /labelling pages (projects, the keyboard-first labelling page, review) and
/api/labelling. Thin: every change is a call into loft.curate (the same API scripts use), which
validates, stores in portal.db and writes the audit trail.

Who sees what: ``labelling.annotate`` opens the pages, but an annotator sees only projects with
records assigned to them and reads and answers only those records (403 otherwise);
``labelling.review`` (curators, admins) reads every record, the agreement and the disagreements
and sets final answers; ``labelling.manage`` creates projects and exports them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from loft.core.errors import ConfigError, LoftError, NotFoundError, PermissionDeniedError
from loft.curate import questions as qs
from loft.curate.export import SHAPES, export
from loft.curate.served import import_served
from loft.curate.store import SUGGESTIONS, LabellingStore, Project
from loft.curate.suggest import suggest
from loft.portal import auth
from loft.portal.auth import Principal, require
from loft.portal.roles import allowed
from loft.portal.ui import Page, paging, render

router = APIRouter()
MANAGE, ANNOTATE, REVIEW = "labelling.manage", "labelling.annotate", "labelling.review"
QUESTION_ROWS = 4  # question rows on the create form (the API takes any number)


def store_of(request: Request) -> LabellingStore:
    """One LabellingStore per app, over the portal's own portal.db."""
    store = getattr(request.app.state, "labelling", None)
    if store is None:
        store = request.app.state.labelling = LabellingStore(auth.store_of(request).path)
    return store


def _project_for(request: Request, me: Principal, name: str) -> Project:
    """The project, if ``me`` may see it: reviewers and managers see all, annotators theirs."""
    store = store_of(request)
    project = store.get_project(name)
    if not (me.may(REVIEW) or me.may(MANAGE) or store.is_assigned(name, me.name)):
        raise PermissionDeniedError(
            f"{me.name} has no records assigned in labelling project {name!r}.",
            hint="The /labelling page lists the projects with records for you.",
        )
    return project


def _readable(request: Request, me: Principal, name: str, record: int) -> bool:
    """Whether ``me`` may read ``record``: it is assigned to them (True), or they review
    (False: read only). PermissionDeniedError otherwise."""
    store = store_of(request)
    store.get_project(name)
    if store.is_assigned(name, me.name, record):
        return True
    if me.may(REVIEW):
        return False
    store.task(name, record, me.name)  # raises NotFoundError or PermissionDeniedError
    return False


def _list(request: Request, me: Principal, page: Page) -> tuple[list[Project], int]:
    mine = None if (me.may(REVIEW) or me.may(MANAGE)) else me.name
    return store_of(request).list_projects(page.limit, page.offset, annotator=mine)


def _annotators(request: Request) -> list[str]:
    users, _ = auth.store_of(request).list_users(500, 0)
    return [u.name for u in users if not u.disabled and allowed(u.role, ANNOTATE)]


def _check_annotators(request: Request, names: list[str]) -> None:
    may = set(_annotators(request))
    bad = [n for n in names if n not in may]
    if bad:
        raise ConfigError(
            f"cannot assign records to {', '.join(bad)}: not an enabled user whose role may "
            "label (annotator, curator or admin).",
            hint="The users page lists the accounts and their roles.",
        )


def _create(request: Request, me: Principal, body: NewProject) -> Project:
    _check_annotators(request, body.annotators)
    return store_of(request).create_project(
        body.name, body.dataset, body.questions, body.annotators, overlap=body.overlap,
        guidelines=body.guidelines, suggestions=body.suggestions, actor=me.name,
        context=auth.context(request, me.via),
    )  # fmt: skip


def _redirect(request: Request, target: str) -> Response:
    if request.headers.get("HX-Request"):
        return Response(status_code=204, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


# -- pages ---------------------------------------------------------------------------------------


def _list_page(
    request: Request,
    me: Principal,
    page: Page,
    *,
    error: LoftError | None = None,
    notice: str | None = None,
    form: dict | None = None,
) -> Response:
    projects, total = _list(request, me, page)
    store = store_of(request)
    mine = {
        p.name: next((r for r in store.progress(p.name) if r["annotator"] == me.name), None)
        for p in projects
    }
    return render(
        request, "labelling.html", me, status=400 if error else 200, error=error, notice=notice,
        projects=projects, total=total, mine=mine, manage=me.may(MANAGE),
        annotators=_annotators(request) if me.may(MANAGE) else [], kinds=qs.KINDS,
        kind_help=qs.KIND_HELP, suggestions=SUGGESTIONS, rows=range(QUESTION_ROWS),
        form=form or {}, links=page.links("/labelling", page.offset + len(projects) < total),
    )  # fmt: skip


@router.get("/labelling")
def labelling_page(
    request: Request, me: Principal = require(ANNOTATE), page: Page = Depends(paging)
) -> Response:
    return _list_page(request, me, page)


@router.post("/labelling")
async def create_form(request: Request, me: Principal = require(MANAGE)) -> Response:
    form = await request.form()
    questions = []
    for i in range(QUESTION_ROWS):
        name = str(form.get(f"q{i}_name", "")).strip()
        if not name:
            continue
        q: dict[str, Any] = {"name": name, "kind": form.get(f"q{i}_kind"),
                             "text": str(form.get(f"q{i}_text", ""))}  # fmt: skip
        if q["kind"] == "rating":
            scale = str(form.get(f"q{i}_scale", "")).strip()
            q["scale"] = int(scale) if scale.isdigit() else scale
        if q["kind"] == "label":
            q["labels"] = [x.strip() for x in str(form.get(f"q{i}_labels", "")).split(",")]
        questions.append(q)
    overlap = str(form.get("overlap", "1")).strip()
    try:
        body = NewProject(
            name=str(form.get("name", "")).strip(), dataset=str(form.get("dataset", "")).strip(),
            guidelines=str(form.get("guidelines", "")), questions=questions,
            annotators=[str(a) for a in form.getlist("annotators")],
            overlap=int(overlap) if overlap.isdigit() else 0,
            suggestions=str(form.get("suggestions", "none")),
        )  # fmt: skip
        project = _create(request, me, body)
    except LoftError as e:
        return _list_page(request, me, Page(), error=e, form=dict(form))
    return _redirect(request, f"/labelling/{project.name}")


def _import(request: Request, me: Principal, body: ServedImport) -> tuple[Any, dict]:
    return import_served(
        body.dataset, model=body.model, min_score=body.min_score, since=body.since,
        actor=me.name, context=auth.context(request, me.via),
    )  # fmt: skip


@router.post("/labelling/served")
async def served_form(request: Request, me: Principal = require(MANAGE)) -> Response:
    """Import served requests (the server's audit log) as a dataset version to label."""
    form = await request.form()
    score = str(form.get("min_score", "")).strip()
    try:
        body = ServedImport(
            dataset=str(form.get("dataset", "")).strip(),
            model=str(form.get("model", "")).strip() or None,
            min_score=float(score) if score else None,
            since=str(form.get("since", "")).strip() or None,
        )
        version, counts = _import(request, me, body)
    except (LoftError, ValueError) as e:
        error = e if isinstance(e, LoftError) else ConfigError(f"min score {score!r}: {e}")
        return _list_page(request, me, Page(), error=error)
    return _list_page(
        request, me, Page(), form={"dataset": version.ref},
        notice=f"Imported {counts['kept']} of {counts['read']} served chat requests as dataset "
        f"{version.ref}; create a project over it below.",
    )  # fmt: skip


def _project_page(
    request: Request,
    me: Principal,
    name: str,
    *,
    notice: str | None = None,
    error: LoftError | None = None,
) -> Response:
    project = _project_for(request, me, name)
    store = store_of(request)
    progress = store.progress(name)
    reviewer = me.may(REVIEW)
    return render(
        request, "labelling_project.html", me, status=400 if error else 200,
        notice=notice, error=error, project=project, reviewer=reviewer, manage=me.may(MANAGE),
        progress=progress if reviewer else [r for r in progress if r["annotator"] == me.name],
        agreement=store.agreement(name) if reviewer else None,
        conflicts=store.conflicts(name, 1, 0)[1] if reviewer else 0,
        exports=store.exports(name, 20, 0)[0] if reviewer else [], shapes=SHAPES,
        assigned=store.is_assigned(name, me.name),
    )  # fmt: skip


@router.get("/labelling/{name}")
def project_page(request: Request, name: str, me: Principal = require(ANNOTATE)) -> Response:
    return _project_page(request, me, name)


@router.get("/labelling/{name}/next")
def next_page(
    request: Request, name: str, after: int = -1, me: Principal = require(ANNOTATE)
) -> Response:
    _project_for(request, me, name)
    record = store_of(request).next_record(name, me.name, after=after)
    if record is None:
        return _project_page(
            request, me, name, notice="You have labelled every record assigned to you here."
        )
    return _redirect(request, f"/labelling/{name}/records/{record}")


def _record_page(
    request: Request,
    me: Principal,
    name: str,
    record: int,
    *,
    error: LoftError | None = None,
    draft: dict | None = None,
    notice: str | None = None,
) -> Response:
    project = _project_for(request, me, name)
    store = store_of(request)
    mine = _readable(request, me, name, record)
    task = store.task(name, record, me.name) if mine else None
    view = store.record_view(name, record)
    answers = draft if draft is not None else (task.answers if task else {})
    if not answers and task is not None and task.status == "pending":
        answers = {k: s["value"] for k, s in view["suggestions"].items()}
    return render(
        request, "labelling_record.html", me, status=400 if error else 200, error=error,
        notice=notice, project=project, view=view, task=task, answers=answers, mine=mine,
        prev=store.neighbour(name, me.name, record, -1) if mine else None,
        next=store.neighbour(name, me.name, record, +1) if mine else None,
        suggested=set(view["suggestions"]) if task and task.status == "pending" else set(),
    )  # fmt: skip


@router.get("/labelling/{name}/records/{record}")
def record_page(
    request: Request, name: str, record: int, me: Principal = require(ANNOTATE)
) -> Response:
    saved = request.query_params.get("saved")
    return _record_page(request, me, name, record, notice="Draft saved." if saved else None)


def _form_answers(project: Project, form: Any) -> dict[str, Any]:
    """Answers from a labelling or review form: ``q.<name>`` fields (a ranking as
    ``q.<name>.<response index>`` = rank)."""
    answers: dict[str, Any] = {}
    for q in project.questions:
        if q.kind == "ranking":
            ranks = {
                int(key.rsplit(".", 1)[1]): value
                for key, value in form.items()
                if key.startswith(f"q.{q.name}.") and key.rsplit(".", 1)[1].isdigit() and value
            }
            if ranks:
                answers[q.name] = [i for i, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
            continue
        value = form.get(f"q.{q.name}")
        if value is None or value == "":
            continue
        if q.kind in ("rating", "pairwise"):
            value = int(value) if str(value).lstrip("-").isdigit() else value
        answers[q.name] = value
    return answers


@router.post("/labelling/{name}/records/{record}")
async def record_form(
    request: Request, name: str, record: int, me: Principal = require(ANNOTATE)
) -> Response:
    """The labelling page's form: ``action`` is draft, submit or discard."""
    form = await request.form()
    project = store_of(request).get_project(name)
    action = form.get("action", "submit")
    answers = _form_answers(project, form)
    store, ctx = store_of(request), auth.context(request, me.via)
    try:
        if action == "discard":
            store.discard(name, record, me.name, actor=me.name, context=ctx)
        else:
            store.save(name, record, me.name, answers, submit=action == "submit", actor=me.name,
                       context=ctx)  # fmt: skip
    except (ConfigError, NotFoundError) as e:
        return _record_page(request, me, name, record, error=e, draft=answers)
    if action == "draft":
        return _redirect(request, f"/labelling/{name}/records/{record}?saved=1")
    return _redirect(request, f"/labelling/{name}/next?after={record}")


def _review_page(
    request: Request, me: Principal, name: str, page: Page, *, error: LoftError | None = None,
    notice: str | None = None,
) -> Response:  # fmt: skip
    project = store_of(request).get_project(name)
    store = store_of(request)
    conflicts, total = store.conflicts(name, page.limit, page.offset)
    for c in conflicts:
        c["view"] = store.record_view(name, c["record"])
    return render(
        request, "labelling_review.html", me, status=400 if error else 200, error=error,
        notice=notice, project=project, conflicts=conflicts, total=total, answers={},
        links=page.links(f"/labelling/{name}/review", page.offset + len(conflicts) < total),
    )  # fmt: skip


@router.get("/labelling/{name}/review")
def review_page(
    request: Request, name: str, me: Principal = require(REVIEW), page: Page = Depends(paging)
) -> Response:
    return _review_page(request, me, name, page)


@router.post("/labelling/{name}/review/{record}")
async def review_form(
    request: Request, name: str, record: int, me: Principal = require(REVIEW)
) -> Response:
    form = await request.form()
    project = store_of(request).get_project(name)
    try:
        store_of(request).resolve(
            name, record, _form_answers(project, form), discard=form.get("action") == "discard",
            actor=me.name, context=auth.context(request, me.via),
        )  # fmt: skip
    except LoftError as e:
        return _review_page(request, me, name, Page(), error=e)
    return _review_page(request, me, name, Page(), notice=f"Record {record} resolved.")


@router.post("/labelling/{name}/suggest")
async def suggest_form(request: Request, name: str, me: Principal = require(MANAGE)) -> Response:
    """Ask a served model version to answer the next batch of records (suggestions)."""
    form = await request.form()
    limit = str(form.get("limit", "20")).strip()
    try:
        done = suggest(
            store_of(request), name, str(form.get("model", "")).strip(),
            limit=int(limit) if limit.isdigit() else 0, actor=me.name,
            context=auth.context(request, me.via),
        )  # fmt: skip
    except LoftError as e:
        return _project_page(request, me, name, error=e)
    return _project_page(
        request, me, name,
        notice=f"{done['model']} suggested answers for {len(done['suggested'])} records; "
        f"{done['left']} have none yet.",
    )  # fmt: skip


@router.post("/labelling/{name}/export")
async def export_form(request: Request, name: str, me: Principal = require(MANAGE)) -> Response:
    form = await request.form()
    desirable = [x.strip() for x in str(form.get("desirable", "")).split(",") if x.strip()]
    try:
        version, counts = export(
            store_of(request), name, str(form.get("shape", "")),
            dataset=str(form.get("dataset", "")).strip() or None,
            question=str(form.get("question", "")).strip() or None, desirable=desirable,
            actor=me.name, context=auth.context(request, me.via),
        )  # fmt: skip
    except LoftError as e:
        return _project_page(request, me, name, error=e)
    left = ", ".join(f"{n} {why}" for why, n in counts.items() if why != "records" and n)
    return _project_page(
        request, me, name,
        notice=f"Exported {version.records} records as dataset {version.ref}"
        + (f" (left out: {left})" if left else "") + ".",
    )  # fmt: skip


# -- JSON API ------------------------------------------------------------------------------------


class NewProject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    dataset: str
    questions: list[dict[str, Any]]
    annotators: list[str]
    overlap: int = 1
    guidelines: str = ""
    suggestions: str = "none"


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    answers: dict[str, Any] = Field(default_factory=dict)
    submit: bool = False


class Review(BaseModel):
    model_config = ConfigDict(extra="forbid")
    answers: dict[str, Any] = Field(default_factory=dict)
    discard: bool = False


class ServedImport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str
    model: str | None = None
    min_score: float | None = None
    since: str | None = None


class Suggest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    limit: int = 20


class NewExport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: str
    dataset: str | None = None
    question: str | None = None
    desirable: list[str] = Field(default_factory=list)


@router.get("/api/labelling/projects")
def api_projects(
    request: Request, me: Principal = require(ANNOTATE), page: Page = Depends(paging)
) -> dict[str, Any]:
    """Projects by name (an annotator's: those with records assigned to them)."""
    projects, total = _list(request, me, page)
    return page.body([p.to_dict() for p in projects], total=total)


@router.post("/api/labelling/projects", status_code=201)
def api_create(request: Request, body: NewProject, me: Principal = require(MANAGE)) -> dict:
    return _create(request, me, body).to_dict()


@router.post("/api/labelling/served", status_code=201)
def api_import_served(
    request: Request, body: ServedImport, me: Principal = require(MANAGE)
) -> dict[str, Any]:
    """A new dataset version from the model server's audit log (requests logged with
    ``log_prompts: true``): the version, and ``import`` (kept, read, skipped with reasons)."""
    version, counts = _import(request, me, body)
    return {**version.to_dict(), "import": counts}


@router.get("/api/labelling/projects/{name}")
def api_project(request: Request, name: str, me: Principal = require(ANNOTATE)) -> dict:
    """The project and its progress (an annotator's own row only)."""
    project = _project_for(request, me, name)
    progress = store_of(request).progress(name)
    if not me.may(REVIEW):
        progress = [r for r in progress if r["annotator"] == me.name]
    return {**project.to_dict(), "progress": progress}


@router.get("/api/labelling/projects/{name}/tasks")
def api_tasks(
    request: Request, name: str, me: Principal = require(ANNOTATE), page: Page = Depends(paging)
) -> dict[str, Any]:
    """The caller's own tasks in the project, by record."""
    _project_for(request, me, name)
    tasks, total = store_of(request).tasks(name, me.name, page.limit, page.offset)
    return page.body([t.to_dict() for t in tasks], total=total)


@router.get("/api/labelling/projects/{name}/next")
def api_next(
    request: Request, name: str, after: int = -1, me: Principal = require(ANNOTATE)
) -> dict[str, Any]:
    """``{"record": N}``: the caller's next record to do after ``after``, or null when done."""
    _project_for(request, me, name)
    return {"record": store_of(request).next_record(name, me.name, after=after)}


@router.get("/api/labelling/projects/{name}/records/{record}")
def api_record(
    request: Request, name: str, record: int, me: Principal = require(ANNOTATE)
) -> dict[str, Any]:
    """The record as the labelling page shows it, with the caller's task (null for a reviewer
    reading a record that is not theirs)."""
    mine = _readable(request, me, name, record)
    store = store_of(request)
    task = store.task(name, record, me.name).to_dict() if mine else None
    return {**store.record_view(name, record), "task": task}


@router.put("/api/labelling/projects/{name}/records/{record}")
def api_answer(
    request: Request, name: str, record: int, body: Answer, me: Principal = require(ANNOTATE)
) -> dict[str, Any]:
    """Save the caller's answers as a draft, or submit them (``"submit": true``)."""
    return store_of(request).save(
        name, record, me.name, body.answers, submit=body.submit, actor=me.name,
        context=auth.context(request, me.via),
    ).to_dict()  # fmt: skip


@router.post("/api/labelling/projects/{name}/records/{record}/discard")
def api_discard(
    request: Request, name: str, record: int, me: Principal = require(ANNOTATE)
) -> dict[str, Any]:
    return (
        store_of(request)
        .discard(name, record, me.name, actor=me.name, context=auth.context(request, me.via))
        .to_dict()
    )


@router.get("/api/labelling/projects/{name}/agreement")
def api_agreement(request: Request, name: str, me: Principal = require(REVIEW)) -> dict:
    return store_of(request).agreement(name)


@router.get("/api/labelling/projects/{name}/conflicts")
def api_conflicts(
    request: Request, name: str, me: Principal = require(REVIEW), page: Page = Depends(paging)
) -> dict[str, Any]:
    """Records whose submissions disagree and that no reviewer has resolved."""
    conflicts, total = store_of(request).conflicts(name, page.limit, page.offset)
    return page.body(conflicts, total=total)


@router.put("/api/labelling/projects/{name}/records/{record}/review")
def api_review(
    request: Request, name: str, record: int, body: Review, me: Principal = require(REVIEW)
) -> dict[str, Any]:
    """The final answers for a record (or ``"discard": true``)."""
    return store_of(request).resolve(
        name, record, body.answers, discard=body.discard, actor=me.name,
        context=auth.context(request, me.via),
    )  # fmt: skip


@router.post("/api/labelling/projects/{name}/suggestions")
def api_suggest(
    request: Request, name: str, body: Suggest, me: Principal = require(MANAGE)
) -> dict[str, Any]:
    """The served model version ``model`` answers up to ``limit`` records without a suggestion
    (on the configured model server: LOFT_SERVE_URL / serve.url, key LOFT_API_KEY); its answers
    prefill the correction questions, marked as suggestions."""
    return suggest(
        store_of(request), name, body.model, limit=body.limit, actor=me.name,
        context=auth.context(request, me.via),
    )  # fmt: skip


@router.get("/api/labelling/projects/{name}/exports")
def api_exports(
    request: Request, name: str, me: Principal = require(MANAGE), page: Page = Depends(paging)
) -> dict[str, Any]:
    store_of(request).get_project(name)
    rows, total = store_of(request).exports(name, page.limit, page.offset)
    return page.body(rows, total=total)


@router.post("/api/labelling/projects/{name}/exports", status_code=201)
def api_export(
    request: Request, name: str, body: NewExport, me: Principal = require(MANAGE)
) -> dict[str, Any]:
    """A new dataset version from the project's final answers: the version, and ``left_out``
    (discarded, conflicts, unfinished)."""
    version, counts = export(
        store_of(request), name, body.shape, dataset=body.dataset, question=body.question,
        desirable=body.desirable, actor=me.name, context=auth.context(request, me.via),
    )  # fmt: skip
    return {**version.to_dict(), "left_out": {k: v for k, v in counts.items() if k != "records"}}
