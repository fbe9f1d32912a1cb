"""schemathesis (4.x) against a live loft API: the serving server or the portal, each over its
own OpenAPI document (``app.openapi()``), in all four phases (examples, coverage, fuzzing,
stateful). Plain helpers, shared by tests/test_fuzz_api.py (small, derandomized runs) and
bench/fuzz.py (long ones).

``fuzz`` returns every failed check with the request that caused it, and the status codes each
operation answered (so a test can show the fuzzer reached what it claims to test). The checks:
no 5xx, only documented status codes and content types, every JSON body valid against the
documented response schema, and ``no_cross_key_access``: a serving key limited to some models
never gets an answer from, or a listing of, another (``ALLOWED`` maps each key to its models).
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema

PHASES = ("examples", "coverage", "fuzzing", "stateful")
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "no_cross_key_access",
)
# secret of a serving key -> the adapter names (and base) it may use; filled by the fixture
ALLOWED: dict[str, set[str]] = {}


@schemathesis.check
def no_cross_key_access(ctx: Any, response: Any, case: Any) -> bool | None:
    """A serving key's answers come only from models on its allow-list: the adapter that
    produced a completion (X-Loft-Adapter) and every model /v1/models and /v1/loft/status list."""
    auth = response.request.headers.get("Authorization", "")
    allowed = ALLOWED.get(auth.removeprefix("Bearer ").strip())
    if allowed is None or response.status_code != 200:
        return None
    seen: set[str] = set()
    for adapter in response.headers.get("x-loft-adapter", []):  # lower-cased, lists of values
        seen.add(adapter.rpartition(":")[0] or adapter)
    path = case.path
    if path in ("/v1/models", "/v1/loft/status"):
        doc = response.json()
        seen |= {m["id"] for m in doc.get("data", [])}
        seen |= {a["name"] for a in doc.get("adapters", [])}
        seen |= {r["ref"].rpartition(":")[0] for r in doc.get("resident", [])}
    leaked = seen - allowed
    if leaked:
        raise AssertionError(f"{case.method} {path} answered from other keys' models {leaked}")
    return True


@dataclass
class Failure:
    operation: str
    check: str
    message: str
    request: str
    body: Any = None  # the request body as generated (for replaying it)

    def __str__(self) -> str:
        return f"{self.operation} [{self.check}] {self.message.strip()}\n    {self.request}"


@dataclass
class Outcome:
    failures: list[Failure] = field(default_factory=list)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # the engine's own (schema, network)
    checks: int = 0

    def report(self) -> str:
        seen: dict[tuple[str, str], Failure] = {}
        for f in self.failures:
            seen.setdefault((f.operation, f.check), f)
        return "\n".join([*self.errors, *map(str, seen.values())])

    def answered(self, operation: str) -> set[int]:
        return set(self.statuses.get(operation, ()))


def config(
    url: str,
    headers: dict[str, str],
    *,
    max_examples: int,
    phases: tuple[str, ...] = PHASES,
    coverage_mode: str = "all",
    seed: int = 1,
    derandomize: bool = True,
) -> SchemathesisConfig:
    """One run's settings: ``derandomize`` gives the same cases every time (for tests)."""
    return SchemathesisConfig.from_dict({
        "seed": seed,
        "cache": {"enabled": False},
        "base-url": url,
        "headers": headers,
        "request-timeout": 120,  # the first registry call creates its database
        "generation": {
            "max-examples": max_examples,
            "deterministic": derandomize,
            "database": "none",
        },
        "phases": {
            "examples": {"enabled": "examples" in phases},
            "coverage": {
                "enabled": "coverage" in phases,
                "generation": {"mode": coverage_mode},
            },
            "fuzzing": {"enabled": "fuzzing" in phases},
            "stateful": {"enabled": "stateful" in phases, "max-steps": 2 * max_examples},
        },
        "checks": {"enabled": False, **{c: {"enabled": True} for c in CHECKS}},
    })  # fmt: skip


def fuzz(doc: dict[str, Any], cfg: SchemathesisConfig) -> Outcome:
    """Run schemathesis over ``doc`` (an OpenAPI document) with ``cfg``."""
    schema = schemathesis.openapi.from_dict(copy.deepcopy(doc), config=cfg)
    out = Outcome()
    for ev in from_schema(schema).execute():
        if isinstance(ev, events.ScenarioFinished):
            rec = ev.recorder
            for case_id, checks in rec.checks.items():
                case = rec.cases[case_id].value
                op = f"{case.method.upper()} {case.operation.path}"
                interaction = rec.interactions.get(case_id)
                if interaction is not None and interaction.response is not None:
                    out.statuses.setdefault(op, Counter())[interaction.response.status_code] += 1
                for check in checks:
                    out.checks += 1
                    if check.failure_info is not None:
                        request = case.as_curl_command() if hasattr(case, "as_curl_command") else ""
                        failure = check.failure_info.failure
                        message = f"{failure.title}: {failure.message}"
                        out.failures.append(
                            Failure(op, check.name, message, request[:4000], case.body)
                        )
        elif isinstance(ev, events.NonFatalError):
            out.errors.append(f"{ev.label}: {ev.info.format()[:800]}")
        elif isinstance(ev, events.FatalError):
            out.errors.append(f"fatal: {ev.exception!r}")
    return out


def pin_models(doc: dict[str, Any], models: list[str]) -> dict[str, Any]:
    """``doc`` with the generation bodies' ``model`` drawn from ``models`` (instead of any string),
    so the fuzzer reaches generation and the allow-list checks."""
    doc = copy.deepcopy(doc)
    schemas = doc["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        schemas[name]["properties"]["model"] = {"type": "string", "enum": models}
        # the documented example once per model, whole and streamed: the examples phase sends
        # each of them
        example = {**schemas[name]["examples"][0], "max_tokens": 2}
        schemas[name]["examples"] = [
            {**example, "model": m, "stream": stream} for m in models for stream in (False, True)
        ]
    return doc


@dataclass
class ServeTarget:
    url: str
    doc: dict[str, Any]
    keys: dict[str, str]  # key name -> secret
    base: str


@contextlib.contextmanager
def serve_target(root: Path, tiny_model: Path, *, audit_path: Path | None = None) -> Iterator[
    ServeTarget
]:  # fmt: skip
    """A `loft serve` app (torch engine, keys on) over ``tiny_model`` with adapters alpha and
    beta registered in the current LOFT_HOME, and keys: alpha-team (alpha), beta-team (beta),
    admin (everything, base included). Yields while uvicorn serves it on 127.0.0.1."""
    from helpers import make_lora_adapter, serving
    from loft import registry
    from loft.core.paths import loft_home
    from loft.core.specs import ServeConfig
    from loft.serve.app import create_app
    from loft.serve.audit import AuditLog
    from loft.serve.engine import make_engine
    from loft.serve.keys import KeyStore
    from loft.serve.metrics import Metrics

    for name, seed in (("alpha", 1), ("beta", 2)):
        registry.register(make_lora_adapter(root / name, tiny_model, seed=seed), name=name)
    store = KeyStore(loft_home() / "keys.db")
    made = {
        "alpha": store.create("alpha-team", ["alpha"]),
        "beta": store.create("beta-team", ["beta"]),
        "admin": store.create("admin", ["*"], include_base=True),
    }
    keys = {name: secret for name, (_, secret) in made.items()}
    cfg = ServeConfig(
        base_model=str(tiny_model),
        device="cpu",
        max_tokens_limit=8,
        default_max_tokens=4,
        max_body_bytes=8192,
        max_prompt_tokens=200,
        batch_wait_ms=1.0,
    )
    engine = make_engine(cfg)
    engine.start()
    audit = AuditLog(audit_path or root / "audit.jsonl", False)
    app = create_app(cfg, engine, store, audit=audit, metrics=Metrics())
    ALLOWED[keys["alpha"]] = {"alpha"}
    ALLOWED[keys["beta"]] = {"beta"}
    try:
        with serving(app) as url:
            yield ServeTarget(url, app.openapi(), keys, engine.base.name)
    finally:
        engine.shutdown()


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}
