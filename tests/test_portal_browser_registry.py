"""The registry, compare and serving pages in a real browser, over a real `loft serve` on the
tiny model: an engineer promotes a version through a gate (refused first, every check shown),
rolls back, compares two versions side by side with blind votes and saves them as a preference
dataset whose win rates reach the versions' cards; a viewer is refused promotion by the server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from browser import PASSWORD, Portal, api, shot, sign_in, sign_out
from helpers import free_port, linked_home, make_lora_adapter, start_loft
from test_portal_registry import scored

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live_portal(tmp_path_factory, _session_home: Path, tiny_model: Path):
    """A `loft serve` of the tiny model and a `loft portal` pointed at it (LOFT_SERVE_URL and a
    metrics-scoped key), over one LOFT_HOME holding bot:1 (champion, eval_loss 1.0) and bot:2
    (0.9 on the same records): two LoRA adapters with different random weights."""
    from loft.serve.keys import KeyStore

    root = tmp_path_factory.mktemp("portal_registry")
    home = linked_home(root, _session_home)
    port = free_port()
    log = (root / "serve.log").open("w")
    server = start_loft(
        "serve",
        "--port",
        str(port),
        "--base-model",
        str(tiny_model),
        "--set",
        "device=cpu",
        "--set",
        "alias_refresh_s=0.5",
        home=home,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    portal = None
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LOFT_HOME", str(home))
            from loft import registry

            for seed in (1, 2):
                adapter = make_lora_adapter(root / f"a{seed}", tiny_model, seed=seed)
                registry.register(adapter, name="bot")
            scored("bot:1", 1.0)
            scored("bot:2", 0.9)
            registry.move_alias("bot", "champion", 1, reason="first release")
            key = KeyStore(home / "keys.db").create("portal", ["*"], metrics=True)[1]
            from loft.portal.store import PortalStore

            accounts = PortalStore()  # as `loft users add` makes them, without a process each
            for name, role in [("erin", "engineer"), ("vic", "viewer"), ("ada", "admin")]:
                accounts.add_user(name, role, PASSWORD, actor="setup")
        url = f"http://127.0.0.1:{port}"
        portal = Portal(home, env={"LOFT_SERVE_URL": url, "LOFT_API_KEY": key})
        _wait_ready(url, server, root / "serve.log")
        yield portal
    finally:
        if portal is not None:
            portal.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _wait_ready(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-2000:]
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/ready", timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"loft serve was not ready in 120 s: {log.read_text()[-2000:]}")


def test_an_engineer_promotes_through_a_gate_sees_each_check_and_rolls_back(live_portal, page):
    page.on("dialog", lambda dialog: dialog.accept())  # the rollback's "are you sure?"
    sign_in(page, live_portal, "erin")
    page.get_by_role("navigation", name="main").get_by_role("link", name="Registry").click()
    page.wait_for_url(live_portal.url + "/registry")
    assert "@champion → 1" in page.locator("#model-bot").inner_text()
    shot(page, "registry-models")
    page.get_by_role("link", name="bot", exact=True).click()
    page.get_by_role("link", name="bot:2").click()
    page.wait_for_url(live_portal.url + "/registry/bot/2")
    assert page.locator("svg#lineage .node.base").count() == 1
    assert "-0.1" in page.locator("table.metrics").inner_text()  # 0.9 against the champion's 1.0
    shot(page, "registry-version")

    # a gate bot:2 fails: refused, each check with its value; the champion stays
    gate = page.locator("#promote textarea[name=gate]")
    gate.fill("eval_loss <= champion - 0.5\neval_loss <= 100")
    page.get_by_role("button", name="Run the gate and promote").click()
    checks = page.locator("#gate table.checks")
    checks.wait_for()
    text = checks.inner_text()
    assert "eval_loss <= champion - 0.5" in text and "FAIL" in text and "0.9 > 0.5" in text
    assert "eval_loss <= 100" in text and "pass" in text
    assert "refused" in page.locator("#gate h2").inner_text()

    # a gate it passes: the alias moves and the checks are shown
    page.locator("#promote textarea[name=gate]").fill("eval_loss <= champion + 0.02")
    page.locator("#promote input[name=reason]").fill("better on held-out")
    page.get_by_role("button", name="Run the gate and promote").click()
    page.locator("#gate.passed").wait_for()
    assert "champion: 1 → 2" in page.get_by_role("status").first.inner_text()
    assert "0.9 <= 1.02" in page.locator("#gate").inner_text()
    shot(page, "registry-promote")

    # roll back from the model page: the champion is bot:1 again, both moves in the history
    page.goto(live_portal.url + "/registry/bot")
    page.get_by_role("button", name="Roll back").click()
    page.wait_for_url("**/registry/bot/1?rolled_back=champion")
    assert "rolled @champion back" in page.locator("main").inner_text()
    history = page.locator("table.history").inner_text()
    assert "@champion: 2 → 1" in history and "erin" in history
    assert api(page, "GET", "/api/registry/bot").json()["champion"] == 1


def test_a_viewer_is_refused_promotion_and_rollback_by_the_server(live_portal, page):
    sign_in(page, live_portal, "vic")
    page.goto(live_portal.url + "/registry/bot/2")
    assert page.locator("#promote").count() == 0  # a courtesy; the server is the check
    refused = api(page, "POST", "/api/registry/bot/2/promote", data={"to": "champion"})
    assert refused.status == 403 and refused.json()["error"]["type"] == "permission_denied"
    assert api(page, "POST", "/api/registry/bot/rollback", data={}).status == 403
    assert api(page, "POST", "/api/compare", data={"versions": [], "prompts": []}).status == 403
    assert api(page, "GET", "/api/registry/bot").json()["champion"] == 1


def test_two_versions_side_by_side_blind_votes_and_a_preference_dataset(live_portal, page):
    sign_in(page, live_portal, "erin")
    page.goto(live_portal.url + "/registry/bot")
    page.get_by_label("compare bot:1").check()
    page.get_by_label("compare bot:2").check()
    page.get_by_role("button", name="Compare the checked versions side by side").click()
    page.wait_for_url("**/compare?v=bot%3A2&v=bot%3A1")  # the page lists newest first
    assert page.locator("textarea[name=versions]").input_value() == "bot:2\nbot:1"
    page.locator("textarea[name=prompts]").fill("Sky colour?\nA prime?")
    page.locator("input[name=max_tokens]").fill("6")
    page.get_by_role("button", name="Generate and compare").click()
    page.wait_for_url("**/compare/*", timeout=60_000)
    assert "Blind vote 1 of 2" in page.locator("#vote h2").inner_text()
    assert "bot:" not in page.locator("#vote").inner_text()  # which side is which: hidden
    shot(page, "compare")

    page.get_by_role("button", name="Left is better").click()
    reveal = page.locator("#reveal").inner_text()
    assert "left was bot:" in reveal and "right was bot:" in reveal
    page.get_by_role("button", name="Right is better").click()
    page.locator("#side-by-side").wait_for()
    table = page.locator("table.side-by-side").inner_text()
    assert "bot:1" in table and "bot:2" in table and "Sky colour?" in table
    page.locator("#save-dataset input[name=name]").fill("bot-prefs")
    page.get_by_role("button", name="Save").click()
    page.get_by_text("saved 2 preference pairs as dataset bot-prefs:1").wait_for()

    cid = page.url.split("/compare/", 1)[1].split("/", 1)[0]
    tally = api(page, "GET", f"/api/compare/{cid}")
    assert sum(t["votes"] for t in tally.json()["tally"]) == 4  # two votes, each on two versions
    one = api(page, "GET", "/api/registry/bot/1").json()["preference"]
    two = api(page, "GET", "/api/registry/bot/2").json()["preference"]
    assert one["votes"] == two["votes"] == 2 and one["wins"] + two["wins"] == 2
    page.goto(live_portal.url + "/registry/bot/1")
    assert "over 2 blind votes" in page.locator("#win-rate").inner_text()


def test_serving_shows_routes_traffic_and_keys_with_the_secret_once(live_portal, page):
    sign_in(page, live_portal, "ada")
    page.goto(live_portal.url + "/serving")
    assert "bot:1" in page.locator("#route-bot").inner_text()
    traffic = page.locator("#traffic").inner_text()  # the comparison's requests, per version
    assert "bot:1" in traffic and "bot:2" in traffic
    page.locator("#keys input[name=name]").fill("ci")
    page.locator("#keys input[name=adapters]").fill("bot")
    page.get_by_role("button", name="Create a key").click()
    secret = page.locator(".secret code").inner_text()
    assert secret.startswith("loft-")
    shot(page, "serving")
    page.goto(live_portal.url + "/serving")
    assert secret not in page.content() and "ci" in page.locator("#keys").inner_text()
    sign_out(page)
