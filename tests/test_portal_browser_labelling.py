"""Labelling in a real browser: a curator creates a project over a small preference-candidate
dataset (a pairwise question, overlap 2), two annotators label by keyboard in their own
sessions, the curator resolves their one disagreement and exports a preference dataset whose
new version has the project in its lineage."""

from __future__ import annotations

import contextlib

import pytest

from browser import api, shot, sign_in

pytestmark = pytest.mark.integration

PAIRS = [
    {"prompt": f"How do I reset password {i}?", "chosen": f"good: open settings, step {i}",
     "rejected": f"bad: no idea {i}"}
    for i in range(3)
]  # fmt: skip


@contextlib.contextmanager
def _home(live_portal):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFT_HOME", str(live_portal.home))
        yield


@pytest.fixture(scope="module", autouse=True)
def setup(live_portal):
    from loft.data import catalog

    for name, role in [("cura", "curator"), ("ann", "annotator"), ("bob", "annotator")]:
        live_portal.add_user(name, role)
    with _home(live_portal):
        catalog.add_version("cands", PAIRS, source={"kind": "upload", "filename": "cands.jsonl"})


def _label_everything(page, live_portal, name: str, disagree_on: int | None) -> list[int]:
    """Sign in as ``name`` and label every assigned record by keyboard: the number of the
    response that starts 'good' (the other one on record ``disagree_on``), then Enter."""
    sign_in(page, live_portal, name)
    page.goto(live_portal.url + "/labelling")
    assert "prefs" in page.locator("#project-prefs").inner_text()
    if name == "ann":
        shot(page, "labelling-projects")
    page.locator("#project-prefs").get_by_role("link", name="Label").click()
    done = []
    while True:
        page.wait_for_url("**/labelling/prefs/**")
        if "/records/" not in page.url:
            break
        record = int(page.url.rsplit("/", 1)[1])
        good = page.locator("article.response", has_text="good:").get_attribute("id")
        bad = page.locator("article.response", has_text="bad:").get_attribute("id")
        key = (bad if record == disagree_on else good).rsplit("-", 1)[1]
        page.keyboard.press(key)
        assert page.locator(f'input[data-key="{key}"]').is_checked()
        if name == "ann" and not done:
            shot(page, "labelling-annotate")
        page.keyboard.press("Enter")
        page.wait_for_url(lambda url, here=page.url: url != here)
        done.append(record)
    assert "every record assigned to you" in page.locator("main").inner_text()
    for method, path, body in [  # the server refuses what an annotator may not do
        ("PUT", "/api/labelling/projects/prefs/records/0/review", {"answers": {"better": 0}}),
        ("POST", "/api/labelling/projects/prefs/exports", {"shape": "preference"}),
        ("GET", "/api/labelling/projects/prefs/conflicts", None),
    ]:
        assert api(page, method, path, data=body).status == 403, (method, path)
    return done


def test_two_annotators_to_an_exported_preference_dataset(live_portal, page, browser):
    from loft.data import catalog

    sign_in(page, live_portal, "cura")
    page.goto(live_portal.url + "/labelling")
    form = page.locator("form.lab-new")
    form.get_by_label("Name", exact=True).fill("prefs")
    form.get_by_label("Dataset version").fill("cands")
    form.get_by_label("Overlap").fill("2")
    form.get_by_label("Guidelines (plain text)").fill("Prefer the answer that solves the problem.")
    form.get_by_label("ann", exact=True).check()
    form.get_by_label("bob", exact=True).check()
    form.get_by_label("kind of question 1").select_option("pairwise")
    form.get_by_label("name of question 1").fill("better")
    form.get_by_label("text of question 1").fill("Which answer is better?")
    form.get_by_role("button", name="Create project").click()
    page.wait_for_url(live_portal.url + "/labelling/prefs")
    assert "cands:1" in page.locator("main").inner_text()

    for name, disagree_on in [("ann", None), ("bob", 2)]:
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        annotator = context.new_page()
        annotator.set_default_timeout(20_000)
        assert _label_everything(annotator, live_portal, name, disagree_on) == [0, 1, 2]
        context.close()

    page.goto(live_portal.url + "/labelling/prefs")
    progress = page.locator("#progress").inner_text()
    assert "ann\t3\t0\t0\t3\t0" in progress and "bob\t3\t0\t0\t3\t0" in progress
    page.get_by_role("link", name="Review 1 disagreement").click()
    page.wait_for_url("**/labelling/prefs/review")
    conflict = page.locator("#conflict-2")
    assert conflict.count() == 1 and page.locator("section.conflict").count() == 1
    shot(page, "labelling-review")
    good = conflict.locator("article.response", has_text="good:").get_attribute("id")
    position = good.rsplit("-", 1)[1]
    conflict.get_by_label(f"Response {position} is better").check()
    conflict.get_by_role("button", name="Set final answer").click()
    assert "Record 2 resolved" in page.get_by_role("status").inner_text()
    assert "No disagreements left" in page.locator("main").inner_text()

    page.goto(live_portal.url + "/labelling/prefs")
    page.get_by_label("Shape").select_option("preference")
    page.get_by_label("Dataset name").fill("prefs-final")
    page.get_by_role("button", name="Export").click()
    notice = page.get_by_role("status").inner_text()
    assert "Exported 3 records as dataset prefs-final:1" in notice
    shot(page, "labelling-project")
    with _home(live_portal):
        version = catalog.get_version("prefs-final")
        rows = catalog.read_records("prefs-final", 0, 10)
    assert version.parents == ("cands:1",) and version.layout == "preference"
    assert version.source == {"kind": "labelling", "project": "prefs", "shape": "preference"}
    assert all(r["chosen"][0]["content"].startswith("good:") for r in rows)
