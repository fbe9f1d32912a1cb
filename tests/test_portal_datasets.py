"""The portal's datasets pages and /api/datasets, in-process: every role against every route,
401 without credentials, uploads that fail validation (FILE:LINE, nothing stored), the size
limit (413, nothing kept), pagination, the report (computed once; in the background when large)
and the audit trail."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from loft.core import audit
from loft.data import catalog
from loft.portal.views import datasets as views
from portal_client import Portal, check_route, matrix_cases, portal_for

pytestmark = pytest.mark.unit


def chat(i: int, who: str = "user") -> dict:
    return {
        "messages": [
            {"role": who, "content": f"what is {i} plus {i}? write to me at ann{i}@example.com"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
        ]
    }


GOOD = "\n".join(json.dumps(chat(i)) for i in range(5)) + "\n"
BAD = GOOD + json.dumps(chat(5, who="robot")) + "\n" + "{not json\n"  # lines 6 and 7


@pytest.fixture(scope="module")
def portal(tmp_path_factory) -> Portal:
    """One portal for the module with 'seed' (two versions, 3 and 30 records) in its catalog."""
    with portal_for(tmp_path_factory.mktemp("portal_home")) as p:
        src = {"kind": "upload", "filename": "seed.jsonl"}
        catalog.add_version("seed", [chat(i) for i in range(3)], source=src, created_by="admin")
        catalog.add_version("seed", [chat(i) for i in range(30)], source=src, parents=["seed:1"])
        yield p


def upload(client: TestClient, path: str, text: str, headers: dict, filename: str = "mine.jsonl"):
    return client.post(path, files={"file": (filename, text.encode())}, headers=headers)


# -- every role x every route ------------------------------------------------------------------

# Written out, not derived from loft.portal.roles.ACTIONS, so a change to the table shows here.
#                                            admin curator annotator engineer viewer
API_MATRIX = {
    "GET /api/datasets":                     "yes   yes     no        yes      yes",
    "GET /api/datasets/seed":                "yes   yes     no        yes      yes",
    "GET /api/datasets/seed/2":              "yes   yes     no        yes      yes",
    "GET /api/datasets/seed/2/records":      "yes   yes     no        yes      yes",
    "GET /api/datasets/seed/2/report":       "yes   yes     no        yes      yes",
    "POST /api/datasets/{new}":              "yes   yes     no        no       no",
}  # fmt: skip
PAGE_MATRIX = {
    "GET /datasets":                         "yes   yes     no        yes      yes",
    "GET /datasets/seed":                    "yes   yes     no        yes      yes",
    "GET /datasets/seed/2":                  "yes   yes     no        yes      yes",
    "GET /datasets/seed/2/report":           "yes   yes     no        yes      yes",
    "POST /datasets":                        "yes   yes     no        no       no",
}  # fmt: skip
CASES = matrix_cases(API_MATRIX)
PAGE_CASES = matrix_cases(PAGE_MATRIX)


def _send(client: TestClient, method: str, path: str, headers: dict):
    if method == "POST":
        name = f"m-{uuid.uuid4().hex[:8]}"
        path = path.replace("{new}", name)
        files = {"file": ("m.jsonl", GOOD.encode())}
        data = {"name": name} if path == "/datasets" else None
        return client.post(path, files=files, data=data, headers=headers, follow_redirects=False)
    return client.request(method, path, headers=headers)


@pytest.mark.parametrize("via", ["token", "session"])
@pytest.mark.parametrize(("route", "role", "allowed"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_role_against_every_api_route(portal, route, role, allowed, via):
    r = check_route(portal, route, role, allowed, via, _send)
    if allowed and route.startswith("POST"):
        assert r.status_code == 201 and r.json()["created_by"] == role


@pytest.mark.parametrize(
    ("route", "role", "allowed"), PAGE_CASES, ids=[f"{c[0]}-{c[1]}" for c in PAGE_CASES]
)
def test_every_role_against_every_page(portal, route, role, allowed):
    client, headers = portal.as_role(role, "session")
    r = _send(client, *route.split(" ", 1), headers)
    if allowed:
        assert r.status_code in (200, 303), (route, role, r.status_code, r.text[:300])
    else:
        assert r.status_code == 403 and f"{role} ({role}) may not" in r.text


@pytest.mark.parametrize("route", [*API_MATRIX, *PAGE_MATRIX])
def test_without_credentials(portal, route):
    method, path = route.split(" ", 1)
    r = portal.client().request(method, path.replace("{new}", "x"), follow_redirects=False)
    if path.startswith("/api/"):
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication"
    else:
        assert r.status_code == 303 and r.headers["location"].startswith("/login")


def test_a_session_upload_needs_the_csrf_token(portal):
    client, _ = portal.as_role("curator", "session")
    r = upload(client, "/api/datasets/nocsrf", GOOD, {})
    assert r.status_code == 403 and "CSRF" in r.json()["error"]["message"]
    with pytest.raises(Exception, match="no dataset named 'nocsrf'"):
        catalog.get_version("nocsrf")


# -- uploads -----------------------------------------------------------------------------------


def test_a_bad_record_is_refused_with_the_files_name_and_line(portal):
    client, headers = portal.as_role("curator")
    r = upload(client, "/api/datasets/chats", BAD, headers, filename="support chats.jsonl")
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["type"] == "data"
    assert err["problems"] == [
        "support chats.jsonl:6: messages[0].role: unknown role 'robot' (allowed: system, user, "
        "assistant)",
        "support chats.jsonl:7: record: invalid JSON: Expecting property name enclosed in double "
        "quotes (column 2)",
    ]
    assert ".upload-" not in err["message"]
    assert client.get("/api/datasets/chats", headers=headers).status_code == 404
    assert not list(catalog.catalog_dir().glob(".upload-*"))


def test_the_form_shows_problems_inline_and_a_good_upload_goes_to_its_version(portal):
    client, headers = portal.as_role("curator", "session")
    form = {"name": "formed"}
    r = client.post("/datasets", files={"file": ("faq.jsonl", BAD)}, data=form, headers=headers)
    assert r.status_code == 422
    assert "<code>faq.jsonl:6: messages[0].role: unknown role &#39;robot&#39;" in r.text
    assert "faq.jsonl:7: record: invalid JSON" in r.text and "Nothing was stored" in r.text
    # a plain form post (no JavaScript): the CSRF token in the form, not in a header
    r = client.post(
        "/datasets",
        files={"file": ("faq.jsonl", GOOD)},
        data={**form, "csrf_token": headers["X-CSRF-Token"]},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/datasets/formed/1"
    page = client.get("/datasets/formed/1").text
    assert "upload of <code>faq.jsonl</code>" in page
    assert catalog.get_version("formed").sha256 in page  # the report's fingerprint
    assert "5 findings in 5 records" in page and "data.jsonl:1" in page  # PII
    # htmx (hx-boost) gets HX-Redirect instead of a 303
    r = client.post(
        "/datasets",
        files={"file": ("faq.jsonl", GOOD)},
        data=form,
        headers={**headers, "HX-Request": "true"},
    )
    assert r.status_code == 204 and r.headers["HX-Redirect"] == "/datasets/formed/2"
    entry = audit.read(1, action="dataset.version")[0]
    assert (entry["actor"], entry["target"]) == ("curator", "formed:2")
    assert entry["details"]["via"] == "session" and entry["details"]["records"] == 5
    source = {"kind": "upload", "filename": "faq.jsonl", "bytes": len(GOOD)}
    assert entry["details"]["source"] == source


@pytest.mark.parametrize(
    ("filename", "text", "name", "status", "message"),
    [
        ("a.txt", GOOD, "x1", 422, "a.txt: unsupported file type '.txt'"),
        ("a.jsonl", "", "x2", 422, "no file was uploaded (or it is empty)"),
        ("a.jsonl", "\n\n", "x3", 422, "a.jsonl: file: empty, no records found"),
        ("a.jsonl", GOOD, "a..b", 400, "invalid dataset name 'a..b'"),
        ("a.jsonl", GOOD, "-bad", 400, "invalid dataset name '-bad'"),
    ],
)
def test_upload_errors(portal, filename, text, name, status, message):
    client, headers = portal.as_role("admin")
    r = upload(client, f"/api/datasets/{name}", text, headers, filename=filename)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert not list(catalog.catalog_dir().glob(".upload-*"))


def test_an_upload_that_is_not_multipart_is_refused(portal):
    client, headers = portal.as_role("admin")
    r = client.post("/api/datasets/raw", content=GOOD.encode(), headers=headers)
    assert r.status_code == 422 and "multipart/form-data" in r.json()["error"]["message"]


def test_the_size_limit_refuses_with_413_and_keeps_nothing(portal, monkeypatch):
    monkeypatch.setenv("LOFT_PORTAL_MAX_UPLOAD_MB", "0.01")  # 10,485 bytes
    big = GOOD * 40  # ~12 kB
    client, headers = portal.as_role("curator")
    r = upload(client, "/api/datasets/big", big, headers)
    assert r.status_code == 413
    assert "larger than the portal's limit of 0.01 MB; nothing was kept" in r.text
    # streamed past the limit without a Content-Length to refuse it up front
    body, ctype = _multipart("big.jsonl", big)
    r = client.post(
        "/api/datasets/big",
        content=iter([body[i : i + 4096] for i in range(0, len(body), 4096)]),
        headers={**headers, "Content-Type": ctype},
    )
    assert r.status_code == 413
    # the form, through the session without the CSRF header (parsed whole, then counted)
    sclient, sheaders = portal.as_role("curator", "session")
    r = sclient.post(
        "/datasets",
        files={"file": ("big.jsonl", big)},
        data={"name": "big", "csrf_token": sheaders["X-CSRF-Token"]},
    )
    assert r.status_code == 413 and "limit of 0.01 MB" in r.text
    # announced as far too large: refused before anything reads it, credentials included
    r = upload(portal.client(), "/api/datasets/big", GOOD * 400, {})
    assert r.status_code == 413
    r = sclient.post(
        "/datasets",
        files={"file": ("big.jsonl", big)},
        data={"name": "big"},
        headers=sheaders,
    )
    assert r.status_code == 413 and "limit of 0.01 MB" in r.text
    assert client.get("/api/datasets/big", headers=headers).status_code == 404
    assert not list(catalog.catalog_dir().glob(".upload-*"))
    monkeypatch.setenv("LOFT_PORTAL_MAX_UPLOAD_MB", "lots")
    r = upload(client, "/api/datasets/big", GOOD, headers)
    assert r.status_code == 400 and "portal.max_upload_mb" in r.json()["error"]["message"]


def _multipart(filename: str, text: str) -> tuple[bytes, str]:
    boundary = "loftboundary" + uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n{text}\r\n--{boundary}--\r\n"
    ).encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_a_streamed_upload_without_content_length_is_stored(portal):
    client, headers = portal.as_role("curator")
    body, ctype = _multipart("streamed.jsonl", GOOD)
    r = client.post(
        "/api/datasets/streamed",
        content=iter([body[i : i + 100] for i in range(0, len(body), 100)]),
        headers={**headers, "Content-Type": ctype},
    )
    assert r.status_code == 201, r.text
    assert r.json()["records"] == 5 and r.json()["source"]["filename"] == "streamed.jsonl"


# -- reading ------------------------------------------------------------------------------------


def test_lists_and_records_paginate(portal):
    client, headers = portal.as_role("viewer")
    for i in range(3):
        catalog.add_version(f"page-{i}", [chat(i)], source={"kind": "upload", "filename": "p"})
    body = client.get("/api/datasets?limit=2&offset=1", headers=headers).json()
    assert body["limit"] == 2 and body["offset"] == 1 and len(body["items"]) == 2
    everything = client.get("/api/datasets?limit=500", headers=headers).json()
    assert body["items"] == everything["items"][1:3] and body["total"] == everything["total"]
    body = client.get("/api/datasets/seed?limit=1", headers=headers).json()
    assert [v["ref"] for v in body["items"]] == ["seed:2"] and body["total"] == 2
    assert body["has_more"] is True and body["items"][0]["parents"] == ["seed:1"]
    body = client.get("/api/datasets/seed/2/records?offset=25&limit=10", headers=headers).json()
    assert body["total"] == 30 and len(body["items"]) == 5 and body["has_more"] is False
    assert body["items"][0] == chat(25) | {"messages": body["items"][0]["messages"]}
    assert body["items"][0]["messages"][1]["content"] == "25 plus 25 is 50."
    assert client.get("/api/datasets/seed/2/records?limit=501", headers=headers).status_code == 422
    assert client.get("/api/datasets/seed/9", headers=headers).status_code == 404
    assert client.get("/api/datasets/nope", headers=headers).status_code == 404
    sclient, _ = portal.as_role("viewer", "session")
    page = sclient.get("/datasets?limit=1&offset=1").text
    assert "/datasets?limit=1&amp;offset=2" in page and "/datasets?limit=1&amp;offset=0" in page
    page = sclient.get("/datasets/seed/2?offset=20&limit=5").text
    assert "data.jsonl:21" in page and "data.jsonl:25" in page and "data.jsonl:26" not in page
    assert "offset=25" in page and "offset=15" in page
    assert 'action="/datasets"' not in page  # a viewer gets no upload form
    assert 'enctype="multipart/form-data"' not in sclient.get("/datasets").text


def test_version_details_and_report(portal):
    client, headers = portal.as_role("engineer")
    v = client.get("/api/datasets/seed/1", headers=headers).json()
    assert v["ref"] == "seed:1" and v["records"] == 3 and v["created_by"] == "admin"
    rep = client.get("/api/datasets/seed/1/report", headers=headers).json()
    assert rep["fingerprint"]["sha256"] == v["sha256"]
    assert rep["stats"]["records"] == 3 and rep["pii"]["kinds"]["email"]["count"] == 3
    assert client.get("/api/datasets/seed/1", headers=headers).json()["report_ready"] is True


def test_a_large_versions_report_is_computed_in_the_background(portal, monkeypatch):
    monkeypatch.setattr(views, "SYNC_REPORT_RECORDS", 0)
    v = catalog.add_version("slow", [chat(i) for i in range(4)], source={"kind": "derived"})
    client, headers = portal.as_role("viewer")
    sclient, _ = portal.as_role("viewer", "session")
    started = []
    real = catalog.report

    def slow_report(ref: str) -> dict:
        started.append(ref)
        time.sleep(0.3)
        return real(ref)

    monkeypatch.setattr(catalog, "report", slow_report)
    r = client.get("/api/datasets/slow/1/report", headers=headers)
    assert r.status_code == 202 and r.json() == {"status": "computing", "ref": "slow:1"}
    assert 'hx-trigger="every 2s"' in sclient.get("/datasets/slow/1").text
    deadline = time.monotonic() + 20
    while (r := client.get("/api/datasets/slow/1/report", headers=headers)).status_code == 202:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert r.status_code == 200 and r.json()["fingerprint"]["sha256"] == v.sha256
    assert started == ["slow:1"]  # once, however often it was asked for
    fragment = sclient.get("/datasets/slow/1/report").text
    assert "every 2s" not in fragment and v.sha256 in fragment
