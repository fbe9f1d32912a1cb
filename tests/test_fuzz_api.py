"""schemathesis against the serving server's and the portal's OpenAPI documents, all phases, with
a valid key and without: no 5xx, every status code, content type and JSON body as documented,
and no cross-key access (a key limited to one adapter never gets another's answer or listing).

Runs are small and derandomized (the same cases every time) to fit the suite's budget; longer,
random ones: ``.venv/bin/python bench/fuzz.py api --seconds 300``. What the fuzzer found, fixed
with a regression test each, is in tests/test_fuzz_regressions.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from api_fuzz import ALLOWED, ServeTarget, bearer, config, fuzz, pin_models, serve_target
from helpers import linked_home

pytestmark = pytest.mark.integration

GENERATION = ("POST /v1/chat/completions", "POST /v1/completions")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, _session_home: Path):
    root = tmp_path_factory.mktemp("fuzz-serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFT_HOME", str(linked_home(root, _session_home)))
        with serve_target(root, tiny_model) as t:
            yield t
    ALLOWED.clear()


def test_every_request_body_is_described(target: ServeTarget) -> None:
    doc = target.doc
    schemas = doc["components"]["schemas"]
    for path, model in (
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/completions", "CompletionRequest"),
        ("/v1/feedback", "FeedbackRequest"),
    ):
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}"
        assert schemas[model]["properties"], model
        assert op["security"] == [{"bearer": []}]
        assert {"200", "400", "401", "413"} <= set(op["responses"]), path
    assert schemas["ChatCompletionRequest"]["required"] == ["model", "messages"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_fuzz_serve_with_a_key(target: ServeTarget) -> None:
    """All phases over the document as published (any model name), with the admin key."""
    cfg = config(target.url, bearer(target.keys["admin"]), max_examples=3, coverage_mode="positive")
    out = fuzz(target.doc, cfg)
    assert not out.failures and not out.errors, out.report()
    assert 200 in out.answered("GET /v1/models")
    assert {400, 404} <= out.answered("POST /v1/chat/completions")


def test_fuzz_serve_reaches_generation_and_never_crosses_keys(target: ServeTarget) -> None:
    """Model names drawn from every adapter, the base and names that do not exist, sent with
    beta's key: generation is reached (200), alpha and the base are refused (403) and no 200 ever
    comes from a model beta's key may not use (the no_cross_key_access check)."""
    models = ["alpha", "alpha:1", "alpha@champion", "beta", "beta:1", target.base, "nope"]
    doc = pin_models(target.doc, models)
    cfg = config(target.url, bearer(target.keys["beta"]), max_examples=5,
                 phases=("examples", "fuzzing", "stateful"))  # fmt: skip
    out = fuzz(doc, cfg)
    assert not out.failures and not out.errors, out.report()
    for op in GENERATION:
        assert {200, 403} <= out.answered(op), (op, out.statuses.get(op))
    assert 200 in out.answered("POST /v1/feedback") or 404 in out.answered("POST /v1/feedback")


def test_fuzz_serve_without_a_key(target: ServeTarget) -> None:
    out = fuzz(target.doc, config(target.url, {}, max_examples=3, coverage_mode="positive"))
    assert not out.failures and not out.errors, out.report()
    for op, statuses in out.statuses.items():
        if op not in ("GET /health", "GET /ready"):
            assert 200 not in statuses, (op, statuses)  # every other route needs a key
    assert 401 in out.answered("POST /v1/chat/completions")


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory, _session_home: Path):
    from helpers import serving
    from portal_client import portal_for

    home = linked_home(tmp_path_factory.mktemp("fuzz-portal"), _session_home)
    with portal_for(home) as p, serving(p.app) as url:
        assert p.client().get("/api/registry", headers=p.bearer("admin")).status_code == 200
        yield p, url


def test_portal_document_covers_the_api(portal) -> None:
    p, _ = portal
    doc = p.app.openapi()
    assert doc["paths"] and all(path.startswith("/api/") for path in doc["paths"])
    bodies = [
        op
        for ops in doc["paths"].values()
        for m, op in ops.items()
        if m in ("post", "put", "patch")
    ]
    bare = {op["operationId"] for op in bodies if "requestBody" not in op}
    # the two actions without a body
    assert bare == {
        "api_discard_api_labelling_projects__name__records__record__discard_post",
        "api_cancel_api_jobs__job_id__cancel_post",
    }
    upload = doc["paths"]["/api/datasets/{name}"]["post"]["requestBody"]["content"]
    assert upload["multipart/form-data"]["schema"]["required"] == ["file"]


def test_fuzz_portal_with_a_token(portal) -> None:
    """All phases as the admin, whose token reaches every route (coverage in its positive mode:
    the negative one adds thousands of 422s and little else; fuzzing sends both)."""
    p, url = portal
    cfg = config(url, p.bearer("admin"), max_examples=3, coverage_mode="positive")
    out = fuzz(p.app.openapi(), cfg)
    assert not out.failures and not out.errors, out.report()
    for op in ("GET /api/jobs", "GET /api/datasets", "GET /api/registry", "GET /api/users"):
        assert 200 in out.answered(op), (op, out.statuses.get(op))


def test_fuzz_portal_without_a_token(portal) -> None:
    p, url = portal
    cfg = config(url, {}, max_examples=3, coverage_mode="positive")
    out = fuzz(p.app.openapi(), cfg)
    assert not out.failures and not out.errors, out.report()
    for op, statuses in out.statuses.items():
        assert not any(200 <= s < 300 for s in statuses), (op, statuses)
