"""The portal's registry and compare pages and API, in-process: every role against every route,
versions against the champion, the lineage graph, promotion through a gate that refuses (each
check shown, nothing moved, audited) or passes, force, rollback, and blind comparisons with their
votes, win rates on the cards and preference datasets. No model is loaded here: versions are
adapter folders written with numpy, and comparisons get their answers from a fixed function (a
real `loft serve` answers them in tests/test_portal_browser_registry.py)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loft.core import audit
from portal_client import Portal, check_route, matrix_cases, portal_for

pytestmark = pytest.mark.unit

GATE = ["eval_loss <= champion + 0.02", "eval_loss <= 100"]


def write_adapter(folder: Path, seed: int, lineage: dict | None = None) -> Path:
    """A PEFT-shaped LoRA folder (config + safetensors), enough for the registry to register."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    cfg = {
        "peft_type": "LORA",
        "base_model_name_or_path": "tiny-llama",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(seed)
    save_file(
        {
            "base_model.model.layers.0.q_proj.lora_A.weight": rng.standard_normal((2, 8)).astype(
                np.float32
            )
        },
        str(folder / "adapter_model.safetensors"),
    )
    base = {"base_model": {"name": "tiny-llama", "sha256": "ab" * 32, "source": "test"}}
    (folder / "lineage.json").write_text(json.dumps({**base, **(lineage or {})}))
    return folder


def scored(ref: str, value: float, fingerprint: str = "f" * 64) -> None:
    """Record eval_loss for ``ref`` as `loft eval` does, on one held-out file's basis."""
    from loft import registry
    from loft.registry.evaluations import make_entries, on_data

    on = on_data("/held/out.jsonl", fingerprint, 4, "eval_loss", {"max_new_tokens": 64})
    registry.record_evaluation(ref, make_entries({"eval_loss": value}, on=on, source="eval"))


def answer(ref: str, prompt: str, max_tokens: int) -> str:
    return f"{ref} says: {prompt[::-1]}"


@pytest.fixture(scope="module")
def portal(tmp_path_factory) -> Portal:
    """bot:1 (champion, eval_loss 1.0), bot:2 (worse, 2.0), bot:3 (a DPO stage initialised from
    bot:1 on a catalog dataset, 0.9), every metric on the same records; a comparison of all three
    with one vote cast."""
    root = tmp_path_factory.mktemp("registry_portal")
    with portal_for(root / "home") as p:
        from loft import registry
        from loft.data.catalog import add_version
        from loft.registry.comparisons import ComparisonStore

        data = add_version(
            "chats",
            [
                {
                    "messages": [
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"},
                    ]
                }
            ],
            source={"kind": "upload"},
        )
        registry.register(write_adapter(root / "a1", 1), name="bot")
        registry.register(write_adapter(root / "a2", 2), name="bot")
        dpo = {"config": {"objective": "dpo", "data": {"train": str(data.path)}, "gate": GATE}}
        registry.register(write_adapter(root / "a3", 3, dpo), name="bot", parent="bot:1")
        for ref, loss in (("bot:1", 1.0), ("bot:2", 2.0), ("bot:3", 0.9)):
            scored(ref, loss)
        registry.move_alias("bot", "champion", 1, reason="setup")
        store = ComparisonStore()
        comp = store.create(
            ["bot:1", "bot:2", "bot:3"], ["one", "two", "three", "four"], answer, created_by="setup"
        )
        store.vote(comp.id, "setup", 0, 0, "left")
        p.comparison = comp.id  # type: ignore[attr-defined]
        yield p


# -- every role x every route ---------------------------------------------------------------------

#                                              admin curator annotator engineer viewer
API_MATRIX = {
    "GET /api/registry":                          "yes   yes     no        yes      yes",
    "GET /api/registry/bot":                      "yes   yes     no        yes      yes",
    "GET /api/registry/bot/history":              "yes   yes     no        yes      yes",
    "GET /api/registry/bot/3":                    "yes   yes     no        yes      yes",
    "POST /api/registry/bot/3/promote":           "yes   no      no        yes      no",
    "POST /api/registry/bot/rollback":            "yes   no      no        yes      no",
    "GET /api/compare":                           "yes   yes     no        yes      no",
    "GET /api/compare/{c}":                       "yes   yes     no        yes      no",
    "GET /api/compare/{c}/next":                  "yes   yes     no        yes      no",
    "POST /api/compare/{c}/votes":                "yes   yes     no        yes      no",
    "POST /api/compare/{c}/dataset":              "yes   yes     no        yes      no",
}  # fmt: skip
PAGE_MATRIX = {
    "GET /registry":                              "yes   yes     no        yes      yes",
    "GET /registry/bot":                          "yes   yes     no        yes      yes",
    "GET /registry/bot/3":                        "yes   yes     no        yes      yes",
    "GET /compare":                               "yes   yes     no        yes      no",
    "GET /compare/{c}":                           "yes   yes     no        yes      no",
}  # fmt: skip
CASES = matrix_cases(API_MATRIX)
PAGES = matrix_cases(PAGE_MATRIX)


def _send(portal: Portal):
    def send(client: TestClient, method: str, path: str, headers: dict):
        from loft import registry

        unique = uuid.uuid4().hex[:8]
        path = path.replace("{c}", portal.comparison)  # type: ignore[attr-defined]
        body = None
        if path.endswith("/promote"):
            body = {"to": f"a{unique}", "reason": "matrix"}  # a new alias: the gate passes
        elif path.endswith("/rollback"):
            alias = f"r{unique}"
            registry.move_alias("bot", alias, 1, reason="setup")
            registry.move_alias("bot", alias, 2, reason="setup")
            body = {"alias": alias}
        elif path.endswith("/votes"):
            task = client.get(path.replace("/votes", "/next"), headers=headers).json().get("task")
            task = task or {"prompt_index": 0, "pair": 0}  # a role that may not even look
            body = {"prompt": task["prompt_index"], "pair": task["pair"], "choice": "right"}
        elif path.endswith("/dataset"):
            body = {"name": f"prefs-{unique}"}
        return client.request(method, path, json=body, headers=headers)

    return send


@pytest.mark.parametrize("via", ["token", "session"])
@pytest.mark.parametrize(("route", "role", "allowed"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_role_against_every_api_route(portal, route, role, allowed, via):
    check_route(portal, route, role, allowed, via, _send(portal))


@pytest.mark.parametrize(("route", "role", "allowed"), PAGES, ids=[f"{c[0]}-{c[1]}" for c in PAGES])
def test_every_role_against_every_page(portal, route, role, allowed):
    client, _ = portal.as_role(role, "session")
    r = client.get(route.split(" ", 1)[1].replace("{c}", portal.comparison))
    assert r.status_code == (200 if allowed else 403), (route, role, r.text[:300])
    assert "text/html" in r.headers["content-type"]


def test_creating_a_comparison_needs_the_compare_role_and_a_model_server(portal):
    """POST /api/compare and the form: 403 for roles without registry.compare; for the others a
    400 that says no model server is configured (the browser test runs one)."""
    body = {"versions": ["bot:1", "bot:2"], "prompts": ["hi"]}
    for role in ("annotator", "viewer"):
        client, headers = portal.as_role(role)
        assert client.post("/api/compare", json=body, headers=headers).status_code == 403
        client, headers = portal.as_role(role, "session")
        form = {"versions": "bot:1\nbot:2", "prompts": "hi", "csrf_token": headers["X-CSRF-Token"]}
        assert client.post("/compare", data=form).status_code == 403
    client, headers = portal.as_role("engineer")
    r = client.post("/api/compare", json=body, headers=headers)
    assert r.status_code == 400 and "no model server is configured" in r.json()["error"]["message"]
    bad = client.post(
        "/api/compare", json={"versions": ["bot:1", "bot:9"], "prompts": [""]}, headers=headers
    )
    message = bad.json()["error"]["message"]
    assert (
        bad.status_code == 400
        and "version 9 of 'bot'" in message
        and "prompt 1 is empty" in message
    )


# -- reads --------------------------------------------------------------------------------------


def test_models_paginate_and_versions_show_metrics_against_the_champion(portal):
    client, headers = portal.as_role("viewer")
    models = client.get("/api/registry?limit=1", headers=headers).json()
    assert models["total"] == 1 and models["items"][0]["name"] == "bot"
    assert models["items"][0]["n_versions"] == 3
    page = client.get("/api/registry/bot?limit=2", headers=headers).json()
    assert page["total"] == 3 and page["has_more"] and page["champion"] == 1
    assert [v["version"] for v in page["items"]] == [3, 2]
    (m3,) = page["items"][0]["metrics"]
    assert m3["champion"] == 1.0 and m3["delta"] == pytest.approx(-0.1) and m3["comparable"]
    rest = client.get("/api/registry/bot?limit=2&offset=2", headers=headers).json()
    assert [v["version"] for v in rest["items"]] == [1]
    assert "champion" in rest["items"][0]["aliases"]
    assert client.get("/api/registry/nope", headers=headers).status_code == 404


def test_version_page_has_its_lineage_graph_from_base_and_dataset_through_the_dpo_stage(portal):
    client, headers = portal.as_role("viewer")
    v = client.get("/api/registry/bot/3", headers=headers).json()
    graph = v["lineage_graph"]
    ids = {n["id"]: n for n in graph["nodes"]}
    assert {"version:bot:3", "version:bot:1", "base:tiny-llama", "dataset:chats:1"} <= set(ids)
    run3 = next(n for n in graph["nodes"] if n["kind"] == "run" and n["detail"] == "dpo")
    edges = {(e["from"], e["to"], e["label"]) for e in graph["edges"]}
    assert ("version:bot:1", run3["id"], "init from") in edges
    assert ("dataset:chats:1", run3["id"], "data") in edges
    assert (run3["id"], "version:bot:3", "") in edges
    assert v["config_gate"] == GATE and v["versus_champion"][0]["delta"] == pytest.approx(-0.1)
    html = client.get("/registry/bot/3", headers=headers).text
    assert '<svg id="lineage"' in html and "init from" in html and "chats:1" in html
    assert "style=" not in html and "<script>" not in html  # CSP: no inline style or script


# -- promote and roll back ------------------------------------------------------------------------


def test_a_failing_gate_refuses_and_shows_each_check_then_force_and_rollback(portal):
    from loft.registry import history
    from loft.registry.store import resolve

    client, headers = portal.as_role("engineer")
    r = client.post(
        "/api/registry/bot/2/promote", json={"gate": GATE, "to": "champion"}, headers=headers
    )
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["error"]["type"] == "gate_refused"
    checks = {c["expr"]: c for c in body["promotion"]["checks"]}
    relative = checks["eval_loss <= champion + 0.02"]
    assert not relative["passed"] and relative["value"] == 2.0
    assert relative["threshold"] == pytest.approx(1.02)
    assert checks["eval_loss <= 100"]["passed"]
    assert resolve("bot@champion")[1] == 1  # nothing moved
    refused = _last_audit()
    assert refused["action"] == "registry.promote_refused" and refused["actor"] == "engineer"

    # the same through the page: each check in the table, 409
    sclient, sheaders = portal.as_role("engineer", "session")
    form = {"to": "champion", "gate": "\n".join(GATE), "csrf_token": sheaders["X-CSRF-Token"]}
    page = sclient.post("/registry/bot/2/promote", data=form)
    assert page.status_code == 409
    assert "eval_loss &lt;= champion + 0.02" in page.text and "FAIL" in page.text
    assert "2 &gt; 1.02" in page.text

    # force moves it, recorded as forced with the acting user
    forced = client.post(
        "/api/registry/bot/2/promote",
        json={"gate": GATE, "force": True, "reason": "hotfix"},
        headers=headers,
    )
    assert forced.status_code == 200 and forced.json()["forced"] is True
    last = history("bot")[-1]
    assert (last["to"], last["forced"], last["who"], last["why"]) == (2, True, "engineer", "hotfix")

    # roll back: champion returns to bot:1, by the engineer
    back = client.post("/api/registry/bot/rollback", json={"alias": "champion"}, headers=headers)
    assert back.status_code == 200 and (back.json()["from"], back.json()["to"]) == (2, 1)
    assert history("bot")[-1]["who"] == "engineer" and resolve("bot@champion")[1] == 1
    assert _last_audit()["action"] == "registry.rollback"

    # the config gate of bot:3 (DPO) passes: 0.9 <= 1.0 + 0.02
    ok = sclient.post(
        "/registry/bot/3/promote", data={"to": "champion", "csrf_token": sheaders["X-CSRF-Token"]}
    )
    assert ok.status_code == 200 and "champion: 1 → 3" in ok.text and "pass" in ok.text
    assert resolve("bot@champion")[1] == 3
    rolled = sclient.post(
        "/registry/bot/rollback", data={"alias": "champion", "csrf_token": sheaders["X-CSRF-Token"]}
    )
    assert rolled.status_code == 200 and "rolled @champion back" in rolled.text
    assert resolve("bot@champion")[1] == 1


def test_a_champion_without_a_comparable_number_is_not_measured_by_the_portal(portal):
    """Promotion in the portal never loads a model: a champion scored on other records fails
    the relative check, saying why and what to run."""
    from loft import registry

    registry.move_alias("bot", "other", 1, reason="setup")
    scored("bot:2", 0.5, fingerprint="e" * 64)  # bot:2's newest number: records bot:1 never saw
    client, headers = portal.as_role("admin")
    r = client.post(
        "/api/registry/bot/2/promote", json={"gate": GATE[:1], "to": "other"}, headers=headers
    )
    assert r.status_code == 409
    (check,) = r.json()["promotion"]["checks"]
    assert "not comparable" in check["reason"] and "does not load models" in check["reason"]


def _last_audit() -> dict:
    lines = audit.trail_path().read_text().splitlines()
    return json.loads(lines[-1])


# -- compare: blind votes, win rates, datasets -------------------------------------------------


def test_blind_votes_reveal_after_voting_and_win_rates_reach_the_cards(portal):
    from loft.registry import get_version

    cid = portal.comparison
    client, headers = portal.as_role("curator")
    before = client.get(f"/api/compare/{cid}", headers=headers).json()
    assert "outputs" not in before and not before["finished"]
    html = client.get(f"/compare/{cid}", headers=headers).text
    assert "Left is better" in html and "bot:1 says" not in html  # answers shown, versions not
    task = client.get(f"/api/compare/{cid}/next", headers=headers).json()["task"]
    assert set(task) >= {"prompt", "left", "right"} and "bot:" not in json.dumps(
        {k: task[k] for k in ("prompt_index", "pair", "prompt")}
    )
    choice = {"prompt": task["prompt_index"], "pair": task["pair"], "choice": "left"}
    reveal = client.post(f"/api/compare/{cid}/votes", json=choice, headers=headers).json()
    assert reveal["winner"] == reveal["left"] and task["left"].startswith(reveal["left"])
    again = client.post(f"/api/compare/{cid}/votes", json=choice, headers=headers)
    assert again.status_code == 400 and "already voted" in again.json()["error"]["message"]
    card = get_version(reveal["left"], verify=False).card["preference"]
    assert card["votes"] >= 1 and card["wins"] >= 1 and 0 < card["win_rate"] <= 1
    assert reveal["right"] in card["against"]
    while (t := client.get(f"/api/compare/{cid}/next", headers=headers).json()["task"]) is not None:
        vote = {"prompt": t["prompt_index"], "pair": t["pair"], "choice": "tie"}
        assert (
            client.post(f"/api/compare/{cid}/votes", json=vote, headers=headers).status_code == 201
        )
    after = client.get(f"/api/compare/{cid}", headers=headers).json()
    assert after["finished"] and after["outputs"][0]["bot:1"] == "bot:1 says: eno"
    assert "Side by side" in client.get(f"/compare/{cid}", headers=headers).text


def test_votes_save_as_a_preference_dataset_with_the_comparison_as_source(portal):
    from loft.data.catalog import get_version, read_records

    cid = portal.comparison
    client, headers = portal.as_role("engineer", "session")
    r = client.post(
        f"/compare/{cid}/dataset", data={"name": "bot-prefs", "csrf_token": headers["X-CSRF-Token"]}
    )
    assert r.status_code == 200 and "saved" in r.text and "bot-prefs:1" in r.text
    dv = get_version("bot-prefs:1")
    assert dv.layout == "preference" and dv.source["kind"] == "comparison"
    assert dv.source["comparison"] == cid and dv.created_by == "engineer"
    rec = read_records("bot-prefs:1", 0, 1)[0]
    assert rec["prompt"][0]["content"] in ("one", "two", "three", "four")
    assert rec["chosen"][0]["content"] != rec["rejected"][0]["content"]
