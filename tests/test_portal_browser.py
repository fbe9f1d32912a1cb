"""The portal in a real browser: signing in and out, what each role's menu shows, and the
server refusing (HTTP 403) what a role may not do even when the page is bypassed."""

from __future__ import annotations

import pytest

from browser import PASSWORD, api, shot, sign_in, sign_out

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def accounts(live_portal):
    for name, role in [("ada", "admin"), ("vic", "viewer"), ("ann", "annotator")]:
        live_portal.add_user(name, role)


def test_sign_in_shows_the_menu_of_the_role_and_sign_out_ends_the_session(live_portal, page):
    page.goto(live_portal.url + "/users")
    page.wait_for_url("**/login?next=%2Fusers")
    shot(page, "login")
    page.get_by_label("User name").fill("ada")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text().startswith("wrong user name or password")
    sign_in(page, live_portal, "ada", PASSWORD)
    menu = page.get_by_role("navigation", name="main").inner_text()
    for title in ("Datasets", "Jobs", "Registry", "Serving", "Users", "Audit trail"):
        assert title in menu
    shot(page, "home")
    page.get_by_role("navigation", name="main").get_by_role("link", name="Users").click()
    page.wait_for_url(live_portal.url + "/users")
    assert "vic" in page.locator("main").inner_text()
    shot(page, "users")
    sign_out(page)
    page.goto(live_portal.url + "/users")
    page.wait_for_url("**/login**")


def test_a_viewer_and_an_annotator_are_refused_by_the_server_not_only_the_menu(live_portal, page):
    sign_in(page, live_portal, "vic")
    menu = page.get_by_role("navigation", name="main").inner_text()
    assert "Users" not in menu and "Audit trail" not in menu
    assert api(page, "GET", "/api/users").status == 403
    refused = api(page, "POST", "/api/users", data={"name": "eve", "role": "admin"})
    assert refused.status == 403
    assert refused.json()["error"]["type"] == "permission_denied"
    page.goto(live_portal.url + "/audit")
    assert "Not allowed" in page.locator("h1").inner_text()
    sign_out(page)
    sign_in(page, live_portal, "ann")
    assert api(page, "GET", "/api/audit").status == 403
    no_csrf = page.request.fetch(live_portal.url + "/api/tokens", method="POST", data={"name": "x"})
    assert no_csrf.status == 403  # a session without the page's CSRF token changes nothing
    assert api(page, "POST", "/api/tokens", data={"name": "laptop"}).status == 201
