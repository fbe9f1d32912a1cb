"""Jobs and runs: the queue (/jobs), the new-job form generated from the training config schema
with the planner's estimate (/jobs/new), and a job's page with its curves, system metrics,
resolved config and log (/jobs/{id}), each with its JSON API under /api/jobs.

The portal submits and cancels through the same package API as `loft jobs` (loft.jobs: the
store, ``kinds.admit_train`` behind ``jobs.submit.submit_train``) and reads runs through
loft.tracking.runs. ``GET /api/jobs/{id}/events`` is a server-sent event stream: the run's new
metric points as the tracking store receives them, the job's status and new log lines, ending
when the job does. No torch here; mlflow is imported only when a run's metrics are first read.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from loft.core.errors import ConfigError, LoftError, http_status_for
from loft.core.units import human_size
from loft.jobs import KINDS, STATES, TERMINAL, Job, JobStore, job_dir
from loft.jobs import form as job_form
from loft.jobs import submit as job_submit
from loft.jobs.kinds import COMMANDS
from loft.jobs.store import store_url
from loft.portal import auth
from loft.portal.auth import Principal, require
from loft.portal.openapi import SSE_EVENT
from loft.portal.ui import Page, paging, render, templates

router = APIRouter()
VIEW = "jobs.view"
SUBMIT = "jobs.submit"
POLL_S = 1.0  # how often an event stream looks for new points, status and log lines
KEEPALIVE_S = 15.0  # a comment line on a quiet stream, so proxies keep it open
LOG_TAIL = 64 * 1024  # the log a page shows, and the most one event carries
# (id, title, metric keys): the charts every training job's page has; other metrics a run
# records (system metrics among them) get a chart each under them
CHARTS = (
    ("loss", "Loss", ("train/loss", "eval/loss")),
    ("lr", "Learning rate", ("train/lr",)),
    ("throughput", "Throughput (tokens/s)", ("train/tokens_per_s",)),
)
SYSTEM_FIELDS = (
    ("placement", "placement"),
    ("peak_mem_bytes", "peak memory"),
    ("tokens_per_s", "tokens/s"),
    ("train_tokens", "tokens trained"),
    ("steps", "steps"),
    ("wall_s", "wall time"),
    ("trainable_params", "trainable params"),
    ("dataset_fingerprint", "prepared dataset"),
)

_stores: dict[str, JobStore] = {}
live_streams = {"open": 0}  # event streams being served now (a disconnect closes its own)


def job_store() -> JobStore:
    """The queue of this LOFT_HOME (or LOFT_JOBS_URL), one JobStore per URL for the process."""
    url = store_url()
    store = _stores.get(url)
    if store is None:
        store = _stores[url] = JobStore(url)
    return store


# ------------------------------------------------------------------------------ reading jobs


def _ago(t: str | None) -> str:
    return t[:19].replace("T", " ") if t else ""


def _span(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def brief(job: Job) -> dict[str, Any]:
    """A job as the list shows it: the JSON form plus its progress and how long it ran."""
    d = job.to_dict()
    p = job.progress or {}
    step, total = p.get("step"), p.get("total")
    if step and total:
        d["pct"] = round(100 * step / total)
    else:
        d["pct"] = 100 if job.status == "SUCCEEDED" else 0
    end = job.finished or (time.time() if job.status == "RUNNING" else None)
    d["duration"] = _span(end - job.started) if job.started and end else ""
    d["created_at"], d["started_at"], d["finished_at"] = map(
        _ago, (d["created"], d["started"], d["finished"])
    )
    if job.kind == "train":
        d["what"] = job.spec.get("label") or Path(job.spec.get("config", "")).name
    else:
        d["what"] = " ".join(job.spec.get("args", []))[:80]
    return d


def run_dir_of(job: Job) -> Path | None:
    return job_dir(job.id) / "run" if job.kind == "train" else None


def _run(job: Job) -> dict[str, Any] | None:
    """The job's run (summary and resolved config), without reading its metrics."""
    from loft.tracking.runs import show_run

    d = run_dir_of(job)
    if d is None or not ((d / "run_summary.json").is_file() or (d / "resolved.yaml").is_file()):
        return None
    return show_run(d, metrics=False)


def metric_points(job: Job) -> tuple[dict[str, list[list[float]]], str | None]:
    """Every metric the job's run has recorded so far, ``{key: [[step, value], ...]}`` by step,
    and why none could be read (the tracking store away), if so. Blocking (the store)."""
    from loft.tracking.runs import show_run

    d = run_dir_of(job)
    if d is None or not (d / "run_summary.json").is_file():
        return {}, None
    info = show_run(d)
    points = {
        key: [[p["step"], p["value"]] for p in history if _finite(p["value"])]
        for key, history in info["metrics"].items()
    }
    return points, info.get("metrics_error")


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _read_log(job_id: str, start: int) -> tuple[str, int]:
    """The job's log from byte ``start`` (-1: its last LOG_TAIL bytes), at most LOG_TAIL bytes
    (the newest), and the offset after it."""
    path = job_dir(job_id) / "log.txt"
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            skip = start < 0 or start > size or size - start > LOG_TAIL
            if skip:  # only the newest LOG_TAIL bytes, from the start of a line
                start = max(0, size - LOG_TAIL)
            f.seek(start)
            data = f.read(size - start)
    except OSError:
        return "", max(start, 0)
    if skip and start > 0:
        cut = data.find(b"\n")
        data = data[cut + 1 :] if 0 <= cut < len(data) - 1 else data
    return data.decode("utf-8", "replace"), size


def _config_text(job: Job, run: dict[str, Any] | None) -> tuple[str, str]:
    """The config to show, and where it came from: the run's resolved.yaml once the run has
    started, else the submitted file."""
    if run and run.get("config"):
        return yaml.safe_dump(run["config"], sort_keys=False), f"{run['path']}/resolved.yaml"
    path = job.spec.get("config")
    if not path:
        return "", ""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return "", path
    sets = job.spec.get("set") or []
    return text + "".join(f"# --set {s}\n" for s in sets), path


def _system(run: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not run:
        return []
    rows = []
    for key, label in SYSTEM_FIELDS:
        v = run.get(key)
        if v is None:
            continue
        if key == "peak_mem_bytes":
            v = human_size(v)
        elif key == "wall_s":
            v = _span(v)
        elif key == "tokens_per_s":
            v = f"{v:,.0f}"
        elif isinstance(v, int):
            v = f"{v:,}"
        elif key == "dataset_fingerprint":
            v = str(v)[:12]
        rows.append((label, str(v)))
    est = (run.get("memory_estimate") or {}).get("total_bytes")
    if est:
        rows.append(("planner's estimate", human_size(est)))
    return rows


# ------------------------------------------------------------------------------ pages


@router.get("/jobs")
def jobs_page(
    request: Request,
    me: Principal = require(VIEW),
    page: Page = Depends(paging),
    status: str | None = None,
    kind: str | None = None,
    owner: str | None = None,
) -> Response:
    jobs, total = job_store().page(
        limit=page.limit, offset=page.offset, status=status or None, kind=kind or None,
        owner=owner or None,
    )  # fmt: skip
    rows = [brief(j) for j in jobs]
    return render(
        request, "jobs.html", me, jobs=rows, total=total, state=status, kind=kind, owner=owner,
        states=STATES, kinds=KINDS, may_submit=me.may(SUBMIT),
        active=any(j["status"] in ("ADMITTED", "RUNNING") for j in rows),
        links=page.links("/jobs", page.offset + len(rows) < total, status=status, kind=kind,
                         owner=owner),
    )  # fmt: skip


def _targets() -> list[str]:
    from loft.planner import gpu_catalogue

    return [job_submit.CPU, *gpu_catalogue()]


def _choices() -> dict[str, list[str]]:
    """Suggestions for the base model and dataset fields: loft's models, the planner's presets,
    the catalog's datasets (the first 50 by name)."""
    from loft.data import catalog
    from loft.models import list_models
    from loft.planner import preset_names

    models = [m["name"] for m in list_models() if m.get("name")] + preset_names()
    try:
        rows, _ = catalog.list_datasets(50, 0)
    except LoftError:
        rows = []
    datasets = [f"{r['name']}:{r['latest']}" for r in rows if r.get("latest")]
    return {"models": list(dict.fromkeys(models)), "datasets": datasets}


def _form(
    request: Request,
    me: Principal,
    values: dict[str, str],
    *,
    errors: dict[str, str] | None = None,
    error: LoftError | None = None,
    status: int = 200,
) -> Response:
    return render(
        request, "jobs_new.html", me, status=status, sections=job_form.sections(),
        values=values, errors=errors or {}, error=error, targets=_targets(), **_choices(),
    )  # fmt: skip


@router.get("/jobs/new")
def new_job_page(request: Request, me: Principal = require(SUBMIT)) -> Response:
    return _form(request, me, {})


def _resolve_dataset(ref: str, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with ``data.train`` set to catalog version ``ref``'s records."""
    from loft.data import catalog

    version = catalog.get_version(ref.strip())
    return {**doc, "data": {**doc.get("data", {}), "train": str(version.path)}}


def _doc_from(values: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The config document a form describes, and problems with its own fields (key -> text)."""
    doc = job_form.to_doc(values)
    problems: dict[str, str] = {}
    ref = values.get("dataset", "").strip()
    if ref:
        try:
            doc = _resolve_dataset(ref, doc)
        except LoftError as e:
            problems["dataset"] = e.message
    return doc, problems


@router.get("/jobs/new/estimate")
def estimate_fragment(request: Request, me: Principal = require(SUBMIT)) -> Response:
    """The planner's estimate of the form's config, as an HTML fragment (htmx swaps it in as
    fields change). Pure arithmetic: no torch, nothing loaded."""
    values = {k: v for k, v in request.query_params.items() if isinstance(v, str)}
    target = values.get("plan_for") or job_submit.CPU
    doc, problems = _doc_from(values)
    doc.setdefault("data", {}).setdefault("train", "(not chosen yet)")
    cfg, found = job_submit.problems(doc)
    plan, capacity_from, why = None, None, None
    if cfg is not None:
        capacity, capacity_from = job_submit.worker_capacity(job_store())
        try:
            plan = job_submit.estimate(cfg, target, capacity=capacity)
        except LoftError as e:
            why = e.message
    return templates.TemplateResponse(
        request, "_jobs_estimate.html",
        {"plan": plan, "problems": [*problems.items(), *found], "why": why,
         "capacity_from": capacity_from, "target": target},
    )  # fmt: skip


def _submit(
    request: Request, me: Principal, doc: dict[str, Any], *, dataset: str | None,
    priority: int, max_attempts: int,
) -> Job:  # fmt: skip
    return job_submit.submit_train(
        doc, owner=me.name, store=job_store(), priority=priority, max_attempts=max_attempts,
        dataset=dataset, actor=me.name, context=auth.context(request, me.via),
    )  # fmt: skip


def _int(values: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = values.get(key, "").strip()
    try:
        n = int(raw) if raw else default
    except ValueError:
        n = low - 1
    if not low <= n <= high:
        raise ConfigError(f"{key}: got {raw!r}; expected a whole number from {low} to {high}")
    return n


@router.post("/jobs/new")
async def new_job_form(request: Request, me: Principal = require(SUBMIT)) -> Response:
    form = await request.form()
    values = {k: v for k, v in form.items() if isinstance(v, str) and k != auth.CSRF_FIELD}
    doc, errors = _doc_from(values)
    _, found = job_submit.problems(doc)
    errors.update({k: v for k, v in found if k not in errors})
    if (
        values.get("dataset", "").strip()
        and "data.train" in errors
        and not values.get("data.train")
    ):
        errors.pop("data.train")  # the dataset's problem says it
    if not errors:
        try:
            priority = _int(values, "priority", 0, -1000, 1000)
            attempts = _int(values, "max_attempts", 3, 1, 100)
            job = await run_in_threadpool(
                _submit, request, me, doc, dataset=values.get("dataset", "").strip() or None,
                priority=priority, max_attempts=attempts,
            )  # fmt: skip
        except LoftError as e:
            keyed = dict(job_submit.keyed_problems(e.message))
            return _form(request, me, values, errors=keyed, error=e, status=http_status_for(e))
        return RedirectResponse(f"/jobs/{job.id}", status_code=303)
    n = len(errors)
    error = ConfigError(
        f"{n} problem{'s' if n > 1 else ''} in the job's config: "
        + "; ".join(f"{k}: {v}" for k, v in errors.items()),
        hint="Fix the fields marked below; nothing was submitted.",
    )
    return _form(request, me, values, errors=errors, error=error, status=400)


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, me: Principal = require(VIEW)) -> Response:
    job = job_store().get(job_id)
    run = _run(job)
    config, config_from = _config_text(job, run)
    log, log_end = _read_log(job.id, -1)
    return render(
        request, "job.html", me, job=brief(job), run=run, config=config,
        config_from=config_from, log=log, log_end=log_end, system=_system(run), charts=CHARTS,
        train=job.kind == "train",
        command=" ".join(["loft", *COMMANDS.get(job.kind, (job.kind,)), *job.spec.get("args", [])]),
        may_cancel=me.may(SUBMIT) and job.status not in TERMINAL,
        terminal=job.status in TERMINAL,
    )  # fmt: skip


def _cancel(request: Request, me: Principal, job_id: str) -> Job:
    store = job_store()
    job = store.get(job_id)
    if job.status in TERMINAL:
        raise ConfigError(
            f"job {job.id} is {job.status}; only a queued or running job can be cancelled",
            hint=f"`loft jobs retry {job.id}` queues a failed or cancelled job again.",
        )
    return store.cancel(job.id, actor=me.name, context=auth.context(request, me.via))


@router.post("/jobs/{job_id}/cancel")
def cancel_form(request: Request, job_id: str, me: Principal = require(SUBMIT)) -> Response:
    _cancel(request, me, job_id)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


# ------------------------------------------------------------------------------ the JSON API


class NewJob(BaseModel):
    """``POST /api/jobs``: a training job. ``config`` is a training config document (the keys
    of `loft train --help`); ``dataset`` a catalog version (NAME:VERSION) that sets
    ``data.train``."""

    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any]
    dataset: str | None = None
    priority: int = Field(0, ge=-1000, le=1000)
    max_attempts: int = Field(3, ge=1, le=100)


class EstimateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any]
    dataset: str | None = None
    target: str = job_submit.CPU


@router.get("/api/jobs")
def api_jobs(
    me: Principal = require(VIEW),
    page: Page = Depends(paging),
    status: str | None = Query(None, description="ADMITTED, RUNNING, SUCCEEDED, ..."),
    kind: str | None = None,
    owner: str | None = None,
) -> dict[str, Any]:
    if status and status.upper() not in STATES:
        raise ConfigError(f"status {status!r}: one of {', '.join(STATES)}")
    jobs, total = job_store().page(
        limit=page.limit, offset=page.offset, status=status, kind=kind, owner=owner
    )
    return page.body([j.to_dict() for j in jobs], total=total)


@router.post("/api/jobs", status_code=201)
def api_submit(request: Request, body: NewJob, me: Principal = require(SUBMIT)) -> dict[str, Any]:
    """Validate the config (every problem with its key path), admit it as `loft jobs submit`
    does (the planner's memory estimate against the workers) and queue it: 201 and the job."""
    doc = _resolve_dataset(body.dataset, body.config) if body.dataset else body.config
    job = _submit(request, me, doc, dataset=body.dataset, priority=body.priority,
                  max_attempts=body.max_attempts)  # fmt: skip
    return {**job.to_dict(), "url": f"/jobs/{job.id}"}


@router.post("/api/jobs/estimate")
def api_estimate(body: EstimateBody, me: Principal = require(SUBMIT)) -> dict[str, Any]:
    """The planner's estimate of a config on ``target`` (``cpu``: the largest worker's memory;
    or a catalogue GPU such as ``a100-80``), as the new-job form shows it."""
    doc = _resolve_dataset(body.dataset, body.config) if body.dataset else body.config
    doc = {**doc, "data": {"train": "(not chosen yet)", **doc.get("data", {})}}
    cfg = job_submit.validate(doc, check_files=False)
    capacity, capacity_from = job_submit.worker_capacity(job_store())
    plan = job_submit.estimate(cfg, body.target, capacity=capacity)
    return {**plan, "capacity_from": capacity_from if body.target == job_submit.CPU else None}


@router.get("/api/jobs/{job_id}")
def api_job(job_id: str, me: Principal = require(VIEW)) -> dict[str, Any]:
    """The job, and its run's summary and resolved config once it has started."""
    job = job_store().get(job_id)
    run = _run(job)
    if run is not None:
        run = {k: v for k, v in run.items() if k != "metrics"}
    return {**job.to_dict(), "run": run}


@router.post("/api/jobs/{job_id}/cancel")
def api_cancel(request: Request, job_id: str, me: Principal = require(SUBMIT)) -> dict[str, Any]:
    """A queued job is cancelled at once; a running one when its worker next renews the lease
    (a training run saves a checkpoint first)."""
    return _cancel(request, me, job_id).to_dict()


@router.get("/api/jobs/{job_id}/metrics")
def api_metrics(job_id: str, me: Principal = require(VIEW)) -> dict[str, Any]:
    """Every metric point the job's run has recorded: ``{metrics: {key: [[step, value]]}}``."""
    job = job_store().get(job_id)
    points, why = metric_points(job)
    return {"job": job.id, "status": job.status, "metrics": points, "metrics_error": why}


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _status(job: Job) -> dict[str, Any]:
    b = brief(job)
    keep = ("status", "progress", "attempts", "worker", "error", "pct", "started_at")
    return {k: b[k] for k in keep}


async def _events(request: Request, job: Job, log_from: int) -> AsyncIterator[str]:
    """The stream: ``status`` when the job's changes, ``metrics`` with the points recorded
    since the last event, ``log`` with new log text; ``end`` (and the stream closes) once the
    job has finished and everything it recorded was sent. A client that goes away ends it."""
    store = job_store()
    sent: dict[str, float] = {}  # metric -> the last step sent
    said: dict[str, Any] | None = None
    said_error: str | None = None
    pos, quiet = log_from, time.monotonic()
    live_streams["open"] += 1
    try:
        while True:
            job = await run_in_threadpool(store.get, job.id)
            out = []
            status = _status(job)
            if status != said:
                out.append(_event("status", status))
                said = status
            points, why = await run_in_threadpool(metric_points, job)
            new = {}
            for key, pts in points.items():
                fresh = [p for p in pts if p[0] > sent.get(key, -math.inf)]
                if fresh:
                    new[key] = fresh
                    sent[key] = fresh[-1][0]
            if new:
                out.append(_event("metrics", {"points": new}))
            if why and why != said_error:
                out.append(_event("warning", {"message": f"metrics unavailable: {why}"}))
                said_error = why
            text, pos = await run_in_threadpool(_read_log, job.id, pos)
            if text:
                out.append(_event("log", {"text": text, "end": pos}))
            if job.status in TERMINAL:  # read after the status: the run flushed before it ended
                out.append(_event("end", {"status": job.status}))
            now = time.monotonic()
            if out:
                quiet = now
            elif now - quiet >= KEEPALIVE_S:
                out.append(": keepalive\n\n")
                quiet = now
            for chunk in out:
                yield chunk
            if job.status in TERMINAL or await request.is_disconnected():
                return
            await asyncio.sleep(POLL_S)
    finally:
        live_streams["open"] -= 1


@router.get(
    "/api/jobs/{job_id}/events",
    responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}},
)
async def api_events(
    request: Request,
    job_id: str,
    me: Principal = require(VIEW),
    log_from: int = Query(-1, ge=-1, le=2**62, description="log byte offset; -1: the log's tail"),
) -> StreamingResponse:
    """Server-sent events (text/event-stream) of one job: its status, its run's metric points
    and its log as they appear; ends when the job has finished."""
    job = await run_in_threadpool(job_store().get, job_id)
    return StreamingResponse(
        _events(request, job, log_from),
        media_type="text/event-stream",
        headers={"X-Accel-Buffering": "no"},
    )


__all__ = ["CHARTS", "brief", "job_store", "metric_points", "router"]
