"""Gradual rollout (issue 17): a candidate's share of live traffic grows step by step while a gate
holds on the live comparison with the champion, measured from a real server's audit log and the
feedback its clients post; a worse candidate is aborted with the champion restored."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers import free_port, linked_home, make_lora_adapter, run_cli

GATE = """gate:
  - requests >= 5
  - error_rate <= champion + 0.05
  - feedback_score >= champion
"""


@pytest.fixture
def serve_bot(tmp_path: Path, tiny_model: Path, _session_home: Path, monkeypatch):
    """``serve_bot(n)``: bot:1..n registered (bot:1 the champion) and served over the tiny model
    without keys by a real uvicorn server in this process; returns its url, audit log, gate."""
    import uvicorn

    from loft import registry
    from loft.core.specs import ServeConfig
    from loft.serve.app import create_app
    from loft.serve.audit import AuditLog
    from loft.serve.engine import make_engine
    from loft.serve.metrics import Metrics

    home = linked_home(tmp_path, _session_home)
    monkeypatch.setenv("LOFT_HOME", str(home))
    (tmp_path / "gate.yaml").write_text(GATE)
    stop = []

    def start(versions: int) -> dict:
        for seed in range(1, versions + 1):
            folder = make_lora_adapter(tmp_path / f"bot{seed}", tiny_model, seed=seed)
            registry.register(folder, name="bot")
        registry.move_alias("bot", "champion", 1, reason="test")
        cfg = ServeConfig(base_model=str(tiny_model), device="cpu", alias_refresh_s=0.05,
                          max_tokens_limit=2, default_max_tokens=1, batch_wait_ms=1.0)  # fmt: skip
        engine = make_engine(cfg)
        engine.start()
        audit = home / "serve" / "audit.jsonl"
        app = create_app(cfg, engine, None, audit=AuditLog(audit, False), metrics=Metrics())
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        stop.append((srv, thread, engine))
        deadline = time.monotonic() + 30
        while not srv.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return {"url": f"http://127.0.0.1:{port}", "audit": audit, "gate": tmp_path / "gate.yaml",
                "home": home}  # fmt: skip

    yield start
    for srv, thread, engine in stop:
        srv.should_exit = True
        thread.join(timeout=30)
        engine.shutdown()


@pytest.fixture
def server(serve_bot):
    return serve_bot(2)


def _traffic(url: str, n: int, scores: dict[str, float], tag: str) -> dict[str, int]:
    """``n`` clients (one route key each) ask once and rate the answer by the version that gave
    it; returns requests per version."""
    seen: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(n):
            r = http.post(
                "/v1/chat/completions",
                json={"model": "bot", "messages": [{"role": "user", "content": f"hi {i}"}]},
                headers={"X-Loft-Route-Key": f"{tag}-client-{i}"},
            )
            assert r.status_code == 200, r.text
            ref = r.headers["X-Loft-Adapter"]
            seen[ref] = seen.get(ref, 0) + 1
            fb = http.post("/v1/feedback", json={"id": r.json()["id"], "score": scores[ref]})
            assert fb.status_code == 200, fb.text
    return seen


def _kinds(name: str) -> list[str]:
    from loft.registry import history

    return [e.get("event") or f"alias {e['alias']}" for e in history(name)]


@pytest.mark.integration
def test_a_better_candidate_advances_step_by_step_and_is_promoted(server):
    from loft import registry
    from loft.serve import rollout

    plan = rollout.start("bot", 2, steps=[20, 50, 100], gate=server["gate"], every_s=0,
                         audit=[server["audit"]], min_requests=5)  # fmt: skip
    assert (plan.champion, plan.share) == (1, 0.2)
    better = {"bot:1": 0.5, "bot:2": 0.9}
    seen = _traffic(server["url"], 80, better, "a")
    assert seen["bot:2"] < seen["bot:1"]  # about a fifth
    first = rollout.tick("bot")
    assert first.action == "advanced", first.reason
    assert registry.get_split("bot")["share"] == 0.5
    assert first.metrics["bot:2"]["feedback_score"] == pytest.approx(0.9)
    _traffic(server["url"], 40, better, "b")
    last = rollout.tick("bot")
    assert last.action == "promoted", last.reason
    assert registry.get_version("bot@champion").version == 2
    assert registry.get_split("bot") is None
    kinds = _kinds("bot")
    assert kinds[-4:] == ["split", "split", "alias champion", "split-cleared"]
    entries = registry.history("bot")
    assert all(r["passed"] for r in entries[-3]["gate"])  # the decision's gate rows are recorded
    assert rollout.tick("bot").action == "none"


@pytest.mark.integration
def test_a_worse_candidate_is_aborted_and_the_champion_gets_all_traffic(server):
    from loft import registry
    from loft.serve import rollout

    rollout.start("bot", 2, steps=[30, 100], gate=server["gate"], every_s=0,
                  audit=[server["audit"]], min_requests=5)  # fmt: skip
    worse = {"bot:1": 0.8, "bot:2": 0.3}
    assert set(_traffic(server["url"], 60, worse, "c")) == {"bot:1", "bot:2"}
    decision = rollout.tick("bot")
    assert decision.action == "aborted"
    assert "feedback_score >= champion" in decision.reason
    assert registry.get_split("bot") is None
    assert registry.get_version("bot@champion").version == 1  # never moved
    cleared = registry.history("bot")[-1]
    assert cleared["event"] == "split-cleared" and "aborted" in cleared["why"]
    assert [r["passed"] for r in cleared["gate"]] == [True, True, False]
    time.sleep(0.2)  # past alias_refresh_s: the server has re-read the split
    assert _traffic(server["url"], 20, worse, "d") == {"bot:1": 20}


@pytest.mark.integration
def test_a_step_waits_for_enough_data_and_gives_up_after_max_wait(server, capsys):
    from loft import registry
    from loft.core.errors import ConfigError
    from loft.serve import rollout

    with pytest.raises(ConfigError, match="cannot import module"):  # refused before any split
        rollout.start("bot", 2, steps=[50, 100], gate=server["gate"], every_s=0,
                      scorers=["no_such_module:f"])  # fmt: skip
    assert registry.get_split("bot") is None
    rollout.start("bot", 2, steps=[50, 100], gate=server["gate"], every_s=0,
                  audit=[server["audit"]], min_requests=1000, max_wait=3)  # fmt: skip
    with pytest.raises(ConfigError, match="one rollout at a time"):
        rollout.start("bot", 2, steps=[50, 100], gate=server["gate"], every_s=0)
    _traffic(server["url"], 6, {"bot:1": 0.5, "bot:2": 0.5}, "e")
    st = rollout.status("bot")
    assert st["running"] and "of 1000 requests" in st["waiting_for"]
    assert run_cli("rollout", "status", "bot") == 0
    said = capsys.readouterr().out
    assert "bot:2 vs bot:1: step 1/2, 50% of traffic" in said and "waiting: the candidate" in said
    assert "requests" in said and "feedback_score" in said  # the per-version table
    assert run_cli("rollout", "tick", "bot", "--json") == 0
    assert json.loads(capsys.readouterr().out)["action"] == "waiting"
    assert rollout.tick("bot").action == "waiting"
    assert registry.get_split("bot")["meta"]["rollout"]["waited"] == 2
    assert rollout.tick("bot", now=time.time() + 1).action == "aborted"
    assert registry.get_split("bot") is None
    assert run_cli("rollout", "abort", "bot") == 2  # nothing left to abort
    assert "no rollout of bot is running" in capsys.readouterr().err


@pytest.mark.unit
def test_steps_live_metrics_and_refusals(tmp_path, monkeypatch):
    from loft.core.errors import ConfigError
    from loft.serve import rollout

    assert rollout.parse_steps("5, 25,50%,100") == [5, 25, 50, 100]
    for bad, why in (("50", "at least one"), ("50,25,100", "increase"), ("5,50", "last step"),
                     ("0,100", "above 0"), ("a,100", "percentages")):  # fmt: skip
        with pytest.raises(ConfigError, match=why):
            rollout.parse_steps(bad)

    audit = tmp_path / "audit.jsonl"
    t0 = time.time()

    def line(dt: float, **rec) -> str:
        stamp = rollout._iso(t0 + dt)
        return json.dumps({"time": stamp, "endpoint": "/v1/chat/completions", **rec}) + "\n"

    audit.write_text(
        line(-5, resolved="m:2", status=200, latency_ms=999)  # before the window
        + line(1, resolved="m:2", status=200, latency_ms=10, completion='{"a": 1}')
        + line(2, resolved="m:2", status=500, latency_ms=30, completion="oops")
        + line(3, resolved="m:2", status=499, latency_ms=5)  # the client left: not counted
        + line(4, resolved="m:1", status=200, latency_ms=20)
        + line(5, resolved="m:1", endpoint="/v1/feedback", score=0.25)
        + line(6, resolved="m:2", endpoint="/v1/feedback", score=1.0)
        + '{"time": "half a line'
    )
    (tmp_path / "live_scorers.py").write_text(
        "def short(completion, prompt):\n    return float(len(completion) < 5)\n"
        "def broken(completion, prompt):\n    return completion['x']\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    paths = [audit, tmp_path / "absent.jsonl"]
    m = rollout.live_metrics(paths, ["m:2", "m:1"], t0, t0 + 10, ["live_scorers:short"])
    assert m["m:2"] == {"requests": 2, "errors": 1, "feedback": 1, "error_rate": 0.5,
                        "latency_p50_ms": 10.0, "latency_p95_ms": 30.0, "feedback_score": 1.0,
                        "json_valid": 0.5, "short": 0.5}  # fmt: skip
    with pytest.raises(ConfigError, match="scorer 'broken' failed on request"):
        rollout.live_metrics(paths, ["m:2"], t0, t0 + 10, ["live_scorers:broken"])
    assert m["m:1"]["requests"] == 1 and m["m:1"]["feedback_score"] == 0.25


def _wait(what: str, cond, timeout: float, worker) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if worker.poll() is not None:
            pytest.fail(f"the worker exited ({worker.returncode}) waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.integration
@pytest.mark.slow
def test_the_whole_loop_trigger_retrain_evaluate_rollout_promote(serve_bot, tmp_path, tiny_model):
    """A metric trigger sees the champion below its threshold and queues the retraining pipeline;
    `loft worker` trains the next version, evaluates it, starts its rollout; live traffic with
    client feedback favours it; the worker's scheduled decisions promote it."""
    import yaml

    from helpers import kill_tree, run_loft, start_loft
    from loft import registry
    from loft.jobs import JobStore
    from loft.jobs.schedules import get_schedule, list_schedules
    from test_train import tiny_config

    served = serve_bot(1)  # bot:1 is the champion
    cfg = tiny_config(tmp_path / "retrain", tiny_model, max_steps=2)
    cfg["run_name"] = "bot"
    (tmp_path / "retrain.yaml").write_text(yaml.safe_dump(cfg))
    data = cfg["data"]["train"]
    stages = [
        {"kind": "train", "config": "retrain.yaml"},
        {"kind": "eval", "args": ["{registered}", "--data", data, "--metrics", "exact_match"]},
        {"kind": "rollout", "args": [
            "start", "bot", "--candidate", "{registered}", "--steps", "50,100",
            "--gate", "gate.yaml", "--every", "1s", "--min-requests", "3",
            "--audit", str(served["audit"]),
        ]},
    ]  # fmt: skip
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    home = served["home"]
    add = run_loft("schedule", "add", "on-drop", "--when", "bot@champion exact_match < 0.99",
                   "--data", data, "--every", "2s", "--job", str(tmp_path / "pipeline.yaml"),
                   home=home)  # fmt: skip
    assert add.returncode == 0, add.stderr
    worker = start_loft("worker", "--poll", "0.2", home=home, stdout=None, stderr=None)
    store = JobStore()
    try:
        _wait("the trigger to fire", lambda: (get_schedule(store, "on-drop").fired_job
                                              is not None), 120, worker)  # fmt: skip
        assert run_loft("schedule", "remove", "on-drop", home=home).returncode == 0
        _wait("the rollout to start", lambda: registry.get_split("bot") is not None, 300, worker)
        split = registry.get_split("bot")
        assert (split["candidate"], split["share"]) == (2, 0.5)
        assert [s.name for s in list_schedules(store)] == ["rollout-bot"]
        evaluated = registry.get_version("bot:2").card["evaluations"]
        assert any(e["metric"] == "exact_match" and e["source"] == "eval" for e in evaluated)
        seen = _traffic(served["url"], 40, {"bot:1": 0.4, "bot:2": 0.9}, "loop")
        assert seen.get("bot:2", 0) >= 3 and seen.get("bot:1", 0) >= 3
        # the tick job that promotes then clears the split and removes its own schedule: wait for
        # the whole job, not the first of its effects, before stopping the worker
        _wait("the promotion", lambda: (registry.get_version("bot@champion").version == 2
                                        and not list_schedules(store)), 180, worker)  # fmt: skip
    finally:
        kill_tree(worker)
    assert registry.get_split("bot") is None
    assert list_schedules(store) == []  # the ended rollout removed its tick schedule
    events = [e.get("event") or f"alias {e['alias']}" for e in registry.history("bot")]
    assert events[-3:] == ["split", "alias champion", "split-cleared"]
    jobs = {j.kind for j in store.list()}
    assert jobs >= {"schedule-check", "train", "eval", "rollout"}
