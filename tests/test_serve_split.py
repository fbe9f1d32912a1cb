"""Weighted, sticky traffic splits (registry state beside the aliases) and `/v1/feedback`.

Registry tests (unit) run on a LOFT_HOME of this module with two tiny LoRA adapters; the server
tests (integration) serve model ``tickets`` (champion v1, candidate v2) over the tiny random model
through a real uvicorn server, with max_tokens 1 so a thousand requests stay cheap.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from helpers import linked_home, make_lora_adapter, serving

REFRESH = 0.2  # the server's alias_refresh_s
NAME = "tickets"


@dataclass
class Reg:
    home: Path
    adapters: list[Path]  # two PEFT folders (seeds 1 and 2) on the tiny model
    tiny_model: Path


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory, _session_home: Path, tiny_model: Path):
    """This module's LOFT_HOME (models/ linked to the session's) and two adapter folders."""
    root = tmp_path_factory.mktemp("split")
    home = linked_home(root, _session_home)
    adapters = [make_lora_adapter(root / f"a{seed}", tiny_model, seed=seed) for seed in (1, 2)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFT_HOME", str(home))
        yield Reg(home, adapters, tiny_model)


def _model(reg: Reg, name: str, n: int = 3, champion: int | None = 1) -> None:
    """Register ``n`` versions of ``name`` (alternating the two adapters); champion -> 1."""
    from loft import registry

    for i in range(n):
        registry.register(reg.adapters[i % 2], name=name)
    if champion is not None:
        registry.move_alias(name, "champion", champion, reason="test")


# ----------------------------------------------------------------------------- registry


@pytest.mark.unit
def test_set_get_clear_split_history_and_rollback_unaffected(reg: Reg):
    from loft import registry
    from loft.cli.registry import app
    from loft.registry.aliases import previous_version

    _model(reg, "hist-bot")
    registry.move_alias("hist-bot", "champion", 2, reason="second release")
    assert registry.get_split("hist-bot") is None

    plan = {"steps": [5, 25, 100], "step": 0, "gate": [{"expr": "errors <= 0"}]}
    first = registry.set_split("hist-bot", 3, 0.05, reason="start", actor="ana", meta=plan)
    assert first["candidate"] == 3 and first["share"] == 0.05 and first["meta"] == plan
    assert registry.get_split("hist-bot") == first  # meta comes back as it went in
    gate = [{"expr": "error_rate <= 0.01", "passed": True, "reason": "0 <= 0.01"}]
    second = registry.set_split("hist-bot", 3, 0.25, reason="step 2", gate=gate, meta=plan)
    assert (second["salt"], second["since"]) == (first["salt"], first["since"])  # same clients
    other = registry.set_split("hist-bot", 1, 0.1, reason="another candidate")
    assert other["salt"] != first["salt"] and other["meta"] == {}  # a new split, new slice
    cleared = registry.clear_split("hist-bot", reason="abort", gate=gate)
    assert cleared == other
    assert registry.get_split("hist-bot") is None
    assert registry.clear_split("hist-bot") is None  # nothing to clear: nothing recorded

    hist = registry.history("hist-bot")
    splits = [h for h in hist if h.get("event")]
    assert [(h["event"], h["alias"], h["to"], h["share"]) for h in splits] == [
        ("split", None, 3, 0.05),
        ("split", None, 3, 0.25),
        ("split", None, 1, 0.1),
        ("split-cleared", None, 1, 0.1),
    ]
    assert splits[0]["who"] == "ana" and splits[0]["why"] == "start"
    assert splits[0]["previous"] is None
    assert splits[1]["previous"] == {"candidate": 3, "share": 0.05} and splits[1]["gate"] == gate
    assert splits[3]["gate"] == gate and splits[3]["why"] == "abort"
    assert all(h["forced"] is False and h["rollback"] is False for h in splits)
    # alias rollback walks the alias moves only
    assert previous_version("hist-bot", "champion") == 1
    registry.rollback("hist-bot", reason="regression")
    assert registry.get_version("hist-bot@champion").version == 1

    out = CliRunner().invoke(app, ["history", "hist-bot"])
    assert out.exit_code == 0, out.output
    text = out.output
    assert "split: hist-bot:3 takes 5%  by ana  start" in text
    assert "split: hist-bot:3 takes 25% (was 5%)" in text
    assert "split: hist-bot:1 takes 10% (replaces hist-bot:3)" in text
    assert "split ended: hist-bot:1 had 10%; the champion takes all" in text
    assert "gate pass: error_rate <= 0.01" in text
    assert "champion: 2 → 1" in text and "(rollback)" in text


@pytest.mark.unit
def test_set_split_refuses_saying_what_and_what_to_do(reg: Reg):
    from loft import registry
    from loft.core.errors import ConfigError, NotFoundError

    _model(reg, "refuse-bot", n=2)
    with pytest.raises(NotFoundError, match="version 7 of 'refuse-bot' is not in") as e:
        registry.set_split("refuse-bot", 7, 0.1)
    assert "loft registry show refuse-bot" in e.value.hint
    with pytest.raises(NotFoundError, match="'no-bot' is not in the model registry"):
        registry.set_split("no-bot", 1, 0.1)
    with pytest.raises(ConfigError, match=r"refuse-bot:1 is the version refuse-bot already "
                       r"routes to \(@champion\)") as e:  # fmt: skip
        registry.set_split("refuse-bot", 1, 0.1)
    assert "loft registry rollback refuse-bot" in e.value.hint
    with pytest.raises(ConfigError, match=r"25 looks like a percentage: pass 0.25"):
        registry.set_split("refuse-bot", 2, 25)
    for bad in (-0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ConfigError, match="share"):
            registry.set_split("refuse-bot", 2, bad)
    with pytest.raises(ConfigError, match="not plain JSON"):
        registry.set_split("refuse-bot", 2, 0.1, meta={"when": object()})
    with pytest.raises(ConfigError, match="over the 5000 a registered-model tag holds") as e:
        registry.set_split("refuse-bot", 2, 0.1, meta={"blob": "x" * 6000})
    assert "meta" in e.value.hint
    registry.register(reg.tiny_model, name="full-bot")  # an HF model: kind "model"
    registry.register(reg.tiny_model, name="full-bot")
    with pytest.raises(ConfigError, match="full-bot:1 is a full model, not an adapter"):
        registry.set_split("full-bot", 1, 0.1)
    assert registry.get_split("refuse-bot") is None  # nothing was written
    assert not [h for h in registry.history("refuse-bot") if h.get("event")]

    # without a champion the bare name serves the latest version: that is not a candidate
    _model(reg, "latest-bot", n=2, champion=None)
    with pytest.raises(ConfigError, match=r"latest-bot:2 is the version .* \(latest\)"):
        registry.set_split("latest-bot", 2, 0.1)
    assert registry.set_split("latest-bot", 1, 0.3)["candidate"] == 1

    # the candidate of a live split cannot be deleted
    registry.set_split("refuse-bot", 2, 0.1)
    with pytest.raises(ConfigError, match="refuse-bot:2 is the candidate of refuse-bot's"):
        registry.delete_version("refuse-bot:2")
    registry.clear_split("refuse-bot")


class _CountingClient:
    """An MlflowClient that counts the calls made through it."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def __getattr__(self, name: str):
        self.calls.append(name)
        return getattr(self.inner, name)


@pytest.mark.unit
def test_routing_reads_the_split_with_the_aliases_in_one_registry_call(reg: Reg, monkeypatch):
    """The server's refresh reads aliases and split in one round trip: one
    ``get_registered_model`` through MLflow's client (as reading the aliases alone cost), one
    SQLite connection on the embedded store. An unreadable split routes everything to the
    champion; get_split says what is wrong; clear_split removes it."""
    from loft import registry
    from loft.core.errors import IntegrityError
    from loft.registry import splits, store
    from loft.registry.reader import MlflowReader

    _model(reg, "route-bot")
    split = registry.set_split("route-bot", 3, 0.4)
    assert splits.routing("route-bot", "champion") == (1, split)  # embedded: the SQLite reader

    counting = _CountingClient(store.client())
    monkeypatch.setattr(splits, "reader", lambda: MlflowReader(counting))
    assert splits.routing("route-bot", "champion") == (1, split)
    assert counting.calls == ["get_registered_model"]
    counting.calls.clear()
    MlflowReader(counting).aliases("route-bot")
    assert counting.calls == ["get_registered_model"]  # what the aliases alone cost before
    monkeypatch.undo()

    registry.move_alias("route-bot", "prod", 2, reason="test")
    assert splits.routing("route-bot", "prod")[0] == 2  # the server's default alias first

    store.client().set_registered_model_tag("route-bot", splits.SPLIT_TAG, "{not json")
    with pytest.raises(IntegrityError, match="traffic split of route-bot .* is not JSON") as e:
        registry.get_split("route-bot")
    assert "clear_split('route-bot')" in e.value.hint
    assert splits.routing("route-bot", "champion") == (1, None)
    assert registry.clear_split("route-bot") is None  # removed, though unreadable
    assert registry.history("route-bot")[-1]["event"] == "split-cleared"
    assert registry.get_split("route-bot") is None


@pytest.mark.unit
def test_arm_is_sticky_and_grows_with_the_share():
    from loft.registry.splits import arm

    split = {"salt": "s1", "share": 0.1}
    keys = [f"k{i}" for i in range(2000)]
    at10 = {k for k in keys if arm("m", split, k) == "candidate"}
    at50 = {k for k in keys if arm("m", {**split, "share": 0.5}, k) == "candidate"}
    assert at10 < at50 and abs(len(at10) / 2000 - 0.1) < 0.03 and abs(len(at50) / 2000 - 0.5) < 0.05
    assert at10 == {k for k in keys if arm("m", split, k) == "candidate"}  # deterministic
    assert {k for k in keys if arm("m", {"salt": "s2", "share": 0.1}, k) == "candidate"} != at10
    assert all(arm("m", {"salt": "s", "share": 0.0}, k) == "champion" for k in keys[:100])
    assert all(arm("m", {"salt": "s", "share": 1.0}, k) == "candidate" for k in keys[:100])


# ----------------------------------------------------------------------------- serving, in process


@pytest.mark.unit
def test_resolver_applies_the_split_to_bare_names_only():
    from loft.serve.adapters import Resolver

    split = {"candidate": 2, "share": 0.5, "salt": "x"}
    r = Resolver(default_alias="champion", refresh_s=60, clock=time.monotonic)
    r._lookup = lambda name, alias: (name, 9, None) if alias else (name, 1, split)
    routed = {r.route("m", f"k{i}") for i in range(200)}
    assert routed == {("m", 1, "champion"), ("m", 2, "candidate")}
    assert r.route("m", None) == ("m", 1, None)  # no route key: no split (preloading)
    assert r.resolve("m") == ("m", 1)
    assert r.route("m@champion", "k1") == ("m", 9, None)
    assert r.route("m:2", "k1") == ("m", 2, None)


@pytest.mark.unit
def test_route_key_header_then_user_then_api_key_then_random():
    from starlette.requests import Request

    from loft.serve.app import route_key
    from loft.serve.keys import KeyRecord

    def request(header: str | None = None) -> Request:
        headers = [(b"x-loft-route-key", header.encode())] if header else []
        return Request({"type": "http", "headers": headers})

    record = KeyRecord(id="k1", name="app-team")
    assert route_key(request("h-1"), "u-1", record) == "h-1"
    assert route_key(request("  "), "u-1", record) == "u-1"
    assert route_key(request(), None, record) == "app-team"
    assert route_key(request(), "", None) != route_key(request(), "", None)  # a draw each time


@pytest.mark.unit
def test_response_index_is_bounded_and_per_key():
    from loft.core.errors import NotFoundError, PermissionDeniedError
    from loft.serve.feedback import Feedback, ResponseIndex, Served, request_id_of

    assert request_id_of("chatcmpl-abc") == request_id_of("cmpl-abc") == "req-abc"
    assert request_id_of("req-abc") == "req-abc" and request_id_of("other") == "other"
    index = ResponseIndex(capacity=3)
    for i in range(4):
        index.remember(f"req-{i}", Served("app", f"m:{i}", "champion", owner="k-app"))
    assert len(index) == 3

    def fb(i: int) -> Feedback:
        return Feedback(id=f"chatcmpl-{i}", about=f"req-{i}", score=1.0)

    with pytest.raises(NotFoundError, match="remembers the last 3"):
        index.rated(fb(0), "app", "k-app")  # the oldest is forgotten
    assert index.rated(fb(3), "app", "k-app") == Served("app", "m:3", "champion", "k-app")
    with pytest.raises(PermissionDeniedError, match="API key 'other' may not rate"):
        index.rated(fb(3), "other", "k-other")
    with pytest.raises(PermissionDeniedError):  # a new key that took a revoked key's name
        index.rated(fb(3), "app", "k-new")


# ----------------------------------------------------------------------------- serving, over HTTP


@dataclass
class Srv:
    url: str
    keys: dict[str, str]
    audit: Path
    http: httpx.Client

    def post(self, path: str, body: dict | bytes, key: str | None = "app", **headers: str):
        if key is not None:
            headers["Authorization"] = f"Bearer {self.keys[key]}"
        if isinstance(body, dict):
            return self.http.post(self.url + path, json=body, headers=headers)
        return self.http.post(self.url + path, content=body, headers=headers)

    def complete(self, model: str = NAME, key: str | None = "app", route: str | None = None,
                 **body) -> httpx.Response:  # fmt: skip
        headers = {"X-Loft-Route-Key": route} if route is not None else {}
        doc = {"model": model, "prompt": "Hi", "max_tokens": 1, "temperature": 0, **body}
        r = self.post("/v1/completions", doc, key, **headers)
        assert r.status_code == 200, r.text
        return r

    def settle(self) -> None:
        """Wait out the alias cache, then refresh it with one request (after a registry change;
        concurrent requests would be served the cached answer while one refreshes)."""
        time.sleep(REFRESH * 1.5)
        self.complete(route="settle")

    def audit_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


def _arm(r: httpx.Response) -> tuple[str, str | None]:
    return r.headers["X-Loft-Adapter"], r.headers.get("X-Loft-Route")


@pytest.fixture(scope="module")
def srv(reg: Reg):
    from loft.core.specs import ServeConfig
    from loft.serve.app import create_app
    from loft.serve.audit import AuditLog
    from loft.serve.engine import make_engine
    from loft.serve.keys import KeyStore
    from loft.serve.metrics import Metrics

    _model(reg, NAME, n=2)
    store = KeyStore(reg.home / "keys.db")
    keys = {
        "app": store.create("app-team", [NAME])[1],
        "other": store.create("other-team", [NAME])[1],
        "metrics": store.create("prometheus", [], metrics=True)[1],
    }
    cfg = ServeConfig(
        base_model=str(reg.tiny_model), device="cpu", alias_refresh_s=REFRESH,
        max_tokens_limit=4, default_max_tokens=1, batch_wait_ms=1.0,
        max_concurrent_requests=64,
    )  # fmt: skip
    engine = make_engine(cfg)
    engine.start()
    audit = reg.home / "serve" / "audit.jsonl"
    log = AuditLog(audit, False)
    app = create_app(cfg, engine, store, audit=log, metrics=Metrics())
    try:
        with serving(app) as url, httpx.Client(timeout=60) as http:
            yield Srv(url, keys, audit, http)
    finally:
        engine.shutdown()
        log.close()


@pytest.fixture
def split_srv(srv: Srv):
    """The server, with any split the test set cleared afterwards."""
    from loft import registry

    yield srv
    registry.clear_split(NAME, reason="test over")
    srv.settle()


def _route_all(srv: Srv, keys: list[str]) -> dict[str, tuple[str, str | None]]:
    """(adapter, route) per route key, one request each. Sequential on purpose: on 2 cores
    concurrent clients only slow the server down (16 ms a request alone, 45 with 8 clients)."""
    return {k: _arm(srv.complete(route=k)) for k in keys}


@pytest.mark.integration
@pytest.mark.slow
def test_a_90_10_split_over_1000_clients_and_raising_the_share_keeps_candidates(split_srv: Srv):
    from loft import registry
    from loft.registry.splits import arm

    srv = split_srv
    split = registry.set_split(NAME, 2, 0.10, reason="test")
    srv.settle()
    keys = [f"client-{i}" for i in range(1000)]
    got = _route_all(srv, keys)
    assert {v for v in got.values()} == {("tickets:1", "champion"), ("tickets:2", "candidate")}
    on_candidate = {k for k, (_, route) in got.items() if route == "candidate"}
    assert abs(len(on_candidate) / 1000 - 0.10) <= 0.05, len(on_candidate)
    assert on_candidate == {k for k in keys if arm(NAME, split, k) == "candidate"}

    raised = registry.set_split(NAME, 2, 0.50, reason="step 2")
    assert raised["salt"] == split["salt"]
    srv.settle()
    stayed = sorted(on_candidate)
    others = [k for k in keys if k not in on_candidate][:300]
    again = _route_all(srv, stayed + others)
    assert all(again[k] == ("tickets:2", "candidate") for k in stayed)  # nobody moved back
    moved = {k for k in others if again[k][1] == "candidate"}
    assert moved == {k for k in others if arm(NAME, raised, k) == "candidate"}
    assert 0.3 <= len(moved) / len(others) <= 0.6  # (0.5 - 0.1) / 0.9 of the rest move over


@pytest.mark.integration
def test_sticky_per_header_user_and_api_key(split_srv: Srv):
    from loft import registry
    from loft.registry.splits import arm

    srv = split_srv
    split = registry.set_split(NAME, 2, 0.5, reason="test")
    want = {"candidate": ("tickets:2", "candidate"), "champion": ("tickets:1", "champion")}

    def pick(prefix: str, side: str) -> str:
        return next(k for i in range(100) if arm(NAME, split, k := f"{prefix}{i}") == side)

    srv.settle()
    for side in ("candidate", "champion"):
        header, user = pick("header-", side), pick("user-", side)
        assert {_arm(srv.complete(route=header)) for _ in range(20)} == {want[side]}
        assert {_arm(srv.complete(user=user)) for _ in range(20)} == {want[side]}
    # the header wins over the body's user, the user over the API key
    header, user = pick("header-", "candidate"), pick("user-", "champion")
    assert _arm(srv.complete(route=header, user=user)) == want["candidate"]
    assert _arm(srv.complete(route=header, user=user, stream=False)) == want["candidate"]

    # per API key (nothing else given): a new split (new salt) until the two keys differ
    for _ in range(40):
        if arm(NAME, split, "app-team") != arm(NAME, split, "other-team"):
            break
        registry.clear_split(NAME)
        split = registry.set_split(NAME, 2, 0.5, reason="reshuffle")
    srv.settle()
    for key, name in (("app", "app-team"), ("other", "other-team")):
        seen = {_arm(srv.complete(key=key)) for _ in range(20)}
        assert seen == {want[arm(NAME, split, name)]}, (key, seen)


@pytest.mark.integration
def test_alias_and_version_refs_bypass_the_split_and_clearing_restores_the_champion(
    split_srv: Srv,
):
    from loft import registry

    srv = split_srv
    registry.set_split(NAME, 2, 1.0, reason="everything to the candidate")
    srv.settle()
    assert {_arm(srv.complete(route=f"c{i}")) for i in range(10)} == {("tickets:2", "candidate")}
    assert _arm(srv.complete(f"{NAME}@champion", route="c1")) == ("tickets:1", None)
    assert _arm(srv.complete(f"{NAME}:1", route="c1")) == ("tickets:1", None)
    assert _arm(srv.complete(f"{NAME}:2", route="c1")) == ("tickets:2", None)
    status = srv.http.get(
        srv.url + "/v1/loft/status", headers={"Authorization": f"Bearer {srv.keys['metrics']}"}
    ).json()
    entry = next(a for a in status["adapters"] if a["name"] == NAME)
    assert entry["serves"] == "tickets:1"
    assert entry["split"]["candidate"] == "tickets:2" and entry["split"]["share"] == 1.0

    registry.clear_split(NAME, reason="abort")
    time.sleep(REFRESH)  # within alias_refresh_s of the clear, every request is the champion's
    assert {_arm(srv.complete(route=f"c{i}")) for i in range(20)} == {("tickets:1", None)}
    status = srv.http.get(
        srv.url + "/v1/loft/status", headers={"Authorization": f"Bearer {srv.keys['metrics']}"}
    ).json()
    assert next(a for a in status["adapters"] if a["name"] == NAME)["split"] is None


@pytest.mark.integration
def test_audit_lines_carry_the_route_and_metrics_count_both_versions(split_srv: Srv):
    from loft import registry

    srv = split_srv
    registry.set_split(NAME, 2, 0.5, reason="test")
    srv.settle()
    before = len(srv.audit_lines())
    got = _route_all(srv, [f"audit-{i}" for i in range(40)])
    srv.complete(f"{NAME}@champion", route="audit-0")
    lines = srv.audit_lines()[before:]
    assert len(lines) == 41
    routes = {(rec["resolved"], rec["route"]) for rec in lines}
    assert routes == {("tickets:1", "champion"), ("tickets:2", "candidate"), ("tickets:1", None)}
    assert sum(rec["route"] == "candidate" for rec in lines) == sum(
        route == "candidate" for _, route in got.values()
    )
    assert all(rec["about"] is None and rec["score"] is None for rec in lines)

    metrics = srv.http.get(
        srv.url + "/metrics", headers={"Authorization": f"Bearer {srv.keys['metrics']}"}
    ).text
    for version in ("tickets:1", "tickets:2"):
        assert f'loft_requests_total{{model="{version}",status="200"}}' in metrics
        assert f'loft_request_latency_seconds_count{{model="{version}"}}' in metrics


@pytest.mark.integration
def test_feedback_is_attributed_to_the_version_and_route_that_answered(split_srv: Srv):
    from loft import registry

    srv = split_srv
    registry.set_split(NAME, 2, 0.5, reason="test")
    srv.settle()
    chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    r = srv.post("/v1/chat/completions", chat, "app", **{"X-Loft-Route-Key": "fb-1"})
    assert r.status_code == 200, r.text
    rid, (version, route) = r.json()["id"], _arm(r)
    assert rid.startswith("chatcmpl-") and route in ("champion", "candidate")
    about = "req-" + rid.removeprefix("chatcmpl-")
    assert r.headers["X-Request-Id"] == about

    ok = srv.post("/v1/feedback", {"id": rid, "thumbs": "up", "comment": "spot on"})
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"object": "feedback", "id": rid, "score": 1.0}
    rec = srv.audit_lines()[-1]
    assert rec["endpoint"] == "/v1/feedback" and rec["status"] == 200 and rec["error"] is None
    assert (rec["key"], rec["about"], rec["score"]) == ("app-team", about, 1.0)
    assert (rec["resolved"], rec["route"]) == (version, route)
    assert rec["request_id"] != about and "comment" not in rec  # text only with log_prompts
    by_request_id = srv.post("/v1/feedback", {"id": about, "score": 0.25})
    assert by_request_id.json()["score"] == 0.25 and srv.audit_lines()[-1]["score"] == 0.25

    stream = srv.post("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 1,
                                          "stream": True}, "app")  # fmt: skip
    first = json.loads(stream.text.split("\n\n")[0].removeprefix("data: "))
    assert srv.post("/v1/feedback", {"id": first["id"], "thumbs": "down"}).status_code == 200
    assert srv.audit_lines()[-1]["score"] == 0.0

    def refused(status: int, body, key: str | None = "app") -> dict:
        resp = srv.post("/v1/feedback", body, key)
        assert resp.status_code == status, resp.text
        return resp.json()["error"]

    n = len(srv.audit_lines())
    err = refused(404, {"id": "chatcmpl-00000000deadbeef", "thumbs": "up"})
    assert err["type"] == "not_found_error" and "no response with id" in err["message"]
    err = refused(403, {"id": rid, "thumbs": "down"}, "other")
    assert err["type"] == "permission_error" and "another key received it" in err["message"]
    assert refused(401, {"id": rid, "thumbs": "up"}, None)["type"] == "authentication_error"
    for body, param in (
        (b"not json", None),
        ({"thumbs": "up"}, "id"),
        ({"id": 7, "thumbs": "up"}, "id"),
        ({"id": rid}, "score"),
        ({"id": rid, "score": 1.5}, "score"),
        ({"id": rid, "score": True}, "score"),
        ({"id": rid, "thumbs": "sideways"}, "thumbs"),
        ({"id": rid, "score": 1, "thumbs": "up"}, "thumbs"),
        ({"id": rid, "thumbs": "up", "comment": "x" * 2001}, "comment"),
    ):
        err = refused(400, body)
        assert err["type"] == "invalid_request_error" and err["param"] == param, (body, err)
    lines = srv.audit_lines()[n:]  # refusals are audited too, without a score
    assert [rec["status"] for rec in lines] == [404, 403, 401] + [400] * 9
    assert all(rec["score"] is None and rec["resolved"] is None for rec in lines)
    assert lines[1]["key"] == "other-team" and lines[1]["about"] == about

    metrics = srv.http.get(
        srv.url + "/metrics", headers={"Authorization": f"Bearer {srv.keys['metrics']}"}
    ).text
    assert f'loft_feedback_score_count{{model="{version}"}}' in metrics
