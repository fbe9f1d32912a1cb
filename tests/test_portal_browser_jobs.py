"""Jobs in a real browser: an engineer fills the new-job form (the planner's estimate updates as
fields change), submits a tiny training job, a real `loft worker` runs it, and the job's page
plots its loss curve live from the event stream, gaining points while the job runs, to the end;
a viewer sees the queue but the server refuses a submit (HTTP 403)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest

from browser import api, shot, sign_in

pytestmark = pytest.mark.integration

STEPS, EVAL_EVERY = 400, 40  # a few seconds of tiny steps: the page polls once a second
DONE: dict[str, str] = {}  # the job the engineer submitted, for the viewer's test


@pytest.fixture(scope="module", autouse=True)
def accounts(live_portal):
    for name, role in [("eng", "engineer"), ("vic", "viewer")]:
        live_portal.add_user(name, role)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    path = tmp_path_factory.mktemp("jobs_data") / "chat.jsonl"
    rows = [("Sky colour?", "Blue."), ("A prime?", "Seven."), ("Hi?", "Hello!")]
    with path.open("w") as f:
        for i, (q, a) in enumerate(rows * 12):
            msgs = [{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


@contextlib.contextmanager
def worker(home):
    """A real `loft worker` over the portal's LOFT_HOME, in its own process group; metrics are
    flushed to the tracking store every half second so the curve moves often."""
    from helpers import start_loft

    log = (home / "worker.log").open("w")
    proc = start_loft(
        "worker", "--poll", "0.2", "--lease", "6", home=home,
        env={"LOFT_TRACKING_FLUSH_S": "0.2"}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _points(page) -> int:  # type: ignore[no-untyped-def]
    return int(page.locator("#chart-loss").get_attribute("data-points") or 0)


def test_an_engineer_submits_a_job_and_watches_its_curve_grow(live_portal, page, tiny_model, chat):
    problems: list[str] = []  # what the browser's console says went wrong (CSP included)
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    estimates: list[str] = []
    page.on("request", lambda r: "/jobs/new/estimate" in r.url and estimates.append(r.url))
    with worker(live_portal.home):
        sign_in(page, live_portal, "eng")
        page.goto(live_portal.url + "/jobs/new")
        fields = {
            "base_model": str(tiny_model), "data.train": str(chat), "data.eval_fraction": "0.1",
            "data.max_seq_len": "64", "data.dedup": None, "lora.r": "2", "lora.alpha": "4",
            "training.max_steps": str(STEPS), "training.micro_batch_size": "2",
            "training.lr": "1e-3", "training.eval_every": str(EVAL_EVERY),
            "training.save_every": "1000", "training.precision": None, "register": None,
        }  # fmt: skip
        for name, value in fields.items():
            if value is not None:
                page.locator(f'[name="{name}"]').fill(value)
        page.locator('[name="data.dedup"]').select_option("false")
        page.locator('[name="training.precision"]').select_option("fp32")
        page.locator("#section-register summary").click()  # a section closed by default
        page.locator('[name="register"]').select_option("false")
        estimate = page.locator("#estimate-total")
        estimate.wait_for()
        before = estimate.inner_text()
        page.locator('[name="lora.r"]').fill("64")  # the estimate follows the fields
        page.wait_for_function(
            "b => document.querySelector('#estimate-total')?.textContent !== b", arg=before
        )
        page.locator('[name="lora.r"]').fill("2")
        page.wait_for_function(
            "b => document.querySelector('#estimate-total')?.textContent === b", arg=before
        )
        assert "fits" in page.locator("#estimate").inner_text()
        assert len(estimates) >= 3 and not any("csrf_token" in u for u in estimates)
        page.evaluate("window.scrollTo(0, 0)")
        shot(page, "jobs-new")

        page.get_by_role("button", name="Submit the job").click()
        page.wait_for_url("**/jobs/j*", timeout=90_000)  # admission runs the planner first
        job_id = page.url.rsplit("/", 1)[1]
        DONE["job"] = job_id

        seen: list[tuple[int, str]] = []  # (points plotted, job status) as the page changes
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            state = page.locator("#run").get_attribute("data-state")
            now = (_points(page), page.locator("#job-status").inner_text())
            if not seen or seen[-1] != now:
                seen.append(now)
            if state == "ended":
                break
            time.sleep(0.2)
        final = _points(page)
        assert page.locator("#job-status").inner_text() == "succeeded", seen
        growing = [n for n, status in seen if status == "running" and n > 0]
        assert len(set(growing)) >= 2, seen  # the curve gained points while the job ran
        assert final == STEPS + STEPS // EVAL_EVERY, seen  # every train and eval loss point
        plotted = page.evaluate("() => window.loftJob.charts[0].plot.data[0].length")
        assert plotted == STEPS
        assert page.locator("#chart-loss canvas").count() >= 1
        assert int(page.locator("#chart-lr").get_attribute("data-points")) == STEPS
        assert f"step {STEPS}/{STEPS}" in page.locator("#log").inner_text()
        assert f"max_steps: {STEPS}" in page.locator("#config").inner_text()
        page.wait_for_selector("body[data-refreshed]")  # the finished run's summary, fetched
        assert "peak memory" in page.locator("#system").inner_text()
        assert "succeeded" in page.locator("#history").inner_text()
        shot(page, "jobs-run")

        page.goto(live_portal.url + "/jobs")
        row = page.locator(f"#job-{job_id}")
        assert "succeeded" in row.inner_text() and "eng" in row.inner_text()
        shot(page, "jobs-list")
    assert not problems, problems


def test_a_viewer_sees_the_queue_but_cannot_submit(live_portal, page):
    sign_in(page, live_portal, "vic")
    page.goto(live_portal.url + "/jobs")
    assert page.get_by_role("link", name="New training job").count() == 0
    if DONE.get("job"):
        assert page.locator(f"#job-{DONE['job']}").count() == 1
    listed = api(page, "GET", "/api/jobs")
    assert listed.status == 200
    refused = api(page, "POST", "/api/jobs", data={"config": {"data": {"train": "/x.jsonl"}}})
    assert refused.status == 403
    assert refused.json()["error"]["type"] == "permission_denied"
    if DONE.get("job"):
        assert api(page, "POST", f"/api/jobs/{DONE['job']}/cancel").status == 403
    page.goto(live_portal.url + "/jobs/new")
    assert "Not allowed" in page.locator("h1").inner_text()
