"""`loft serve` end to end: the real `openai` client against a real uvicorn server on 127.0.0.1.

One server per module over the tiny random model, with adapters alpha (v1, v2), beta and gamma
(tampered on disk before it is first loaded) and five keys: alpha's, beta's, a rate-limited one,
an admin key that reaches every model, and a metrics-only key (Prometheus, operators).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from helpers import (
    kill_tree,
    linked_home,
    make_lora_adapter,
    run_loft,
    serving,
    start_loft,
    vllm_engine_without_vllm,
)

pytestmark = pytest.mark.integration

SECRET = "the-secret-prompt-text"
AUDIT_FIELDS = (
    "time", "request_id", "key", "endpoint", "model", "resolved", "route", "sha256",
    "prompt_tokens", "completion_tokens", "latency_ms", "status", "error", "stream", "about",
    "score",
)  # fmt: skip


@dataclass
class Served:
    url: str
    keys: dict[str, str]
    home: Path
    audit: Path
    app: object
    base: str

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.keys[key], max_retries=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, _session_home: Path):
    from loft import registry
    from loft.core.specs import ServeConfig
    from loft.serve.app import create_app
    from loft.serve.audit import AuditLog
    from loft.serve.engine import make_engine
    from loft.serve.keys import KeyStore
    from loft.serve.metrics import Metrics

    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("serve")
    home = linked_home(root, _session_home)
    mp.setenv("LOFT_HOME", str(home))
    try:
        for name, seed in (("alpha", 1), ("alpha", 2), ("beta", 3), ("gamma", 4)):
            folder = make_lora_adapter(root / f"{name}{seed}", tiny_model, seed=seed)
            mv = registry.register(folder, name=name)
        registry.move_alias("alpha", "champion", 1, reason="test")
        registry.move_alias("beta", "champion", 1, reason="test")
        weights = mv.path / "adapter_model.safetensors"  # gamma:1, never loaded yet
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))

        store = KeyStore(home / "keys.db")
        keys = {
            "alpha": store.create("alpha-team", ["alpha", "gamma"])[1],
            "beta": store.create("beta-team", ["beta"])[1],
            "limited": store.create("limited", ["alpha"], rate="2/min")[1],
            "admin": store.create("admin", ["*"], include_base=True)[1],
            "metrics": store.create("prometheus", [], metrics=True)[1],
        }
        cfg = ServeConfig(
            base_model=str(tiny_model),
            device="cpu",
            alias_refresh_s=0.2,
            max_tokens_limit=16,
            default_max_tokens=8,
            max_body_bytes=8192,
            max_prompt_tokens=200,
            batch_wait_ms=2.0,
        )
        engine = make_engine(cfg)
        engine.start()
        audit = home / "serve" / "audit.jsonl"
        app = create_app(cfg, engine, store, audit=AuditLog(audit, False), metrics=Metrics())
        with serving(app) as url:
            yield Served(url, keys, home, audit, app, engine.base.name)
        engine.shutdown()
    finally:
        mp.undo()


def weights_digest(ref: str) -> str:
    """The fingerprint a response names for a registered adapter, computed here from its file on
    disk: sha256 over the line ``adapter_model.safetensors:<sha256 of the file>``."""
    import hashlib

    from loft import registry

    weights = registry.get_version(ref).path / "adapter_model.safetensors"
    line = f"adapter_model.safetensors:{hashlib.sha256(weights.read_bytes()).hexdigest()}\n"
    return hashlib.sha256(line.encode()).hexdigest()


def _chat(served: Served, key: str, model: str, **kw):
    kw.setdefault("max_tokens", 4)
    kw.setdefault("temperature", 0)
    return served.client(key).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Hello there"}], **kw
    )


def _error(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


def test_chat_completion_names_version_and_counts_usage(served: Served) -> None:
    raw = _chat(served, "alpha", "alpha")
    resp = raw.parse()
    assert resp.object == "chat.completion"
    assert resp.model == "alpha:1"
    assert raw.headers["X-Loft-Adapter"] == "alpha:1"
    assert raw.headers["X-Loft-Adapter-Sha256"] == weights_digest("alpha:1")
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= resp.usage.completion_tokens <= 4
    assert resp.usage.prompt_tokens > 3
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_adapters_change_the_output_and_greedy_is_deterministic(served: Served) -> None:
    def text(key: str, model: str) -> str:
        return _chat(served, key, model, max_tokens=8).parse().choices[0].message.content

    a = text("alpha", "alpha")
    assert a == text("alpha", "alpha")
    assert a != text("beta", "beta")


def test_stop_strings_cut_the_text_streamed_or_not(served: Served) -> None:
    full = _chat(served, "alpha", "alpha", max_tokens=12).parse().choices[0].message.content
    stop = full.strip()[4:7]
    assert stop.strip(), full
    cut = _chat(served, "alpha", "alpha", max_tokens=12, stop=[stop]).parse().choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index(stop)]
    stream = served.client("alpha").chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Hello there"}], max_tokens=12,
        temperature=0, stop=stop, stream=True,
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_non_stream_and_stream(served: Served) -> None:
    client = served.client("beta")
    raw = client.completions.with_raw_response.create(
        model="beta", prompt="Once upon a time", max_tokens=5, temperature=0
    )
    resp = raw.parse()
    assert resp.object == "text_completion" and resp.model == "beta:1"
    assert raw.headers["X-Loft-Adapter"] == "beta:1"
    assert 1 <= resp.usage.completion_tokens <= 5
    chunks = list(
        client.completions.create(
            model="beta", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True
        )
    )
    assert all(c.object == "text_completion" and c.model == "beta:1" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == resp.choices[0].text
    assert chunks[-1].choices[0].finish_reason == resp.choices[0].finish_reason


def test_chat_stream_role_first_finish_last_usage_chunk(served: Served) -> None:
    full = _chat(served, "alpha", "alpha", max_tokens=6).parse()
    stream = served.client("alpha").chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.model == "alpha:1" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage == full.usage
    assert body[-1].choices[0].finish_reason == full.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == full.choices[0].message.content


def test_stream_headers_and_done_marker(served: Served) -> None:
    body = {"model": "alpha", "prompt": "Hi", "max_tokens": 4, "stream": True}
    headers = {"Authorization": f"Bearer {served.keys['alpha']}"}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["X-Loft-Adapter"] == "alpha:1"
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_n_choices_with_seed(served: Served) -> None:
    resp = _chat(served, "alpha", "alpha", n=2, seed=7, temperature=1.0).parse()
    assert [c.index for c in resp.choices] == [0, 1]
    again = _chat(served, "alpha", "alpha", n=2, seed=7, temperature=1.0).parse()
    assert [c.message.content for c in resp.choices] == [c.message.content for c in again.choices]


def test_each_key_reaches_only_its_own_adapter(served: Served) -> None:
    assert _chat(served, "beta", "beta").parse().model == "beta:1"
    messages = {}
    for key, model in (("alpha", "beta"), ("alpha", "no-such-adapter"), ("beta", "alpha")):
        with pytest.raises(openai.PermissionDeniedError) as e:
            _chat(served, key, model)
        err = _error(e.value)
        assert err["type"] == "permission_error"
        messages[(key, model)] = err["message"].replace(repr(model), "M")
    # the same answer whether or not the adapter exists
    assert messages[("alpha", "beta")] == messages[("alpha", "no-such-adapter")]
    assert "--adapters" in messages[("alpha", "beta")]
    with pytest.raises(openai.PermissionDeniedError) as e:
        _chat(served, "alpha", served.base)  # the base model is not on alpha's list
    hint = _error(e.value)["message"]  # the fix for the base model is --base, not --adapters
    assert "--base" in hint and "--adapters" not in hint
    assert _chat(served, "admin", served.base).parse().model == served.base


def test_missing_or_bad_key_is_401(served: Served) -> None:
    r = httpx.post(served.url + "/v1/chat/completions", json={"model": "alpha"})
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.json()["error"]["type"] == "authentication_error"
    # message and hint read as two sentences, not run together
    assert r.json()["error"]["message"] == (
        "missing API key. Send 'Authorization: Bearer loft-<id>-<secret>'; create a key with "
        "`loft keys create`."
    )
    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="loft-00000000-" + "x" * 43)
    with pytest.raises(openai.AuthenticationError):
        bad.with_options(max_retries=0).models.list()


def test_rate_limit_is_429_with_retry_after(served: Served) -> None:
    for _ in range(2):
        _chat(served, "limited", "alpha", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        _chat(served, "limited", "alpha", max_tokens=1)
    retry_after = int(e.value.response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert _error(e.value)["type"] == "rate_limit_error"


def test_models_list_is_filtered_per_key(served: Served) -> None:
    def ids(key: str) -> set[str]:
        return {m.id for m in served.client(key).models.list()}

    assert ids("alpha") == {"alpha", "gamma"}
    assert ids("beta") == {"beta"}
    assert ids("admin") == {served.base, "alpha", "beta", "gamma"}


def test_limits_are_400_as_openai_answers_and_body_size_413(served: Served) -> None:
    """max_tokens or a prompt over the server's limits: 400 invalid_request_error naming the
    field, as OpenAI-compatible servers answer; only an oversized body is 413."""
    with pytest.raises(openai.BadRequestError) as e:
        _chat(served, "alpha", "alpha", max_tokens=1000)
    err = _error(e.value)
    assert err["type"] == "invalid_request_error" and err["param"] == "max_tokens"
    assert "16" in err["message"] and "max_tokens_limit" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        _chat(served, "alpha", "alpha", max_tokens=None, max_completion_tokens=1000)
    assert _error(e.value)["param"] == "max_completion_tokens"
    headers = {"Authorization": f"Bearer {served.keys['alpha']}"}
    big = {"model": "alpha", "prompt": "x" * 10_000}
    r = httpx.post(served.url + "/v1/completions", json=big, headers=headers)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
    r = httpx.post(served.url + "/v1/completions", json=big)  # size is checked before the key
    assert r.status_code == 413
    long_prompt = {"model": "alpha", "prompt": "word " * 400, "max_tokens": 2}
    r = httpx.post(served.url + "/v1/completions", json=long_prompt, headers=headers)
    assert r.status_code == 400 and "max_prompt_tokens" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_bad_requests_are_400_naming_the_field(served: Served) -> None:
    headers = {"Authorization": f"Bearer {served.keys['alpha']}"}
    cases = [
        ({"model": "alpha"}, "messages"),
        ({"model": "alpha", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
         "temperature"),
        ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
         "tools"),
    ]  # fmt: skip
    for body, param in cases:
        r = httpx.post(served.url + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(
        served.url + "/v1/completions", json={"model": "alpha", "prompt": [1, 2]}, headers=headers
    )
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]


def test_tampered_adapter_is_refused_with_409(served: Served) -> None:
    with pytest.raises(openai.ConflictError) as e:
        _chat(served, "alpha", "gamma")
    err = _error(e.value)
    assert err["type"] == "conflict_error" and "gamma:1" in err["message"]


def test_promotion_reroutes_live_traffic(served: Served) -> None:
    from loft import registry

    assert _chat(served, "alpha", "alpha").parse().model == "alpha:1"
    registry.move_alias("alpha", "champion", 2, reason="promote in test")
    try:
        deadline = time.monotonic() + 5
        while (model := _chat(served, "alpha", "alpha").parse().model) != "alpha:2":
            assert time.monotonic() < deadline, f"still {model} after the alias moved"
            time.sleep(0.1)
        assert _chat(served, "alpha", "alpha:1").parse().model == "alpha:1"
        assert _chat(served, "alpha", "alpha@champion").parse().model == "alpha:2"
    finally:
        registry.move_alias("alpha", "champion", 1, reason="restore")
        deadline = time.monotonic() + 5  # and the rollback reaches live traffic the same way
        while _chat(served, "alpha", "alpha").parse().model != "alpha:1":
            assert time.monotonic() < deadline, "rollback did not reach live traffic"
            time.sleep(0.1)


def test_audit_log_one_line_per_request_without_prompt_text(served: Served) -> None:
    before = served.audit.read_text().splitlines() if served.audit.exists() else []
    client = served.client("alpha")
    client.with_options(max_retries=0).completions.create(
        model="alpha", prompt=SECRET, max_tokens=2
    )
    with pytest.raises(openai.PermissionDeniedError):
        client.completions.create(model="beta", prompt=SECRET, max_tokens=2)
    lines = served.audit.read_text().splitlines()[len(before) :]
    assert len(lines) == 2
    ok, denied = (json.loads(line) for line in lines)
    for rec in (ok, denied):
        assert set(AUDIT_FIELDS) <= set(rec)
        assert rec["key"] == "alpha-team" and rec["endpoint"] == "/v1/completions"
    assert ok["status"] == 200 and ok["resolved"] == "alpha:1"
    assert ok["sha256"] == weights_digest("alpha:1")
    assert ok["completion_tokens"] >= 1 and ok["error"] is None
    assert denied["status"] == 403 and denied["error"] == "permission_error"
    assert denied["resolved"] is None
    assert SECRET not in served.audit.read_text()
    assert "prompt" not in ok


def _get(served: Served, path: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {served.keys[key]}"} if key else {}
    return httpx.get(served.url + path, headers=headers, timeout=30)


def test_health_ready_metrics(served: Served) -> None:
    """/health and /ready are open; /metrics needs a key with the metrics scope: without a key
    401, with a key of another scope 403, and neither answer names a model."""
    assert httpx.get(served.url + "/health").status_code == 200
    assert httpx.get(served.url + "/ready").status_code == 200
    _chat(served, "alpha", "alpha", max_tokens=2)
    for key, status in ((None, 401), ("alpha", 403), ("admin", 403)):
        r = _get(served, "/metrics", key)
        assert r.status_code == status, (key, r.text)
        assert r.json()["error"]["type"] in ("authentication_error", "permission_error")
        leaks = ("alpha:", "beta", "gamma", served.base, "model=")  # the key's own name is fine
        assert not any(name in r.text for name in leaks), r.text
    assert "--metrics" in _get(served, "/metrics", "alpha").json()["error"]["message"]
    r = _get(served, "/metrics", "metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'loft_requests_total{model="alpha:1",status="200"}' in text
    assert 'loft_tokens_total{kind="completion",model="alpha:1"}' in text
    assert "loft_time_to_first_token_seconds_bucket" in text
    assert "loft_resident_adapters" in text and "loft_queue_depth" in text


def test_status_endpoint_names_what_is_loaded_and_what_each_alias_serves(served: Served) -> None:
    """GET /v1/loft/status: 401 without a key; a metrics key sees every adapter, with the version
    a bare name serves and each alias's version; an app key sees only its allow-list."""
    _chat(served, "alpha", "alpha", max_tokens=1)  # alpha:1 is resident
    assert _get(served, "/v1/loft/status").status_code == 401
    full = _get(served, "/v1/loft/status", "metrics").json()
    assert full["object"] == "loft.status" and full["view"] == "all"
    assert full["base_model"]["name"] == served.base and full["engine"] == "torch"
    adapters = {a["name"]: a for a in full["adapters"]}
    assert set(adapters) == {"alpha", "beta", "gamma"}
    assert adapters["alpha"]["serves"] == "alpha:1"
    assert adapters["alpha"]["aliases"] == {"champion": "alpha:1"}
    assert adapters["alpha"]["latest"] == 2
    assert adapters["gamma"]["serves"] == "gamma:1" and adapters["gamma"]["aliases"] == {}
    resident = {r["ref"]: r for r in full["resident"]}
    assert "alpha:1" in resident and resident["alpha:1"]["sha256"] == weights_digest("alpha:1")
    assert full["max_resident_adapters"] == 8 and full["state"] == "ready"

    mine = _get(served, "/v1/loft/status", "alpha").json()
    assert mine["view"] == "key alpha-team"
    assert {a["name"] for a in mine["adapters"]} == {"alpha", "gamma"}
    assert all(r["ref"].split(":")[0] in ("alpha", "gamma") for r in mine["resident"])


def test_cli_serve_status_from_a_running_server(served: Served, tmp_path: Path) -> None:
    r = run_loft("serve", "status", "--url", served.url, "--key", served.keys["metrics"])
    assert r.returncode == 0, r.stderr
    assert f"loft serve at {served.url}: ready" in r.stdout
    assert served.base in r.stdout and "every adapter" in r.stdout
    row = next(line for line in r.stdout.splitlines() if "│ alpha " in line)
    assert "alpha:1" in row and "champion → alpha:1" in row
    assert "beta" in r.stdout

    r = run_loft("serve", "status", "--url", served.url + "/v1", "--key", served.keys["beta"])
    assert r.returncode == 0, r.stderr
    assert "beta" in r.stdout and "alpha" not in r.stdout and "beta-team" in r.stdout

    r = run_loft("serve", "status", "--url", served.url, "--json",
                 env={"LOFT_API_KEY": served.keys["metrics"]})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert {a["name"] for a in json.loads(r.stdout)["adapters"]} == {"alpha", "beta", "gamma"}

    r = run_loft("serve", "status", "--url", served.url)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "missing API key" in r.stderr and "--key" in r.stderr
    r = run_loft("serve", "status", "--url", f"http://127.0.0.1:{_free_port()}")
    assert r.returncode == 2 and "no server answers" in r.stderr and "Traceback" not in r.stderr


def test_cli_keys_create_warns_about_unregistered_names(served: Served, tmp_path: Path) -> None:
    """Against a registry holding alpha, beta and gamma: a name not registered is named in a
    warning (with a did-you-mean), a registered one is not, and the key is created anyway."""
    db = str(tmp_path / "keys.db")
    r = run_loft("keys", "create", "--name", "late", "--adapters", "alpha,betta", "--db", db,
                 home=served.home)  # fmt: skip
    assert r.returncode == 0, r.stderr
    err = " ".join(r.stderr.split())
    assert "no registered model is named 'betta' (did you mean 'beta'?)" in err
    assert "'alpha'" not in err and "created anyway" in err
    from loft.serve.keys import KeyStore

    assert KeyStore(Path(db)).authenticate(r.stdout.splitlines()[-1]).adapters == ["alpha", "betta"]


def test_draining_refuses_new_requests(served: Served) -> None:
    from loft.serve.app import begin_drain

    begin_drain(served.app)
    try:
        assert httpx.get(served.url + "/ready").status_code == 503
        assert httpx.get(served.url + "/health").status_code == 200
        with pytest.raises(openai.APIStatusError) as e:
            _chat(served, "alpha", "alpha")
        assert e.value.status_code == 503 and "Retry-After" in e.value.response.headers
    finally:
        served.app.state.loft.draining = False


def test_over_the_concurrency_limit_is_503(served: Served) -> None:
    state = served.app.state.loft
    state.in_flight += state.config.max_concurrent_requests  # as if that many were running
    try:
        with pytest.raises(openai.APIStatusError) as e:
            _chat(served, "alpha", "alpha")
        assert e.value.status_code == 503
        assert int(e.value.response.headers["Retry-After"]) >= 1
        assert _error(e.value)["type"] == "overloaded_error"
    finally:
        state.in_flight -= state.config.max_concurrent_requests
    assert _chat(served, "alpha", "alpha").parse().model == "alpha:1"


def test_cli_serve_help() -> None:
    r = run_loft("serve", "--help")
    assert r.returncode == 0 and "--no-auth" in r.stdout and "max_tokens_limit" in r.stdout


def test_cli_serve_vllm_refuses_cleanly_on_cpu(loft_home: Path, tiny_model: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = run_loft("serve", "--engine", "vllm", "--base-model", str(tiny_model), home=loft_home)
    assert r.returncode == 2, r.stderr
    assert "vllm" in r.stderr.lower() and "Traceback" not in r.stderr


def test_vllm_engine_refuses_an_adapter_it_cannot_serve_with_a_400(
    loft_home: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """A DoRA adapter asked of the vLLM engine is a 400 that names the problem and the engine that
    serves it, before vLLM would see it (vLLM is not installed here: the engine is set up as its
    start sets it up, up to loading vLLM)."""
    from loft import registry
    from loft.core.specs import ServeConfig
    from loft.serve.app import create_app
    from loft.serve.audit import AuditLog
    from loft.serve.metrics import Metrics

    dora = make_lora_adapter(tmp_path / "dora", tiny_model, seed=3, r=8, use_dora=True)
    registry.register(dora, name="dora")
    cfg = ServeConfig(base_model=str(tiny_model), engine="vllm")
    engine = vllm_engine_without_vllm(cfg)
    audit = AuditLog(loft_home / "audit.jsonl", False)
    app = create_app(cfg, engine, None, audit=audit, metrics=Metrics())
    try:
        with serving(app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
            with pytest.raises(openai.BadRequestError) as refused:
                client.completions.create(model="dora", prompt="hello", max_tokens=2)
        assert refused.value.status_code == 400
        message = refused.value.body["message"]
        assert "dora:1 cannot be served by the vLLM engine: use_dora: true" in message
        assert "engine: torch" in message
        assert engine.resident() == []
    finally:
        audit.close()


def test_serve_checks_its_ports_before_loading_anything(loft_home: Path) -> None:
    """A taken port (API or metrics) exits 2 naming it, before the base model is even looked up:
    the model here does not exist, and that is not what is reported."""
    missing = str(loft_home / "no-such-model")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_loft("serve", "--port", str(port), "--base-model", missing)
        assert r.returncode == 2, r.stderr
        assert f"port 127.0.0.1:{port} is already in use" in r.stderr
        assert "--port" in r.stderr  # what to do
        assert "no-such-model" not in r.stderr and "Traceback" not in r.stderr
        r = run_loft("serve", "--port", str(_free_port()), "--metrics-port", str(port),
                     "--base-model", missing)  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert f"metrics_port 127.0.0.1:{port} is already in use" in r.stderr
        assert "no-such-model" not in r.stderr
    free = str(_free_port())
    r = run_loft("serve", "--port", free, "--metrics-port", free, "--base-model", missing)
    assert r.returncode == 2 and "a port of its own" in r.stderr


def test_metrics_need_a_metrics_key_or_their_own_port(loft_home: Path, tiny_model: Path) -> None:
    """A real `loft serve --metrics-port P` with keys on: /metrics on P answers without a key and
    serves nothing else; on the API port it needs a metrics key (401 without, 403 with another)."""
    from loft.serve.keys import KeyStore

    store = KeyStore(loft_home / "keys.db")
    app_key = {"Authorization": f"Bearer {store.create('app', [], include_base=True)[1]}"}
    prom_key = {"Authorization": f"Bearer {store.create('prom', [], metrics=True)[1]}"}
    port, mport = _free_port(), _free_port()
    url, murl = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}"
    log = loft_home / "serve.log"
    args = ["serve", "--base-model", str(tiny_model), "--port", str(port), "--metrics-port",
            str(mport), "--set", "device=cpu"]  # fmt: skip
    with log.open("w") as sink:
        proc = start_loft(*args, home=loft_home, stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, url, log)
        assert f"metrics: {murl}/metrics (no key)" in log.read_text()
        body = {"model": str(tiny_model), "prompt": "Hi", "max_tokens": 1}
        r = httpx.post(url + "/v1/completions", json=body, headers=app_key, timeout=60)
        assert r.status_code == 200, r.text
        scraped = httpx.get(murl + "/metrics", timeout=30)
        assert scraped.status_code == 200 and 'status="200"' in scraped.text
        assert httpx.get(murl + "/v1/models", timeout=30).status_code == 404
        assert httpx.post(murl + "/v1/completions", json=body, timeout=30).status_code == 404
        assert httpx.get(url + "/metrics", timeout=30).status_code == 401
        assert httpx.get(url + "/metrics", headers=app_key, timeout=30).status_code == 403
        with_key = httpx.get(url + "/metrics", headers=prom_key, timeout=30)
        assert with_key.status_code == 200 and 'status="200"' in with_key.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=60) == 0, log.read_text()
        finally:
            kill_tree(proc)


def _wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 120  # a polling limit, not the assertion
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.2)


def test_loft_serve_no_auth_log_prompts_and_concurrency_limit(loft_home: Path, tiny_model: Path):
    """A real `loft serve --no-auth --set log_prompts=true --set max_concurrent_requests=2`:
    it warns about --no-auth before it listens; two streams in flight fill it, so a third
    concurrent request gets 503 + Retry-After; once they are gone requests pass again; the
    audit log holds the prompt and completion text (the module's server, without
    log_prompts, is checked to leave it out)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = loft_home / "serve.log"
    sets = ["log_prompts=true", "max_concurrent_requests=2", "max_tokens_limit=3000", "device=cpu"]
    args = ["serve", "--no-auth", "--base-model", str(tiny_model), "--port", str(port)]
    with log.open("w") as sink:
        proc = start_loft(*args, *[x for kv in sets for x in ("--set", kv)], home=loft_home,
                          stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_ready(proc, url, log)
        out = log.read_text()
        assert "WARNING: --no-auth" in out
        assert out.index("WARNING: --no-auth") < out.index(f"listening on http://127.0.0.1:{port}")

        model = str(tiny_model)
        r = httpx.post(url + "/v1/completions", timeout=60,
                       json={"model": model, "prompt": SECRET, "max_tokens": 3})  # fmt: skip
        assert r.status_code == 200
        completion = r.json()["choices"][0]["text"]
        audit = loft_home / "serve" / "audit.jsonl"
        rec = json.loads(audit.read_text().splitlines()[-1])
        assert rec["prompt"] == SECRET and rec["completion"] == completion
        assert rec["key"] == "-"  # no key under --no-auth
        for seed in range(20):  # a random tiny model: the first seeded answer with text
            chat = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "model": model, "max_tokens": 3, "seed": seed,
                "messages": [{"role": "user", "content": SECRET}],
            }).json()  # fmt: skip
            if chat["choices"][0]["message"]["content"].strip():
                break
        rated = httpx.post(url + "/v1/feedback", json={"id": chat["id"], "thumbs": "up"})
        assert rated.status_code == 200, rated.text
        from loft.data.traffic import from_audit  # the logged chat, rated, is a training record

        [record] = from_audit([audit], min_score=1.0).records
        answer = chat["choices"][0]["message"]["content"]
        assert record["messages"] == [{"role": "user", "content": SECRET},
                                      {"role": "assistant", "content": answer}]  # fmt: skip
        # every operator endpoint is open under --no-auth too (documented in `loft serve --help`)
        assert httpx.get(url + "/v1/loft/status", timeout=30).json()["view"] == "all"

        long = {"model": model, "prompt": "Once", "max_tokens": 3000, "stream": True}
        with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2:
            streams = [c.stream("POST", url + "/v1/completions", json=long) for c in (c1, c2)]
            responses = [s.__enter__() for s in streams]
            try:
                assert [resp.status_code for resp in responses] == [200, 200]
                # both generating: their first tokens have arrived (the iterators are kept:
                # a discarded one closes its response, which the server sees as a disconnect)
                readers = [resp.iter_lines() for resp in responses]
                assert all(next(reader).startswith("data: {") for reader in readers)
                short = {"model": model, "prompt": "Hi", "max_tokens": 2}
                third = httpx.post(url + "/v1/completions", json=short, timeout=60)
                assert third.status_code == 503, third.text
                assert int(third.headers["Retry-After"]) >= 1
                assert third.json()["error"]["type"] == "overloaded_error"
            finally:
                for s in streams:
                    s.__exit__(None, None, None)
        deadline = time.monotonic() + 60  # the abandoned streams are cancelled at their next token
        while "loft_requests_in_flight 0.0" not in httpx.get(url + "/metrics").text:
            assert time.monotonic() < deadline, "the abandoned streams kept their slots"
            time.sleep(0.1)
        again = httpx.post(url + "/v1/completions", timeout=60,
                           json={"model": model, "prompt": "Hi", "max_tokens": 2})  # fmt: skip
        assert again.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            kill_tree(proc)


@pytest.mark.slow
def test_sigterm_drains_a_stream_in_flight_then_exits_0(loft_home: Path, tiny_model: Path) -> None:
    """`loft serve` as users run it: a client that disconnects cancels its generation; SIGTERM
    while a stream is in flight lets it finish ([DONE] arrives), and the process exits 0."""
    port = _free_port()
    args = ["--no-auth", "--base-model", str(tiny_model), "--port", str(port)]
    args += [
        "--set",
        "max_tokens_limit=4000",
        "--set",
        "device=cpu",
        "--set",
        "drain_timeout_s=120",
    ]
    log = loft_home / "serve.log"
    with log.open("w") as sink:
        proc = start_loft("serve", *args, home=loft_home, stdout=sink, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(proc, url, log)
        # a client that goes away mid-stream cancels its generation (audited as 499)
        gone = {"model": str(tiny_model), "prompt": "Once", "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=gone, timeout=60) as r:
            next(r.iter_lines())
        audit = loft_home / "serve" / "audit.jsonl"
        deadline = time.monotonic() + 30
        while not audit.exists() or not audit.read_text().strip():
            assert time.monotonic() < deadline, "no audit line for the abandoned stream"
            time.sleep(0.1)
        rec = json.loads(audit.read_text().splitlines()[-1])
        assert rec["status"] == 499 and rec["completion_tokens"] < 3000
        deadline = time.monotonic() + 10  # the engine drops the row at its next token
        while True:
            metrics = httpx.get(url + "/metrics", timeout=5).text
            if "loft_queue_depth 0.0" in metrics and "loft_requests_in_flight 0.0" in metrics:
                break
            assert time.monotonic() < deadline, "the abandoned generation kept running"
            time.sleep(0.1)

        body = {"model": str(tiny_model), "prompt": "Once", "max_tokens": 500, "stream": True}
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line and not lines:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                lines.append(line)
        events = [line for line in lines if line]  # SSE events are separated by blank lines
        assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines
                  if x.startswith("data: {")]  # fmt: skip
        assert finish[-1] in ("length", "stop")
        assert proc.wait(timeout=60) == 0
        assert "stopped: in-flight requests finished" in log.read_text()
    finally:
        kill_tree(proc)
