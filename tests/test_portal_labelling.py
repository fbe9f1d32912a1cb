"""Labelling through the portal's HTTP interface (in-process): every role against every
labelling API route and page, 401 without credentials, and an annotator refused the records
and projects that are not assigned to them."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from portal_client import Portal, check_route, matrix_cases, portal_for
from test_curate import chat_server

pytestmark = pytest.mark.unit

PAIRS = [
    {"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
    for i in range(3)
]
QUESTIONS = [{"name": "better", "kind": "pairwise", "text": "Which is better?"}]
LABELLERS = ["admin", "curator", "annotator"]  # the roles that may label


@pytest.fixture(scope="module")
def portal(tmp_path_factory) -> Portal:
    """'p': every record to all three labelling roles; 'done': fully labelled (exports work);
    'split': record 0 to the annotator, record 1 to the curator; 'others': not the annotator's;
    'fixes': a correction question, with a model server (tests/test_curate.py's stand-in) for
    suggestions; and a serving audit log to import."""
    from loft.curate.served import default_log
    from loft.curate.store import LabellingStore
    from loft.data import catalog
    from loft.serve.audit import AuditLog

    with portal_for(tmp_path_factory.mktemp("labelling_home")) as p, chat_server() as (url, _):
        catalog.add_version("pairs", PAIRS, source={"kind": "upload", "filename": "p.jsonl"})
        store = LabellingStore(p.store.path)
        store.create_project("p", "pairs", QUESTIONS, LABELLERS, overlap=3, actor="setup")
        store.create_project("done", "pairs", QUESTIONS, ["curator"], actor="setup")
        for record in range(3):
            store.save("done", record, "curator", {"better": 0}, submit=True, actor="setup")
        store.create_project("split", "pairs:1", QUESTIONS, ["annotator", "curator"], actor="s")
        store.create_project("others", "pairs", QUESTIONS, ["curator"], actor="setup")
        store.create_project("fixes", "pairs", [{"name": "fix", "kind": "correction"}],
                             ["curator"], actor="setup")  # fmt: skip
        AuditLog(default_log(), log_prompts=True).write(
            request_id="r1", key="k", endpoint="/v1/chat/completions", resolved="bot:1",
            status=200, n=1, completion="Restart it.", messages=[{"role": "user", "content": "x"}],
        )  # fmt: skip
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LOFT_SERVE_URL", url)
            yield p


# Written out, not derived from loft.portal.roles.ACTIONS, so a change to the table shows here.
#                                                   admin curator annotator engineer viewer
API_MATRIX = {
    "GET /api/labelling/projects":                  "yes   yes     yes       no       no",
    "POST /api/labelling/projects":                 "yes   yes     no        no       no",
    "POST /api/labelling/served":                   "yes   yes     no        no       no",
    "GET /api/labelling/projects/p":                "yes   yes     yes       no       no",
    "GET /api/labelling/projects/p/tasks":          "yes   yes     yes       no       no",
    "GET /api/labelling/projects/p/next":           "yes   yes     yes       no       no",
    "GET /api/labelling/projects/p/records/0":      "yes   yes     yes       no       no",
    "PUT /api/labelling/projects/p/records/0":      "yes   yes     yes       no       no",
    "POST /api/labelling/projects/p/records/1/discard": "yes yes   yes       no       no",
    "GET /api/labelling/projects/p/agreement":      "yes   yes     no        no       no",
    "GET /api/labelling/projects/p/conflicts":      "yes   yes     no        no       no",
    "PUT /api/labelling/projects/p/records/2/review": "yes yes     no        no       no",
    "POST /api/labelling/projects/fixes/suggestions": "yes yes   no        no       no",
    "GET /api/labelling/projects/done/exports":     "yes   yes     no        no       no",
    "POST /api/labelling/projects/done/exports":    "yes   yes     no        no       no",
}  # fmt: skip
PAGE_MATRIX = {
    "GET /labelling":                               "yes   yes     yes       no       no",
    "GET /labelling/p":                             "yes   yes     yes       no       no",
    "GET /labelling/p/next":                        "yes   yes     yes       no       no",
    "GET /labelling/p/records/0":                   "yes   yes     yes       no       no",
    "GET /labelling/p/review":                      "yes   yes     no        no       no",
}  # fmt: skip
CASES = matrix_cases(API_MATRIX)
PAGE_CASES = matrix_cases(PAGE_MATRIX)


def _send(client: TestClient, method: str, path: str, headers: dict):
    body = None
    if path == "/api/labelling/projects" and method == "POST":
        body = {"name": f"n-{uuid.uuid4().hex[:8]}", "dataset": "pairs", "questions": QUESTIONS,
                "annotators": ["curator"]}  # fmt: skip
    elif path == "/api/labelling/served":
        body = {"dataset": "served"}
    elif path.endswith("/review"):
        body = {"answers": {"better": 1}}
    elif method == "PUT":
        body = {"answers": {"better": 0}}
    elif path.endswith("/suggestions"):
        body = {"model": "bot:1", "limit": 1}
    elif path.endswith("/exports") and method == "POST":
        body = {"shape": "preference"}
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize("via", ["token", "session"])
@pytest.mark.parametrize(("route", "role", "allowed"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_role_against_every_labelling_api_route(portal, route, role, allowed, via):
    check_route(portal, route, role, allowed, via, _send)


@pytest.mark.parametrize(
    ("route", "role", "allowed"), PAGE_CASES, ids=[f"{c[0]}-{c[1]}" for c in PAGE_CASES]
)
def test_every_role_against_every_labelling_page(portal, route, role, allowed):
    client, _ = portal.sessions[role]
    r = client.get(route.split(" ", 1)[1])
    assert r.status_code == (200 if allowed else 403), (route, role, r.status_code)
    if not allowed:
        assert "Not allowed" in r.text


@pytest.mark.parametrize("route", list(API_MATRIX))
def test_every_labelling_api_route_needs_credentials(portal, route):
    method, path = route.split(" ", 1)
    r = portal.client().request(method, path, json={})
    assert r.status_code == 401, (route, r.status_code)
    assert r.json()["error"]["type"] == "authentication"


def test_an_annotator_is_refused_what_is_not_assigned_to_them(portal):
    client, headers = portal.as_role("annotator")
    names = [
        p["name"] for p in client.get("/api/labelling/projects", headers=headers).json()["items"]
    ]
    assert set(names) == {"p", "split"}  # not 'done' or 'others'
    assert client.get("/api/labelling/projects/others", headers=headers).status_code == 403
    assert client.get("/api/labelling/projects/split/records/0", headers=headers).status_code == 200
    for method, path, body in [
        ("GET", "/api/labelling/projects/split/records/1", None),
        ("PUT", "/api/labelling/projects/split/records/1", {"answers": {"better": 0}}),
        ("POST", "/api/labelling/projects/split/records/1/discard", None),
    ]:
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == 403, (method, path, r.text)
        assert "not assigned to annotator" in r.json()["error"]["message"]
    page, _ = portal.sessions["annotator"]
    assert page.get("/labelling/split/records/1").status_code == 403
    assert "others" not in page.get("/labelling").text
    # a curator reviews: reads any record, read only
    curator, ch = portal.as_role("curator")
    r = curator.get("/api/labelling/projects/split/records/0", headers=ch)
    assert r.status_code == 200 and r.json()["task"] is None


def test_answers_are_checked_and_an_export_is_a_dataset_version(portal):
    from loft.data import catalog

    client, headers = portal.as_role("admin")
    r = client.put("/api/labelling/projects/p/records/0", json={"answers": {"better": 7},
                   "submit": True}, headers=headers)  # fmt: skip
    assert r.status_code == 400 and "response index from 0 to 1" in r.json()["error"]["message"]
    r = client.post("/api/labelling/projects/done/exports", json={"shape": "preference",
                    "dataset": "done-prefs"}, headers=headers)  # fmt: skip
    assert r.status_code == 201, r.text
    version = catalog.get_version(r.json()["ref"])
    assert version.parents == ("pairs:1",) and version.source["project"] == "done"
    assert version.records == 3 and version.layout == "preference"


def test_a_model_suggestion_is_prefilled_and_marked_on_the_labelling_page(portal):
    client, headers = portal.as_role("curator")
    new = {"name": "fixes-2", "dataset": "pairs", "annotators": ["curator"],
           "questions": [{"name": "fix", "kind": "correction"}]}  # fmt: skip
    assert client.post("/api/labelling/projects", json=new, headers=headers).status_code == 201
    r = client.post("/api/labelling/projects/fixes-2/suggestions",
                    json={"model": "bot:7", "limit": 3}, headers=headers)  # fmt: skip
    assert r.json() == {"model": "bot:7", "suggested": [0, 1, 2], "left": 0}
    page, _ = portal.sessions["curator"]
    html = page.get("/labelling/fixes-2/records/2").text
    assert "suggestion: model bot:7" in html
    assert ">model says: question 2?</textarea>" in html
