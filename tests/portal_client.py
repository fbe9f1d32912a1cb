"""The portal through its HTTP interface in-process (FastAPI's TestClient on create_app()): a
user per role with an API token and a signed-in session, and the role x route matrix check every
area's tests use. Plain helpers; browser tests use tests/browser.py instead."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loft.portal.app import create_app
from loft.portal.store import PortalStore

ROLES = ("admin", "curator", "annotator", "engineer", "viewer")
API_MATRIX_HEADER = "admin curator annotator engineer viewer"
META = re.compile(r'<meta name="csrf-token" content="([^"]*)">')


def password_of(name: str) -> str:
    return f"correct horse {name} staple"


@dataclass
class Portal:
    home: Path
    store: PortalStore
    app: object
    tokens: dict[str, str] = field(default_factory=dict)  # role -> API token secret
    sessions: dict[str, tuple[TestClient, str]] = field(default_factory=dict)  # role -> (c, csrf)

    def client(self, **kw) -> TestClient:
        return TestClient(self.app, **kw)

    def bearer(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def as_role(self, role: str, via: str = "token") -> tuple[TestClient, dict[str, str]]:
        """A client and the headers that act as ``role``'s user, by API token or by session
        (cookie + X-CSRF-Token)."""
        if via == "token":
            return self.client(), self.bearer(role)
        client, csrf = self.sessions[role]
        return client, {"X-CSRF-Token": csrf}


def post_login(client: TestClient, name: str, password: str, csrf: str | None = None):
    """The sign-in form's POST (with the token of a freshly loaded form unless ``csrf``)."""
    data = {"name": name, "password": password, "next": "/"}
    data["csrf_token"] = csrf if csrf is not None else csrf_of(client.get("/login"))
    return client.post("/login", data=data, follow_redirects=False)


def sign_in(client: TestClient, name: str, password: str) -> str:
    """Sign in through the form as a browser does; return the session's CSRF token."""
    r = post_login(client, name, password)
    assert r.status_code == 303, r.text
    return csrf_of(client.get("/"))


def csrf_of(response) -> str:
    m = META.search(response.text)
    assert m, response.text[:500]
    return m.group(1)


@contextlib.contextmanager
def portal_for(home: Path) -> Iterator[Portal]:
    """A portal over LOFT_HOME=``home`` (set while the context lasts): a user per role, named
    after it, each with an API token and a signed-in session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFT_HOME", str(home))
        mp.delenv("LOFT_PORTAL_SESSION_HOURS", raising=False)
        store = PortalStore()
        p = Portal(home, store, create_app(store))
        for role in ROLES:
            store.add_user(role, role, password_of(role), actor="setup")
            p.tokens[role] = store.create_token(role, "main", actor="setup")[1]
            client = p.client()
            p.sessions[role] = (client, sign_in(client, role, password_of(role)))
        yield p


def matrix_cases(matrix: dict[str, str]) -> list[tuple[str, str, bool]]:
    """``{"GET /api/x": "yes no no yes yes"}`` (one cell per role, in ROLES order) as
    (route, role, allowed) cases for pytest.mark.parametrize."""
    return [
        (route, role, cell == "yes")
        for route, row in matrix.items()
        for role, cell in zip(ROLES, row.split(), strict=True)
    ]


def check_route(
    portal: Portal,
    route: str,
    role: str,
    allowed: bool,
    via: str,
    send: Callable[[TestClient, str, str, dict[str, str]], Any],
) -> Any:
    """Call ``route`` as ``role`` (``send(client, method, path, headers)`` makes the request with
    whatever body it needs) and check the answer: 2xx when the table allows it, else 403
    ``permission_denied`` naming the role."""
    client, headers = portal.as_role(role, via)
    method, path = route.split(" ", 1)
    r = send(client, method, path, headers)
    if allowed:
        assert 200 <= r.status_code < 300, (route, role, r.status_code, r.text[:500])
    else:
        assert r.status_code == 403, (route, role, r.status_code, r.text[:500])
        err = r.json()["error"]
        assert err["type"] == "permission_denied"
        assert f"({role}) may not" in err["message"]
    return r
