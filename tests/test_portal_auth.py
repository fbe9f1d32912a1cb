"""The portal's checks, through its HTTP interface (FastAPI's TestClient on create_app()): every
role against every API route, 401 without credentials, CSRF, API tokens, session expiry,
disabled users, the sign-in rate limit, hashes-only storage and the audit trail's record."""

from __future__ import annotations

import hashlib
import re
import uuid

import pytest
from fastapi.testclient import TestClient

from loft.core import audit
from portal_client import (
    ROLES,
    Portal,
    check_route,
    csrf_of,
    matrix_cases,
    password_of,
    portal_for,
    post_login,
    sign_in,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def portal(tmp_path_factory) -> Portal:
    """One portal for the module: a user per role (named after it), each with an API token and
    a signed-in session, plus 'target', a viewer that admins change."""
    with portal_for(tmp_path_factory.mktemp("portal_home")) as p:
        p.store.add_user("target", "viewer", password_of("target"), actor="setup")
        yield p


# -- every role x every API route ---------------------------------------------------------------

# Written out, not derived from loft.portal.roles.ACTIONS, so a change to the table shows here.
#                                   admin curator annotator engineer viewer
API_MATRIX = {
    "GET /api/me":                  "yes   yes     yes       yes      yes",
    "GET /api/users":               "yes   no      no        no       no",
    "POST /api/users":              "yes   no      no        no       no",
    "PATCH /api/users/target":      "yes   no      no        no       no",
    "GET /api/tokens":              "yes   yes     yes       yes      yes",
    "POST /api/tokens":             "yes   yes     yes       yes      yes",
    "DELETE /api/tokens/{own}":     "yes   yes     yes       yes      yes",
    "GET /api/audit":               "yes   no      no        no       no",
    "GET /api/audit/verify":        "yes   no      no        no       no",
}  # fmt: skip
CASES = matrix_cases(API_MATRIX)


def _send(portal: Portal, role: str):
    def send(client: TestClient, method: str, path: str, headers: dict):
        unique = uuid.uuid4().hex[:8]
        body = None
        if path == "/api/users":
            body = {"name": f"new-{unique}", "role": "viewer", "password": "a long password"}
        elif path == "/api/tokens" and method == "POST":
            body = {"name": f"t-{unique}"}
        elif path.startswith("/api/users/"):
            body = {"role": "viewer"}
        elif path.endswith("{own}"):
            token, _ = portal.store.create_token(role, f"d-{unique}", actor="setup")
            path = path.replace("{own}", token.id)
        return client.request(method, path, json=body, headers=headers)

    return send


@pytest.mark.parametrize("via", ["token", "session"])
@pytest.mark.parametrize(("route", "role", "allowed"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_role_against_every_api_route(portal, route, role, allowed, via):
    check_route(portal, route, role, allowed, via, _send(portal, role))


@pytest.mark.parametrize("route", list(API_MATRIX))
def test_every_api_route_without_credentials_is_401_json(portal, route):
    method, path = route.split(" ")
    r = portal.client().request(method, path.replace("{own}", "00000000"), json={})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication"
    assert "Traceback" not in r.text


def test_me_says_who_and_what(portal):
    r = portal.client().get("/api/me", headers=portal.bearer("annotator"))
    assert r.json() == {
        "name": "annotator",
        "role": "annotator",
        "via": "token",
        "actions": ["tokens.own", "labelling.annotate"],
    }


# -- pages: the same checks, answered in HTML ---------------------------------------------------

#                      admin curator annotator engineer viewer
PAGE_MATRIX = {
    "/":               "yes   yes     yes       yes      yes",
    "/tokens":         "yes   yes     yes       yes      yes",
    "/users":          "yes   no      no        no       no",
    "/audit":          "yes   no      no        no       no",
    "/audit/verify":   "yes   no      no        no       no",
}  # fmt: skip


@pytest.mark.parametrize("path", list(PAGE_MATRIX))
def test_pages_by_role_and_without_a_session(portal, path):
    for role, cell in zip(ROLES, PAGE_MATRIX[path].split(), strict=True):
        client, _ = portal.sessions[role]
        r = client.get(path)
        assert r.headers["content-type"].startswith("text/html")
        if cell == "yes":
            assert r.status_code == 200, (role, r.text[:300])
        else:
            assert r.status_code == 403, role
            assert "Not allowed" in r.text and "may not" in r.text
    r = portal.client().get(path + "?limit=5", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=" + path.replace("/", "%2F") + "%3Flimit%3D5"


def test_htmx_requests_without_a_session_get_a_full_page_redirect(portal):
    r = portal.client().get("/users", headers={"HX-Request": "true"}, follow_redirects=False)
    assert r.status_code == 204
    assert r.headers["HX-Redirect"] == "/login?next=%2Fusers"


def test_home_lists_only_what_the_role_may_open(portal):
    admin = portal.sessions["admin"][0].get("/").text
    viewer = portal.sessions["viewer"][0].get("/").text
    for path in ('href="/users"', 'href="/audit"', 'href="/tokens"'):
        assert path in admin
    assert 'href="/tokens"' in viewer
    assert 'href="/users"' not in viewer and 'href="/audit"' not in viewer
    assert "role <strong>viewer</strong>" in viewer


def test_every_page_carries_the_sessions_csrf_token_and_serves_htmx_itself(portal):
    client, csrf = portal.sessions["admin"]
    for path in PAGE_MATRIX:
        if path != "/audit/verify":  # a fragment, not a page
            assert csrf_of(client.get(path)) == csrf
    page = client.get("/").text
    assert '<script src="/static/vendor/htmx.min.js"' in page
    assert not re.search(r"<script[^>]+src=\"(https?:)?//", page)  # nothing from a CDN
    js = client.get("/static/vendor/htmx.min.js")
    assert js.status_code == 200 and "htmx" in js.text[:2000]
    assert csrf_of(portal.client().get("/login"))  # the sign-in page carries its own


def test_unknown_paths_are_404_in_the_callers_language(portal):
    client, _ = portal.sessions["viewer"]
    page = client.get("/no/such/page")
    assert page.status_code == 404 and "Not found" in page.text
    api = client.get("/api/no/such/route")
    assert api.status_code == 404
    assert api.json()["error"] == {
        "type": "not_found",
        "message": "nothing at /api/no/such/route",
        "hint": None,
    }


# -- CSRF ---------------------------------------------------------------------------------------


def _token_names(portal: Portal, user: str) -> set[str]:
    return {t.name for t in portal.store.list_tokens(user, 500)[0]}


def test_session_changes_need_the_csrf_token(portal):
    client, csrf = portal.sessions["engineer"]
    for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": ""}):
        r = client.post("/api/tokens", json={"name": "csrf-probe"}, headers=headers)
        assert r.status_code == 403, headers
        assert "CSRF token" in r.json()["error"]["message"]
    assert "csrf-probe" not in _token_names(portal, "engineer")
    r = client.post("/api/tokens", json={"name": "csrf-probe"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201
    assert "csrf-probe" in _token_names(portal, "engineer")


def test_forms_carry_the_csrf_token_as_a_field(portal):
    client, csrf = portal.sessions["curator"]
    refused = client.post("/tokens", data={"name": "form-probe", "csrf_token": "forged"})
    assert refused.status_code == 403 and "CSRF token" in refused.text
    assert "form-probe" not in _token_names(portal, "curator")
    created = client.post("/tokens", data={"name": "form-probe", "csrf_token": csrf})
    assert created.status_code == 200
    secret = re.search(r"<code>(loftp_[^<]+)</code>", created.text).group(1)
    assert (
        portal.client().get("/api/me", headers={"Authorization": f"Bearer {secret}"}).json()["name"]
        == "curator"
    )
    assert secret not in client.get("/tokens").text  # shown once, never again


def test_bearer_requests_need_no_csrf_token(portal):
    r = portal.client().post(
        "/api/tokens", json={"name": "no-csrf"}, headers=portal.bearer("viewer")
    )
    assert r.status_code == 201


def test_the_sign_in_form_has_its_own_csrf_token(portal):
    client = portal.client()
    r = post_login(client, "viewer", password_of("viewer"), csrf="made-up")
    assert r.status_code == 403 and "sign-in form expired" in r.text
    assert "loft_session" not in r.cookies


# -- API tokens ---------------------------------------------------------------------------------


def test_a_token_stops_working_when_revoked(portal):
    client = portal.client()
    r = client.post("/api/tokens", json={"name": "short-lived"}, headers=portal.bearer("engineer"))
    token = r.json()
    auth = {"Authorization": f"Bearer {token['token']}"}
    assert client.get("/api/me", headers=auth).status_code == 200
    listed = client.get("/api/tokens?limit=500", headers=portal.bearer("engineer")).json()
    assert "token" not in listed["items"][0] and token["token"] not in str(listed)
    r = client.delete(f"/api/tokens/{token['id']}", headers=portal.bearer("engineer"))
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    r = client.get("/api/me", headers=auth)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


def test_a_token_cannot_revoke_another_users_token(portal):
    mine = portal.store.create_token("viewer", f"v-{uuid.uuid4().hex[:6]}", actor="setup")[0]
    r = portal.client().delete(f"/api/tokens/{mine.id}", headers=portal.bearer("admin"))
    assert r.status_code == 404
    assert not portal.store.list_tokens("viewer", 500)[0][0].revoked


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer nonsense", "Basic dXNlcjpwYXNz", "Bearer loftp_0000000a_" + "x" * 43],
)
def test_bad_authorization_headers_are_401(portal, header):
    r = portal.client().get("/api/me", headers={"Authorization": header})
    assert r.status_code == 401


def test_disabling_a_user_stops_their_session_and_tokens_at_once(portal):
    name = f"d-{uuid.uuid4().hex[:6]}"
    portal.store.add_user(name, "engineer", password_of(name), actor="setup")
    token = portal.store.create_token(name, "ci", actor="setup")[1]
    browser = portal.client()
    sign_in(browser, name, password_of(name))
    bearer = {"Authorization": f"Bearer {token}"}
    assert browser.get("/api/me").status_code == 200
    admin, csrf = portal.sessions["admin"]
    r = admin.patch(f"/api/users/{name}", json={"disabled": True}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["disabled"] is True
    assert browser.get("/api/me").status_code == 401
    r = portal.client().get("/api/me", headers=bearer)
    assert r.status_code == 401 and "disabled" in r.json()["error"]["message"]
    # enabled again: the token works again, the session stays ended
    admin.patch(f"/api/users/{name}", json={"disabled": False}, headers={"X-CSRF-Token": csrf})
    assert portal.client().get("/api/me", headers=bearer).status_code == 200
    assert browser.get("/api/me").status_code == 401


def test_a_role_change_applies_to_the_next_request(portal):
    name = f"r-{uuid.uuid4().hex[:6]}"
    portal.store.add_user(name, "admin", password_of(name), actor="setup")
    token = portal.store.create_token(name, "ci", actor="setup")[1]
    bearer = {"Authorization": f"Bearer {token}"}
    assert portal.client().get("/api/users", headers=bearer).status_code == 200
    portal.store.set_role(name, "viewer", actor="setup")
    assert portal.client().get("/api/users", headers=bearer).status_code == 403


# -- sessions -----------------------------------------------------------------------------------


def test_session_cookie_attributes(portal):
    client = portal.client(base_url="https://portal.example")
    r = post_login(client, "viewer", password_of("viewer"))
    cookie = r.headers["set-cookie"].lower()
    assert cookie.startswith("loft_session=")
    for attribute in ("httponly", "samesite=lax", "secure", "path=/", "max-age=43"):
        assert attribute in cookie, cookie  # max-age 12 h = 432xx s
    plain = portal.client()
    sign_in(plain, "viewer", password_of("viewer"))
    assert "secure" not in str(plain.cookies.jar).lower()


def test_an_expired_session_is_refused_and_deleted(portal):
    client = portal.client()
    sign_in(client, "viewer", password_of("viewer"))
    digest = hashlib.sha256(client.cookies["loft_session"].encode()).hexdigest()
    with portal.store.connect() as conn:
        conn.execute(
            "UPDATE sessions SET expires = '2020-01-01T00:00:00+00:00' WHERE id_sha256 = ?",
            (digest,),
        )
    r = client.get("/api/me")
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    with portal.store.connect() as conn:
        assert (
            conn.execute("SELECT 1 FROM sessions WHERE id_sha256 = ?", (digest,)).fetchone() is None
        )
    page = client.get("/tokens", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")


def test_session_hours_come_from_the_environment_or_settings(portal, monkeypatch):
    from loft.core.errors import ConfigError
    from loft.portal.auth import session_hours

    monkeypatch.setenv("LOFT_PORTAL_SESSION_HOURS", "2")
    client = portal.client()
    r = post_login(client, "viewer", password_of("viewer"))
    max_age = int(re.search(r"max-age=(\d+)", r.headers["set-cookie"].lower()).group(1))
    assert 7190 <= max_age <= 7200
    monkeypatch.delenv("LOFT_PORTAL_SESSION_HOURS")
    (portal.home / "settings.yaml").write_text("portal:\n  session_hours: 0.5\n")
    try:
        assert session_hours() == 0.5
        monkeypatch.setenv("LOFT_PORTAL_SESSION_HOURS", "soon")
        with pytest.raises(ConfigError, match="portal.session_hours"):
            session_hours()
    finally:
        (portal.home / "settings.yaml").unlink()


def test_logout_ends_the_session(portal):
    client = portal.client()
    csrf = sign_in(client, "curator", password_of("curator"))
    assert client.post("/logout", data={}, follow_redirects=False).status_code == 403  # no CSRF
    r = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/api/me").status_code == 401


# -- signing in ---------------------------------------------------------------------------------


def test_a_wrong_name_and_a_wrong_password_fail_alike(portal):
    client = portal.client()
    form = client.get("/login")
    bodies = []
    for name in ("viewer", "nosuchuser"):
        r = post_login(client, name, "wrong password", csrf_of(form))
        assert r.status_code == 401
        bodies.append(re.search(r'role="alert"><p>([^<]*)</p>', r.text).group(1))
    assert bodies == ["wrong user name or password"] * 2


@pytest.mark.parametrize(
    ("target", "expected"),
    [("/tokens?limit=5", "/tokens?limit=5"), ("//evil.example", "/"),
     ("https://evil.example", "/"), ("/\\evil.example", "/"), ("/\t/evil.example", "/")],
)  # fmt: skip
def test_sign_in_returns_only_to_a_local_path(portal, target, expected):
    client = portal.client()
    data = {"name": "Viewer", "password": password_of("viewer"), "next": target}
    data["csrf_token"] = csrf_of(client.get("/login"))
    r = client.post("/login", data=data, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == expected


def test_failed_sign_ins_are_rate_limited_per_user_name(portal):
    client = portal.client()
    csrf = csrf_of(client.get("/login"))

    for _ in range(5):
        assert post_login(client, "engineer", "wrong password", csrf).status_code == 401
    blocked = post_login(client, "engineer", password_of("engineer"), csrf)  # even the right one
    assert blocked.status_code == 429
    assert 1 <= int(blocked.headers["retry-after"]) <= 60
    assert "too many failed sign-ins" in blocked.text
    assert post_login(client, "viewer", password_of("viewer"), csrf).status_code == 303


def test_the_throttle_forgets_failures_after_its_window():
    from loft.core.errors import RateLimitedError
    from loft.portal.auth import LoginThrottle

    now = [1000.0]
    throttle = LoginThrottle(limit=2, window=60, clock=lambda: now[0])
    throttle.failed("Alice")
    throttle.failed("alice")
    with pytest.raises(RateLimitedError) as e:
        throttle.check("ALICE")
    assert e.value.retry_after == 60
    now[0] += 60.5
    throttle.check("alice")


# -- storage and the audit trail ----------------------------------------------------------------


def test_no_password_token_or_session_id_is_stored_in_the_clear(portal):
    client = portal.client()
    sign_in(client, "admin", password_of("admin"))
    session_id = client.cookies["loft_session"]
    raw = b"".join(p.read_bytes() for p in portal.home.glob("portal.db*"))
    assert raw  # the database (and its WAL) exist
    for role in ROLES:
        assert password_of(role).encode() not in raw
        assert portal.tokens[role].encode() not in raw
    assert session_id.encode() not in raw
    assert b"$argon2id$" in raw
    trail = (portal.home / "audit" / "trail.jsonl").read_bytes()
    assert password_of("admin").encode() not in trail and session_id.encode() not in trail


def test_each_change_is_in_the_audit_trail_with_its_actor(portal):
    name = f"a-{uuid.uuid4().hex[:6]}"
    admin = portal.client()
    csrf = sign_in(admin, "admin", password_of("admin"))
    h = {"X-CSRF-Token": csrf}
    new = {"name": name, "role": "viewer", "password": password_of(name)}
    assert admin.post("/api/users", json=new, headers=h).status_code == 201
    admin.patch(f"/api/users/{name}", json={"role": "curator"}, headers=h)
    admin.patch(f"/api/users/{name}", json={"password": "another long one"}, headers=h)
    admin.patch(f"/api/users/{name}", json={"disabled": True}, headers=h)
    admin.patch(f"/api/users/{name}", json={"disabled": False}, headers=h)
    user = portal.client()
    assert post_login(user, name, "not it").status_code == 401
    user_csrf = sign_in(user, name, "another long one")
    token = user.post("/api/tokens", json={"name": "ci"}, headers={"X-CSRF-Token": user_csrf})
    token_id = token.json()["id"]
    user.delete(f"/api/tokens/{token_id}", headers={"X-CSRF-Token": user_csrf})
    user.post("/logout", data={"csrf_token": user_csrf})

    trail = portal.home / "audit" / "trail.jsonl"
    got = [(e["actor"], e["action"], e["target"]) for e in reversed(audit.read(40, path=trail))]
    expected = [
        ("admin", "user.add", name),
        ("admin", "user.set_role", name),
        ("admin", "user.passwd", name),
        ("admin", "user.disable", name),
        ("admin", "user.enable", name),
        ("anonymous", "auth.login_failed", name),
        (name, "auth.login", name),
        (name, "token.create", token_id),
        (name, "token.revoke", token_id),
        (name, "auth.logout", name),
    ]
    assert got[-len(expected) :] == expected
    entries = audit.read(10, path=trail)
    assert entries[-1]["details"] == {"role": "viewer", "via": "session", "ip": "testclient"}
    assert next(e for e in entries if e["action"] == "user.set_role")["details"]["to"] == "curator"
    assert audit.verify(trail)[0]


# -- the rest of the API's contract --------------------------------------------------------------


def test_lists_paginate(portal):
    client, h = portal.client(), portal.bearer("admin")
    total = client.get("/api/users", headers=h).json()["total"]
    assert total >= 6
    first = client.get("/api/users?limit=2", headers=h).json()
    second = client.get("/api/users?limit=2&offset=2", headers=h).json()
    assert len(first["items"]) == 2 and first["has_more"] and first["total"] == total
    assert {u["name"] for u in first["items"]}.isdisjoint(u["name"] for u in second["items"])
    last = client.get(f"/api/users?limit=2&offset={total - 1}", headers=h).json()
    assert len(last["items"]) == 1 and not last["has_more"]
    for bad in ("limit=0", "limit=501", "offset=-1"):
        r = client.get(f"/api/users?{bad}", headers=h)
        assert r.status_code == 422, bad
        assert r.json()["error"]["type"] == "invalid_request"
    audit_page = client.get("/api/audit?limit=3&offset=1", headers=h).json()
    assert len(audit_page["items"]) == 3 and audit_page["has_more"]


def test_bad_requests_say_what_is_wrong(portal):
    client, h = portal.client(), portal.bearer("admin")
    r = client.post(
        "/api/users", json={"name": "Bad Name", "role": "boss", "password": "x"}, headers=h
    )
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "invalid user name 'Bad Name'" in message and "unknown role 'boss'" in message
    assert "a password needs 8" in message
    r = client.post(
        "/api/users",
        json={"name": "x", "role": "viewer", "password": "longenough", "admin": True},
        headers=h,
    )
    assert r.status_code == 422 and "body.admin" in r.json()["error"]["message"]
    r = client.post(
        "/api/users", json={"name": "viewer", "role": "viewer", "password": "longenough"}, headers=h
    )
    assert r.status_code == 400 and "already exists" in r.json()["error"]["message"]
    r = client.patch("/api/users/ghost", json={"role": "viewer"}, headers=h)
    assert r.status_code == 404
    r = client.patch("/api/users/target", json={}, headers=h)
    assert r.status_code == 400 and "nothing to change" in r.json()["error"]["message"]


def test_the_last_enabled_admin_cannot_be_demoted_or_disabled(portal):
    client, h = portal.client(), portal.bearer("admin")
    for change in ({"role": "viewer"}, {"disabled": True}):
        r = client.patch("/api/users/admin", json=change, headers=h)
        assert r.status_code == 400
        assert "only enabled admin" in r.json()["error"]["message"]
    assert portal.store.get_user("admin").role == "admin"


def test_an_internal_error_is_500_without_a_traceback(portal, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(portal.store, "list_users", broken)
    client = portal.client(raise_server_exceptions=False)
    r = client.get("/api/users", headers=portal.bearer("admin"))
    assert r.status_code == 500
    assert r.json()["error"]["message"].startswith("internal error (RuntimeError)")
    client.cookies = portal.sessions["admin"][0].cookies
    page = client.get("/users")
    assert page.status_code == 500 and "Something went wrong" in page.text
    assert "Traceback" not in page.text and "disk on fire" not in page.text
