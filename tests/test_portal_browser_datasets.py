"""Datasets in a real browser: a curator uploads a file with a bad record through the form and
sees its FILE:LINE, then a good file and lands on the version's page with its report; a viewer
sees the list without the upload form, and the server refuses their upload (403)."""

from __future__ import annotations

import json

import pytest

from browser import api, shot, sign_in, sign_out

pytestmark = pytest.mark.integration


def chat(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"How do I reset password number {i}?"},
            {"role": "assistant", "content": f"Open settings, then security, then reset ({i})."},
        ]
    }


GOOD = [json.dumps(chat(i)) for i in range(4)]
GOOD.append(json.dumps(chat(0)))  # an exact duplicate for the report
GOOD.append(json.dumps({"messages": [
    {"role": "user", "content": "My card is 4111 1111 1111 1111, can you store it?"},
    {"role": "assistant", "content": "Never send card numbers in chat."},
]}))  # fmt: skip
BAD = [*GOOD[:2], '{"messages": [{"role": "user", "content": "no reply"}]}', *GOOD[2:]]


@pytest.fixture(scope="module", autouse=True)
def accounts(live_portal):
    for name, role in [("cora", "curator"), ("vic", "viewer")]:
        live_portal.add_user(name, role)


def _choose(page, name: str, lines: list[str]) -> None:
    page.get_by_label("File").set_input_files(
        {"name": name, "mimeType": "application/jsonl", "buffer": "\n".join(lines).encode()}
    )


def test_a_curator_sees_the_bad_records_line_then_uploads_and_reads_the_report(live_portal, page):
    sign_in(page, live_portal, "cora")
    page.get_by_role("navigation", name="main").get_by_role("link", name="Datasets").click()
    page.wait_for_url(live_portal.url + "/datasets")
    page.get_by_label("Name").fill("support")
    _choose(page, "support-chats.jsonl", BAD)
    page.get_by_role("button", name="Upload").click()
    problems = page.get_by_role("alert")
    problems.wait_for()
    text = problems.inner_text()
    assert "Nothing was stored" in text
    assert "support-chats.jsonl:3: messages: no assistant turn to train on" in text
    shot(page, "datasets-upload-error")
    assert api(page, "GET", "/api/datasets/support").status == 404

    page.get_by_label("Name").fill("support")
    _choose(page, "support-chats.jsonl", GOOD)
    page.get_by_role("button", name="Upload").click()
    page.wait_for_url(live_portal.url + "/datasets/support/1")
    main = page.locator("main").inner_text()
    assert "upload of support-chats.jsonl" in main and "by cora" in main
    version = api(page, "GET", "/api/datasets/support/1").json()
    assert version["records"] == 6 and version["created_by"] == "cora"
    assert version["sha256"] in main  # the fingerprint
    assert "1 exact duplicate" in main
    assert "card" in page.locator(".report").inner_text()  # the PII finding
    assert "Open settings, then security, then reset (3)." in main  # the records browser
    shot(page, "datasets-version")

    page.goto(live_portal.url + "/datasets")
    row = page.get_by_role("row").filter(has_text="support")
    assert "v1" in row.inner_text() and "6" in row.inner_text()
    shot(page, "datasets-list")
    sign_out(page)


def test_a_viewer_sees_the_list_but_cannot_upload(live_portal, page):
    sign_in(page, live_portal, "vic")
    page.goto(live_portal.url + "/datasets")
    assert page.locator("h1").inner_text() == "Datasets"
    assert page.locator('input[type="file"]').count() == 0
    refused = api(
        page, "POST", "/api/datasets/x",
        multipart={"file": {"name": "x.jsonl", "mimeType": "application/jsonl",
                            "buffer": GOOD[0].encode()}},
    )  # fmt: skip
    assert refused.status == 403
    assert refused.json()["error"]["type"] == "permission_denied"
    assert api(page, "GET", "/api/datasets").status == 200
