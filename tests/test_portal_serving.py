"""The portal's serving page and API, in-process: every role against every route, which version
each name serves with its traffic split, what the page says with no server or an unreachable one,
per-model traffic and latency summarised from a server's real /metrics text, and serving keys
(the secret shown once, revoked keys refused at once, both audited)."""

from __future__ import annotations

import json
import uuid

import pytest
from fastapi.testclient import TestClient

from loft.core import audit
from portal_client import Portal, check_route, matrix_cases, portal_for
from test_portal_registry import write_adapter

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def portal(tmp_path_factory) -> Portal:
    """bot:1 (champion) and bot:2 taking 25% of bot's traffic; one key."""
    root = tmp_path_factory.mktemp("serving_portal")
    with portal_for(root / "home") as p, pytest.MonkeyPatch.context() as mp:
        from loft import registry

        mp.delenv("LOFT_SERVE_URL", raising=False)
        for seed in (1, 2):
            registry.register(write_adapter(root / f"a{seed}", seed), name="bot")
        registry.move_alias("bot", "champion", 1, reason="setup")
        registry.set_split("bot", 2, 0.25, reason="setup")
        yield p


#                                            admin curator annotator engineer viewer
API_MATRIX = {
    "GET /api/serving":                         "yes   yes     no        yes      yes",
    "GET /api/serving/server":                  "yes   yes     no        yes      yes",
    "GET /api/serving/keys":                    "yes   no      no        no       no",
    "POST /api/serving/keys":                   "yes   no      no        no       no",
    "DELETE /api/serving/keys/{key}":           "yes   no      no        no       no",
}  # fmt: skip
PAGE_MATRIX = {
    "GET /serving":                             "yes   yes     no        yes      yes",
    "POST /serving/keys":                       "yes   no      no        no       no",
    "POST /serving/keys/{key}/revoke":          "yes   no      no        no       no",
}  # fmt: skip
CASES = matrix_cases(API_MATRIX)
PAGES = matrix_cases(PAGE_MATRIX)


def _new_key() -> str:
    from loft.serve.keys import KeyStore

    return KeyStore().create(f"k-{uuid.uuid4().hex[:8]}", ["bot"])[0].id


def send(client: TestClient, method: str, path: str, headers: dict):
    path = path.replace("{key}", _new_key())
    body = {"name": f"n-{uuid.uuid4().hex[:8]}", "adapters": ["bot"]} if method == "POST" else None
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize("via", ["token", "session"])
@pytest.mark.parametrize(("route", "role", "allowed"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_role_against_every_api_route(portal, route, role, allowed, via):
    check_route(portal, route, role, allowed, via, send)


@pytest.mark.parametrize(("route", "role", "allowed"), PAGES, ids=[f"{c[0]}-{c[1]}" for c in PAGES])
def test_every_role_against_every_page(portal, route, role, allowed):
    client, headers = portal.as_role(role, "session")
    method, path = route.split(" ", 1)
    data = {
        "csrf_token": headers["X-CSRF-Token"],
        "name": f"p-{uuid.uuid4().hex[:8]}",
        "adapters": "bot",
    }
    r = client.request(
        method, path.replace("{key}", _new_key()), data=data if method == "POST" else None
    )
    assert r.status_code == (200 if allowed else 403), (route, role, r.text[:300])


def test_routes_show_what_each_name_serves_and_its_split(portal):
    client, headers = portal.as_role("viewer")
    (bot,) = client.get("/api/serving", headers=headers).json()["items"]
    assert bot["serves"] == 1 and bot["aliases"] == {"champion": 1}
    assert bot["split"]["candidate"] == 2 and bot["split"]["share"] == 0.25
    html = client.get("/serving", headers=headers).text
    assert "bot:2 takes 25%" in html and "(75%)" in html
    assert 'id="keys"' not in html  # keys are for keys.manage only


def test_without_a_server_the_page_says_so_and_an_unreachable_one_is_named(portal, monkeypatch):
    from helpers import free_port

    client, headers = portal.as_role("engineer")
    live = client.get("/api/serving/server", headers=headers).json()
    assert not live["configured"] and "no model server is configured" in live["error"]
    assert "no model server is configured" in client.get("/serving", headers=headers).text
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("LOFT_SERVE_URL", url)
    live = client.get("/api/serving/server", headers=headers).json()
    assert (
        live["configured"]
        and not live["reachable"]
        and f"no server answers at {url}" in live["error"]
    )


def test_traffic_and_latency_per_model_from_the_servers_metrics():
    """summarise() reads what the server's Metrics writes: requests, errors, tokens, latency."""
    from loft.serve.metrics import Metrics, summarise

    m = Metrics()
    for latency in (0.02, 0.03, 0.04, 0.2):
        m.observe_request("bot:1", 200, latency, prompt_tokens=5, completion_tokens=7)
    m.observe_request("bot:2", 500, 3.0, error_type="internal")
    m.observe_request(None, 401, 0.001)
    text, _ = m.render()
    rows = {r["model"]: r for r in summarise(text.decode())}
    b1 = rows["bot:1"]
    assert (b1["requests"], b1["errors"], b1["prompt_tokens"], b1["completion_tokens"]) == (
        4,
        0,
        20,
        28,
    )
    assert b1["latency_mean_s"] == pytest.approx(0.0725)
    assert 0.025 <= b1["latency_p50_s"] <= 0.05 and 0.1 <= b1["latency_p95_s"] <= 0.25
    assert rows["bot:2"]["errors"] == 1 and 2.5 <= rows["bot:2"]["latency_p95_s"] <= 5
    assert rows["-"]["requests"] == 1 and list(rows)[0] == "bot:1"  # busiest first


def test_a_key_secret_is_shown_once_and_a_revoked_key_stops_at_once(portal):
    from loft.core.errors import AuthenticationError
    from loft.serve.keys import KeyStore

    client, headers = portal.as_role("admin", "session")
    form = {
        "csrf_token": headers["X-CSRF-Token"],
        "name": "ci",
        "adapters": "bot",
        "rate": "60/min",
        "metrics": "true",
    }
    r = client.post("/serving/keys", data=form)
    assert r.status_code == 200 and "only time it is shown" in r.text
    secret = r.text.split("<pre><code>", 1)[1].split("</code>", 1)[0]
    record = KeyStore().authenticate(secret)
    assert record.name == "ci" and record.adapters == ["bot"] and record.metrics
    again = client.get("/serving").text
    assert secret not in again and "ci" in again
    listed = client.get("/api/serving/keys?limit=500", headers=headers).json()
    assert secret not in json.dumps(listed) and any(k["name"] == "ci" for k in listed["items"])
    assert secret not in KeyStore().path.read_bytes().decode("latin-1")
    entry = json.loads(audit.trail_path().read_text().splitlines()[-1])
    assert entry["action"] == "key.create" and entry["actor"] == "admin"
    assert secret not in audit.trail_path().read_text()

    gone = client.post(f"/serving/keys/{record.id}/revoke", data={"csrf_token": form["csrf_token"]})
    assert gone.status_code == 200 and f"revoked key ci ({record.id})" in gone.text
    with pytest.raises(AuthenticationError, match="revoked"):
        KeyStore().authenticate(secret)

    # the API: 201 with the secret under "key", once; bad input all at once
    client, bearer = portal.as_role("admin")
    made = client.post("/api/serving/keys", json={"name": "svc", "adapters": ["*"]}, headers=bearer)
    assert made.status_code == 201 and made.json()["key"].startswith("loft-")
    bad = client.post(
        "/api/serving/keys", json={"name": "bad name", "rate": "fast"}, headers=bearer
    )
    msg = bad.json()["error"]["message"]
    assert bad.status_code == 400 and "invalid key name" in msg and "invalid rate" in msg
    assert client.delete("/api/serving/keys/svc", headers=bearer).json()["status"] == "revoked"
    assert client.delete("/api/serving/keys/svc", headers=bearer).status_code == 404
