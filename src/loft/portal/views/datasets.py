"""Datasets: the catalog's pages and /api/datasets, over loft.data.catalog (the same API a
labelling export or a comparison uses to store a version).

An upload is streamed to a temp file under the catalog, counted as it arrives and refused with
413 past ``portal.max_upload_mb`` (LOFT_PORTAL_MAX_UPLOAD_MB; default 200), keeping nothing. Its
records are validated by loft.data's readers: problems come back as ``FILE:LINE: field: reason``
with the uploaded file's own name, and nothing is stored. A version's report (stats, PII,
duplicates, fingerprint) is computed once; a large version's in a background thread, so no page
waits for it.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from loft.core.errors import (
    ConfigError,
    DataError,
    LoftError,
    RequestTooLargeError,
    http_status_for,
)
from loft.data import catalog
from loft.portal import auth
from loft.portal.auth import CSRF_HEADER, Principal, require
from loft.portal.ui import Page, paging, render, templates

router = APIRouter()
VIEW = "datasets.view"
UPLOAD = "datasets.upload"
DEFAULT_MAX_UPLOAD_MB = 200
SYNC_REPORT_RECORDS = 20_000  # larger versions get their report from a background thread
RECORDS_PAGE = 20
_FIELD_LIMIT = 64 * 1024  # a form field other than the file (csrf_token, name)
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


# ------------------------------------------------------------------------------ upload limit


def max_upload_bytes() -> int:
    """$LOFT_PORTAL_MAX_UPLOAD_MB, else ``portal.max_upload_mb`` in settings.yaml, else 200."""
    from loft.core.settings import positive_setting

    mb = positive_setting(
        "LOFT_PORTAL_MAX_UPLOAD_MB", "portal.max_upload_mb", DEFAULT_MAX_UPLOAD_MB,
        most=1024 * 1024, expected="a number of megabytes above 0, e.g. 200 or 0.5",
    )  # fmt: skip
    return int(mb * 1024 * 1024)


def _too_large(limit: int) -> RequestTooLargeError:
    mb = limit / (1024 * 1024)
    return RequestTooLargeError(
        f"the upload is larger than the portal's limit of {mb:.3g} MB; nothing was kept.",
        hint="Split the file, or raise portal.max_upload_mb in LOFT_HOME/settings.yaml "
        "(or LOFT_PORTAL_MAX_UPLOAD_MB) and restart the portal.",
    )


def _content_length_guard(request: Request) -> None:
    """Refuse a body announced as too large before anything reads it (auth included: a form
    without the CSRF header is parsed whole to find its csrf_token)."""
    declared = request.headers.get("content-length", "")
    limit = max_upload_bytes()
    if declared.isdigit() and int(declared) > limit + _FIELD_LIMIT:
        raise _too_large(limit)


# ----------------------------------------------------------------------- receiving an upload


class _Upload:
    """One multipart upload on disk: ``path`` (the file part, named after the upload so the
    reader picks its format by extension), ``filename`` as sent, the other ``fields``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path: Path | None = None
        self.filename = ""
        self.size = 0
        self.fields: dict[str, str] = {}

    def target(self, filename: str) -> Path:
        self.filename = Path(filename.replace("\\", "/")).name or "upload"
        self.path = self.folder / (_SAFE.sub("_", self.filename).lstrip(".") or "upload")
        return self.path


async def _receive(request: Request, me: Principal, folder: Path, limit: int) -> _Upload:
    """Stream the request's multipart body to ``folder``, counting bytes; RequestTooLargeError
    past ``limit``. A session form sent without the CSRF header was already parsed (to check its
    csrf_token): that form's spooled file is copied instead, counted the same way."""
    upload = _Upload(folder)
    if me.via == "session" and request.headers.get(CSRF_HEADER) is None:
        form = await request.form()
        for key, value in form.multi_items():
            if isinstance(value, str):
                upload.fields[key] = value
            elif key == "file" and upload.path is None:
                with open(upload.target(value.filename or "upload"), "wb") as out:
                    while chunk := await value.read(1024 * 1024):
                        upload.size += len(chunk)
                        if upload.size > limit:
                            raise _too_large(limit)
                        out.write(chunk)
        return upload
    return await _stream(request, upload, limit)


async def _stream(request: Request, upload: _Upload, limit: int) -> _Upload:
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise DataError(
            "an upload must be sent as multipart/form-data with the file in the field 'file'",
            hint="curl -F file=@data.jsonl -H 'Authorization: Bearer …' "
            "http://127.0.0.1:8600/api/datasets/NAME",
        )
    state: dict[str, Any] = {"header": b"", "headers": {}, "out": None, "field": None}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        key = state["header"].lower()
        state["headers"][key] = state["headers"].get(key, b"") + data[start:end]

    def on_header_end() -> None:
        state["header"] = b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in disp and name == "file" and upload.path is None:
            filename = disp[b"filename"].decode("utf-8", "replace")
            state["out"] = open(upload.target(filename), "wb")  # noqa: SIM115 (closed at part end)
        elif b"filename" not in disp:
            state["field"] = (name, bytearray())

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["out"] is not None:
            upload.size += end - start
            if upload.size > limit:
                raise _too_large(limit)
            state["out"].write(data[start:end])
        elif state["field"] is not None:
            state["field"][1].extend(data[start:end])
            if len(state["field"][1]) > _FIELD_LIMIT:
                raise DataError(f"the form field {state['field'][0]!r} is too long")

    def on_part_end() -> None:
        if state["out"] is not None:
            state["out"].close()
        elif state["field"] is not None:
            name, value = state["field"]
            upload.fields[name] = value.decode("utf-8", "replace")
        state.update(headers={}, out=None, field=None)

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + _FIELD_LIMIT:
                raise _too_large(limit)
            parser.write(chunk)
        parser.finalize()
    finally:
        if state["out"] is not None:
            state["out"].close()
    return upload


async def _add_upload(request: Request, me: Principal, name: str | None) -> catalog.DatasetVersion:
    """Receive the upload, validate and store it as the next version of ``name`` (or of the
    form's ``name`` field); nothing stays on disk unless a version was made."""
    limit = max_upload_bytes()
    folder = Path(tempfile.mkdtemp(prefix=".upload-", dir=catalog.catalog_dir()))
    try:
        upload = await _receive(request, me, folder, limit)
        name = (name or upload.fields.get("name", "")).strip()
        request.state.upload_name = name  # to fill the form in again if this fails
        catalog.check_name(name)
        if upload.path is None or upload.size == 0:
            raise DataError(
                "no file was uploaded (or it is empty): send it in the form field 'file'",
                hint="Choose a .jsonl, .json, .csv or .parquet file.",
            )
        source = {"kind": "upload", "filename": upload.filename, "bytes": upload.size}
        version = await run_in_threadpool(
            catalog.add_version, name, file=upload.path, source=source,
            created_by=me.name, filename=upload.filename,
            context=auth.context(request, me.via),
        )  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _start_report(version)
    return version


# -------------------------------------------------------------------------------- reports

_computing: set[str] = set()
_computing_lock = threading.Lock()


def _start_report(v: catalog.DatasetVersion) -> None:
    """Compute the report now for a small version, else in a background thread (once)."""
    if v.records <= SYNC_REPORT_RECORDS:
        catalog.report(v.ref)
        return
    with _computing_lock:
        if v.ref in _computing:
            return
        _computing.add(v.ref)

    def work() -> None:
        try:
            catalog.report(v.ref)
        finally:
            with _computing_lock:
                _computing.discard(v.ref)

    threading.Thread(target=work, name=f"report {v.ref}", daemon=True).start()


def _report_or_start(v: catalog.DatasetVersion) -> dict[str, Any] | None:
    rep = catalog.cached_report(v.ref)
    if rep is None:
        _start_report(v)
        rep = catalog.cached_report(v.ref)
    return rep


# ---------------------------------------------------------------------------------- pages


def _upload_error(error: LoftError | None) -> dict[str, Any]:
    """A failed upload's problems go in the form's list (FILE:LINE each); other errors in the
    page's error box."""
    problems = getattr(error, "problems", None)
    if error is None or not problems:
        return {"error": error, "problems": None}
    return {"error": None, "problems": problems, "problems_head": error.message.splitlines()[0]}


def _list_page(
    request: Request,
    me: Principal,
    page: Page,
    *,
    error: LoftError | None = None,
    name: str = "",
) -> Response:
    rows, total = catalog.list_datasets(page.limit, page.offset)
    return render(
        request, "datasets.html", me, status=http_status_for(error) if error else 200,
        rows=rows, total=total, name=name, may_upload=me.may(UPLOAD),
        max_mb=max_upload_bytes() / 2**20, **_upload_error(error),
        links=page.links("/datasets", page.offset + len(rows) < total),
    )  # fmt: skip


def _dataset_page(
    request: Request, me: Principal, name: str, page: Page, *, error: LoftError | None = None
) -> Response:
    versions, total = catalog.list_versions(name, page.limit, page.offset)
    return render(
        request, "dataset.html", me, status=http_status_for(error) if error else 200,
        name=name, versions=versions, total=total, may_upload=me.may(UPLOAD),
        max_mb=max_upload_bytes() / 2**20, **_upload_error(error),
        links=page.links(f"/datasets/{name}", page.offset + len(versions) < total),
    )  # fmt: skip


@router.get("/datasets")
def datasets_page(request: Request, me: Principal = require(VIEW), page: Page = Depends(paging)):
    return _list_page(request, me, page)


@router.post("/datasets")
async def upload_form(
    request: Request,
    _guard: None = Depends(_content_length_guard),
    me: Principal = require(UPLOAD),
) -> Response:
    """The upload form (on /datasets and on a dataset's page, whose form carries its name)."""
    try:
        version = await _add_upload(request, me, None)
    except (DataError, ConfigError, RequestTooLargeError) as e:
        back = request.headers.get("referer", "")
        name = _form_name(back)
        if name:
            with contextlib.suppress(LoftError):
                return await run_in_threadpool(_dataset_page, request, me, name, Page(), error=e)
        name = getattr(request.state, "upload_name", "")
        return await run_in_threadpool(_list_page, request, me, Page(), error=e, name=name)
    target = f"/datasets/{version.name}/{version.version}"
    if request.headers.get("HX-Request"):
        return Response(status_code=204, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def _form_name(referer: str) -> str:
    """The dataset whose page the form was on (``/datasets/NAME``), else ''."""
    m = re.search(r"/datasets/([^/?#]+)/?(?:[?#].*)?$", referer)
    return m.group(1) if m and catalog.NAME_RE.match(m.group(1)) else ""


@router.get("/datasets/{name}")
def dataset_page(
    request: Request, name: str, me: Principal = require(VIEW), page: Page = Depends(paging)
):
    return _dataset_page(request, me, name, page)


def _records_context(v: catalog.DatasetVersion, offset: int, limit: int) -> dict[str, Any]:
    records = catalog.read_records(v.ref, offset, limit)
    rpage = Page(limit, offset)
    return {
        "v": v,
        "records": list(enumerate(records, offset + 1)),
        "rlinks": rpage.links(f"/datasets/{v.name}/{v.version}", offset + len(records) < v.records),
    }


@router.get("/datasets/{name}/{version}")
def version_page(
    request: Request,
    name: str,
    version: int,
    me: Principal = require(VIEW),
    offset: int = 0,
    limit: int = RECORDS_PAGE,
):
    v = catalog.get_version(f"{name}:{version}")
    page = Page(max(1, min(limit, 500)), max(0, offset))
    return render(
        request, "dataset_version.html", me, report=_report_or_start(v),
        **_records_context(v, page.offset, page.limit),
    )  # fmt: skip


@router.get("/datasets/{name}/{version}/report")
def report_fragment(request: Request, name: str, version: int, me: Principal = require(VIEW)):
    """The report as an HTML fragment; the version page polls it while it is computed."""
    v = catalog.get_version(f"{name}:{version}")
    return templates.TemplateResponse(
        request, "_dataset_report.html", {"v": v, "report": _report_or_start(v)}
    )


# ------------------------------------------------------------------------------------ API


@router.get("/api/datasets")
def api_list(me: Principal = require(VIEW), page: Page = Depends(paging)) -> dict[str, Any]:
    rows, total = catalog.list_datasets(page.limit, page.offset)
    return page.body(rows, total=total)


@router.get("/api/datasets/{name}")
def api_dataset(
    name: str, me: Principal = require(VIEW), page: Page = Depends(paging)
) -> dict[str, Any]:
    """The dataset's versions, newest first."""
    versions, total = catalog.list_versions(name, page.limit, page.offset)
    return {"name": name, **page.body([v.to_dict() for v in versions], total=total)}


@router.get("/api/datasets/{name}/{version}")
def api_version(name: str, version: int, me: Principal = require(VIEW)) -> dict[str, Any]:
    v = catalog.get_version(f"{name}:{version}")
    return {**v.to_dict(), "report_ready": catalog.cached_report(v.ref) is not None}


@router.get("/api/datasets/{name}/{version}/records")
def api_records(
    name: str, version: int, me: Principal = require(VIEW), page: Page = Depends(paging)
) -> dict[str, Any]:
    v = catalog.get_version(f"{name}:{version}")
    records = catalog.read_records(v.ref, page.offset, page.limit)
    return page.body(records, total=v.records)


@router.get("/api/datasets/{name}/{version}/report")
def api_report(name: str, version: int, me: Principal = require(VIEW)) -> Response:
    """200 with the report, or 202 ``{"status": "computing"}`` while a large version's report
    is computed in the background (ask again)."""
    v = catalog.get_version(f"{name}:{version}")
    rep = _report_or_start(v)
    if rep is None:
        return JSONResponse({"status": "computing", "ref": v.ref}, status_code=202)
    return JSONResponse(rep)


UPLOAD_BODY = {  # read by _stream itself (counted as it arrives), so declared here for the schema
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


@router.post("/api/datasets/{name}", status_code=201, openapi_extra=UPLOAD_BODY)
async def api_upload(
    request: Request,
    name: str,
    _guard: None = Depends(_content_length_guard),
    me: Principal = require(UPLOAD),
) -> Response:
    """A new version of ``name`` from a multipart upload (field ``file``). 422 with every
    problem (``FILE:LINE: field: reason``) under ``error.problems`` when a record is invalid."""
    catalog.check_name(name)
    try:
        version = await _add_upload(request, me, name)
    except DataError as e:
        body = {"type": "data", "message": e.message, "hint": e.hint, "problems": e.problems}
        return JSONResponse({"error": body}, status_code=http_status_for(e))
    return JSONResponse(version.to_dict(), status_code=201)
