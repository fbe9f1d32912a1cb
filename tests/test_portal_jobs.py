"""Jobs and runs in the portal, through its HTTP interface (FastAPI's TestClient): every role
against every jobs route, the job list paged in SQL, the new-job form's validation (problems by
key path) and its planner estimate, submitting and cancelling through the same admission as
`loft jobs submit`, and the event stream that carries a run's metric points as they are
recorded and ends with the job."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loft.core import audit
from portal_client import ROLES, Portal, check_route, matrix_cases, portal_for

pytestmark = pytest.mark.unit

CHAT = [("Sky colour?", "Blue."), ("A prime?", "Seven."), ("Hi?", "Hello!")]


def _chat(path: Path) -> Path:
    with path.open("w") as f:
        for i, (q, a) in enumerate(CHAT * 4):
            msgs = [{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.fixture(scope="module")
def portal(tmp_path_factory, tiny_model) -> Portal:
    root = tmp_path_factory.mktemp("portal_jobs")
    with portal_for(root / "home") as p:
        p.data = _chat(root / "chat.jsonl")  # type: ignore[attr-defined]
        p.tiny = tiny_model  # type: ignore[attr-defined]
        yield p


def _config(portal: Portal, **training) -> dict:
    return {
        "base_model": str(portal.tiny),  # type: ignore[attr-defined]
        "data": {"train": str(portal.data), "max_seq_len": 64, "dedup": False},  # type: ignore[attr-defined]
        "lora": {"r": 2, "alpha": 4},
        "training": {"max_steps": 2, "micro_batch_size": 2, "precision": "fp32", **training},
        "register": False,
        "tracking": {"uri": "none"},
    }


def _queued(owner: str = "setup", status: str | None = None):
    """A job in the queue, inserted as the worker tests do (no admission: what a route does with
    a job, not how it got there)."""
    from loft.jobs import JobStore

    store = JobStore()
    job = store.submit("train", {"config": "/nonexistent/job.yaml", "set": []}, owner=owner)
    if status in ("RUNNING", "SUCCEEDED"):
        job = store.claim("test-worker", capacity=1 << 40, lease_s=600)
        if status == "SUCCEEDED":
            store.finish(job.id, job.fence, "SUCCEEDED", result={})
    return store.get(job.id)


# -- every role x every jobs API route ----------------------------------------------------------

# Written out, not derived from loft.portal.roles.ACTIONS, so a change to the table shows here.
#                                     admin curator annotator engineer viewer
API_MATRIX = {
    "GET /api/jobs":                  "yes   yes     no        yes      yes",
    "POST /api/jobs":                 "yes   no      no        yes      no",
    "POST /api/jobs/estimate":        "yes   no      no        yes      no",
    "GET /api/jobs/{job}":            "yes   yes     no        yes      yes",
    "POST /api/jobs/{job}/cancel":    "yes   no      no        yes      no",
    "GET /api/jobs/{job}/metrics":    "yes   yes     no        yes      yes",
    "GET /api/jobs/{job}/events":     "yes   yes     no        yes      yes",
}  # fmt: skip
# Submitting runs the planner in a child process (as `loft jobs submit` does), seconds each: the
# allowed POST /api/jobs cells are checked by test_submitting_through_the_api_..., one per role
# and way of authenticating (admin by session, engineer by token); the matrix checks the refusals.
CASES = [
    (route, role, allowed, via)
    for via in ("token", "session")
    for route, role, allowed in matrix_cases(API_MATRIX)
    if not (route == "POST /api/jobs" and allowed)
]


def _send(portal: Portal):
    def send(client: TestClient, method: str, path: str, headers: dict):
        body = {"config": _config(portal)} if method == "POST" else None
        if "{job}" in path:  # a fresh job for each call: a cancel ends its job
            status = "SUCCEEDED" if path.endswith("/events") else None
            path = path.replace("{job}", _queued(status=status).id)
        return client.request(method, path, json=body, headers=headers)

    return send


@pytest.mark.parametrize(
    ("route", "role", "allowed", "via"), CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES]
)
def test_every_role_against_every_jobs_api_route(portal, route, role, allowed, via):
    check_route(portal, route, role, allowed, via, _send(portal))


@pytest.mark.parametrize("route", list(API_MATRIX))
def test_every_jobs_api_route_without_credentials_is_401(portal, route):
    method, path = route.split(" ")
    r = portal.client().request(method, path.replace("{job}", "j0"), json={})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication"


#                          admin curator annotator engineer viewer
PAGE_MATRIX = {
    "/jobs":               "yes   yes     no        yes      yes",
    "/jobs/new":           "yes   no      no        yes      no",
    "/jobs/new/estimate":  "yes   no      no        yes      no",
    "/jobs/{job}":         "yes   yes     no        yes      yes",
}  # fmt: skip


@pytest.mark.parametrize("path", list(PAGE_MATRIX))
def test_jobs_pages_by_role(portal, path):
    job = _queued()
    for role, cell in zip(ROLES, PAGE_MATRIX[path].split(), strict=True):
        client, _ = portal.sessions[role]
        r = client.get(path.replace("{job}", job.id))
        assert r.headers["content-type"].startswith("text/html")
        assert r.status_code == (200 if cell == "yes" else 403), (role, r.text[:300])


def test_a_job_of_another_kind_has_a_page_without_curves(portal):
    from loft.jobs import JobStore, job_dir

    job = JobStore().submit("data-validate", {"args": ["chat.jsonl"]}, owner="admin")
    job_dir(job.id).mkdir(parents=True)
    (job_dir(job.id) / "log.txt").write_text("chat.jsonl: 12 records, all valid\n")
    page = portal.sessions["viewer"][0].get(f"/jobs/{job.id}")
    assert page.status_code == 200
    assert "loft data validate chat.jsonl" in page.text and 'id="chart-loss"' not in page.text
    assert "12 records, all valid" in page.text
    listed = portal.sessions["viewer"][0].get("/jobs", params={"kind": "data-validate"}).text
    assert f'id="job-{job.id}"' in listed and "chat.jsonl" in listed


def test_page_forms_that_change_state_are_refused_to_other_roles(portal):
    for role in ("curator", "annotator", "viewer"):
        client, csrf = portal.sessions[role]
        job = _queued()
        r = client.post(f"/jobs/{job.id}/cancel", data={"csrf_token": csrf})
        assert r.status_code == 403 and "may not jobs.submit" in r.text
        r = client.post("/jobs/new", data={"csrf_token": csrf, "data.train": str(portal.data)})
        assert r.status_code == 403
    from loft.jobs import JobStore

    assert JobStore().get(job.id).status == "ADMITTED"


# -- submitting ---------------------------------------------------------------------------------


def test_submitting_through_the_api_is_admitted_like_loft_jobs_submit(portal):
    client, csrf = portal.sessions["admin"]
    r = client.post(
        "/api/jobs", json={"config": _config(portal), "priority": 3},
        headers={"X-CSRF-Token": csrf},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    job = r.json()
    assert (job["kind"], job["status"], job["owner"], job["priority"]) == (
        "train", "ADMITTED", "admin", 3,
    )  # fmt: skip
    assert job["resources"]["mem_bytes"] > 0  # the planner's estimate, as the CLI records it
    config = Path(job["spec"]["config"])
    assert config.parent == portal.home / "jobs" / "configs"
    import yaml

    assert yaml.safe_load(config.read_text()) == _config(portal)
    entry = audit.read(1, 0, action="job.submit")[0]
    assert (entry["actor"], entry["target"], entry["details"]["via"]) == (
        "admin", job["id"], "session",
    )  # fmt: skip
    r = portal.client().post(
        "/api/jobs", json={"config": _config(portal)}, headers=portal.bearer("engineer")
    )
    assert r.status_code == 201 and r.json()["owner"] == "engineer"


def test_a_bad_config_is_refused_with_every_problem_by_key_path(portal):
    bad = _config(portal, lr=-1)
    bad["lora"]["r"] = 0
    bad["data"]["trian"] = "x"
    r = portal.client().post("/api/jobs", json={"config": bad}, headers=portal.bearer("engineer"))
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "config"
    assert "3 problems" in err["message"]
    for key in ("training.lr: got -1", "lora.r: got 0", "data.trian: unknown key; did you mean"):
        assert key in err["message"], err["message"]
    missing = _config(portal)
    missing["data"]["train"] = "/no/such/file.jsonl"
    r = portal.client().post(
        "/api/jobs", json={"config": missing}, headers=portal.bearer("engineer")
    )
    assert r.status_code == 400
    assert "data.train: no file /no/such/file.jsonl" in r.json()["error"]["message"]
    r = portal.client().post(
        "/api/jobs", json={"config": _config(portal), "dataset": "nope:1"},
        headers=portal.bearer("engineer"),
    )  # fmt: skip
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    r = portal.client().post(
        "/api/jobs", json={"config": {}, "extra": 1}, headers=portal.bearer("engineer")
    )
    assert r.status_code == 422


def test_the_form_shows_each_problem_beside_its_field(portal):
    client, csrf = portal.sessions["engineer"]
    page = client.get("/jobs/new").text
    for key in ("base_model", "data.train", "lora.r", "lora.alpha", "training.lr",
                "training.max_steps", "training.eval_every"):  # fmt: skip
        assert f'name="{key}"' in page, key
    assert 'name="dataset"' in page and 'name="plan_for"' in page
    assert 'value="0.0002"' in page  # training.lr's default, from the schema
    r = client.post(
        "/jobs/new",
        data={"csrf_token": csrf, "data.train": "", "training.lr": "-1", "lora.r": "zero",
              "data.max_seq_len": "8", "base_model": "smollm2-135m-instruct"},
    )  # fmt: skip
    assert r.status_code == 400
    for key in ("training.lr", "lora.r", "data.max_seq_len", "data.train"):
        assert f'id="error-{key}"' in r.text, key
    assert "Input should be greater than 0" in r.text
    assert 'value="-1"' in r.text  # what was typed stays in the form
    assert "nothing was submitted" in r.text
    r = client.post("/jobs/new", data={"csrf_token": csrf, "dataset": "nope:2"})
    assert r.status_code == 400 and 'id="error-dataset"' in r.text


def test_the_estimate_fragment_is_the_planners_estimate(portal):
    from loft.jobs import submit

    client, _ = portal.sessions["engineer"]
    fields = {"base_model": str(portal.tiny), "data.max_seq_len": "64",  # type: ignore[attr-defined]
              "training.micro_batch_size": "2", "lora.r": "2", "plan_for": "cpu"}  # fmt: skip
    r = client.get("/jobs/new/estimate", params=fields)
    assert r.status_code == 200
    cfg = submit.validate(
        {"base_model": str(portal.tiny), "data": {"train": "x", "max_seq_len": 64},  # type: ignore[attr-defined]
         "training": {"micro_batch_size": 2}, "lora": {"r": 2}}, check_files=False,
    )  # fmt: skip
    want = submit.estimate(cfg, "cpu", capacity=1 << 40)["total_bytes"]
    shown = re.search(r'id="estimate-total">([\d.]+) GiB', r.text)
    assert shown and float(shown.group(1)) == round(want / 2**30, 2)
    assert "fits" in r.text
    gpu = client.get(
        "/jobs/new/estimate",
        params={**fields, "base_model": "llama-3.1-8b", "plan_for": "a100-80",
                "training.max_steps": "1000", "data.max_seq_len": "2048"},
    )  # fmt: skip
    assert 'id="estimate-time"' in gpu.text and "a100-80" in gpu.text
    bigger = submit.estimate(
        submit.validate({"base_model": "llama-3.1-8b", "data": {"train": "x"}}, check_files=False),
        "a100-80",
    )
    assert bigger["fit"]["device"] == "a100-80"
    bad = client.get("/jobs/new/estimate", params={**fields, "lora.r": "-3"})
    assert "lora.r" in bad.text and "needs a valid config" in bad.text
    api = portal.client().post(
        "/api/jobs/estimate", json={"config": {"base_model": "llama-3.1-8b"}, "target": "l4"},
        headers=portal.bearer("admin"),
    )  # fmt: skip
    assert api.status_code == 200, api.text
    assert api.json()["fit"]["device"] == "l4" and api.json()["total_bytes"] > 16 * 2**30


# -- the list, a job, cancelling ----------------------------------------------------------------


def test_the_list_pages_and_filters_in_sql(portal, tmp_path):
    from loft.jobs import JobStore
    from loft.jobs.store import NewJob

    owner = f"bulk{uuid.uuid4().hex[:6]}"
    for _ in range(7):
        _queued(owner=owner)
    r = portal.client().get(
        "/api/jobs", params={"owner": owner, "limit": 5, "offset": 5},
        headers=portal.bearer("viewer"),
    )  # fmt: skip
    body = r.json()
    assert (body["total"], len(body["items"]), body["has_more"]) == (7, 2, False)
    ids = [j["id"] for j in body["items"]]
    assert ids == sorted(ids, reverse=True)  # newest first
    page = portal.sessions["viewer"][0].get("/jobs", params={"owner": owner, "limit": 5}).text
    assert page.count('<tr id="job-') == 5 and "next →" in page
    assert "New training job" not in page  # a viewer may not submit
    assert (
        portal.client()
        .get("/api/jobs", params={"status": "bogus"}, headers=portal.bearer("viewer"))
        .status_code
        == 400
    )

    big = JobStore(tmp_path / "jobs.db")  # 10,000 jobs: a page costs the same at any offset
    with big.transaction() as c:
        for i in range(10_000):
            big.insert(c, NewJob("eval", {"args": [str(i)]}, owner=f"u{i % 7}",
                                 id=f"j{i:011x}0000"))  # fmt: skip
    t0 = time.perf_counter()
    jobs, total = big.page(limit=50, offset=9_960)
    first, _ = big.page(limit=50, offset=0, owner="u3")
    elapsed = time.perf_counter() - t0
    assert total == 10_000 and len(jobs) == 40 and jobs[-1].spec == {"args": ["0"]}
    assert first[0].spec == {"args": ["9999"]} or first[0].owner == "u3"
    assert elapsed < 0.5, elapsed


def test_cancel_ends_a_queued_job_and_refuses_a_finished_one(portal):
    client, csrf = portal.sessions["engineer"]
    job = _queued()
    r = client.post(f"/jobs/{job.id}/cancel", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/jobs/{job.id}"
    shown = client.get(f"/api/jobs/{job.id}").json()
    assert shown["status"] == "CANCELLED" and shown["history"][-1]["event"] == "cancel requested"
    entry = audit.read(1, 0, action="job.cancel")[0]
    assert (entry["actor"], entry["target"]) == ("engineer", job.id)
    again = portal.client().post(f"/api/jobs/{job.id}/cancel", headers=portal.bearer("admin"))
    assert again.status_code == 400 and "CANCELLED" in again.json()["error"]["message"]
    running = _queued(status="RUNNING")
    r = portal.client().post(f"/api/jobs/{running.id}/cancel", headers=portal.bearer("admin"))
    assert r.json()["status"] == "RUNNING"  # its worker stops it at the next heartbeat
    from loft.jobs import JobStore

    assert JobStore().heartbeat(running.id, running.fence, 60) == (True, True)
    assert portal.client().get("/api/jobs/jnope", headers=portal.bearer("admin")).status_code == 404


# -- a run's curves, live -----------------------------------------------------------------------


def _events(lines, until: str):
    """(event, data) pairs read from a streaming response's lines, up to and including
    ``until``."""
    name = None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            yield name, json.loads(line[len("data: ") :])
            if name == until:
                return


def test_the_event_stream_sends_new_points_as_they_are_recorded_and_ends_with_the_job(portal):
    from loft.core.specs import TrackingSpec
    from loft.jobs import JobStore, job_dir
    from loft.portal.views import jobs as jobs_view
    from loft.tracking import open_tracker

    store = JobStore()
    job = _queued(status="RUNNING")
    run = job_dir(job.id) / "run"
    run.mkdir(parents=True)
    tracker = open_tracker(TrackingSpec(experiment="portal-tests"), run_name="live")
    (run / "run_summary.json").write_text(
        json.dumps({"run_id": "live", "status": "running", "mlflow_run_id": tracker.run_id})
    )
    (job_dir(job.id) / "log.txt").write_text("=== attempt 1\nstep 1/5  loss 2.0\n")
    for step in (1, 2, 3):
        tracker.log_metrics({"train/loss": 3.0 - step / 10, "train/lr": 1e-3}, step=step)
    tracker.log_metrics({"eval/loss": 2.9}, step=3)
    tracker.flush()

    client = portal.sessions["viewer"][0]
    with client.stream("GET", f"/api/jobs/{job.id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        seen = dict(_events(lines, until="log"))
        assert seen["status"]["status"] == "RUNNING"
        assert seen["metrics"]["points"]["train/loss"] == [[1, 2.9], [2, 2.8], [3, 2.7]]
        assert seen["metrics"]["points"]["eval/loss"] == [[3, 2.9]]
        assert "step 1/5" in seen["log"]["text"]
        for step in (4, 5):  # the run goes on: only these reach the page next
            tracker.log_metrics({"train/loss": 3.0 - step / 10}, step=step)
        tracker.flush()
        with (job_dir(job.id) / "log.txt").open("a") as f:
            f.write("step 5/5  loss 2.5\n")
        tracker.finish()
        assert store.finish(job.id, job.fence, "SUCCEEDED", result={"steps": 5})
        rest = list(_events(lines, until="end"))
    names = [n for n, _ in rest]
    assert names[-1] == "end" and rest[-1][1] == {"status": "SUCCEEDED"}
    new = [d["points"] for n, d in rest if n == "metrics"]
    assert [p for pts in new for p in pts.get("train/loss", [])] == [[4, 2.6], [5, 2.5]]
    assert "eval/loss" not in {k for pts in new for k in pts}  # nothing sent twice
    assert any(n == "log" and "step 5/5" in d["text"] for n, d in rest)
    assert any(n == "status" and d["status"] == "SUCCEEDED" for n, d in rest)

    metrics = client.get(f"/api/jobs/{job.id}/metrics").json()["metrics"]
    assert [p[0] for p in metrics["train/loss"]] == [1, 2, 3, 4, 5]
    page = client.get(f"/jobs/{job.id}").text
    assert 'id="chart-loss" data-keys="train/loss,eval/loss"' in page
    assert '<script src="/static/vendor/uPlot.iife.min.js"' in page
    assert client.get("/static/jobs.js").status_code == 200
    assert jobs_view.live_streams["open"] == 0


def test_a_client_that_goes_away_ends_its_stream(portal):
    from loft.portal.views import jobs as jobs_view

    job = _queued(status="RUNNING")
    client = portal.sessions["engineer"][0]
    with client.stream("GET", f"/api/jobs/{job.id}/events") as r:
        lines = r.iter_lines()
        first = next(_events(lines, until="status"))
        assert first[0] == "status" and jobs_view.live_streams["open"] == 1
        time.sleep(1.5)  # the stream polls on while the client listens
        assert jobs_view.live_streams["open"] == 1
    deadline = time.monotonic() + 10
    while jobs_view.live_streams["open"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert jobs_view.live_streams["open"] == 0


def test_the_tracking_flush_interval_is_a_setting(monkeypatch):
    """How often a run's metrics reach the store, so how often the live curves can move."""
    from loft.core.errors import ConfigError
    from loft.tracking.mlflow_tracker import DEFAULT_FLUSH_S, flush_interval

    monkeypatch.delenv("LOFT_TRACKING_FLUSH_S", raising=False)
    assert flush_interval() == DEFAULT_FLUSH_S == 5.0
    monkeypatch.setenv("LOFT_TRACKING_FLUSH_S", "0.5")
    assert flush_interval() == 0.5
    for bad in ("0", "soon", "7200"):
        monkeypatch.setenv("LOFT_TRACKING_FLUSH_S", bad)
        with pytest.raises(ConfigError, match="tracking.flush_s"):
            flush_interval()
