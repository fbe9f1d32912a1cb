"""The OpenAPI description of `loft serve`: every request body and every response a route can
give, so clients (and the schemathesis run in tests/test_fuzz_api.py) see the real contract.

The generation routes read their bodies themselves (size limit and key before parsing, see
app.py), so FastAPI cannot infer them: ``body(Model)`` declares the pydantic model that
``protocol.parse_body`` validates, and ``describe`` adds those models to the document's
components. Responses are declared per route with ``responses(...)``: the success body's model
and the OpenAI-style error body for each error status the route can answer.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from loft.serve.feedback import MAX_COMMENT_CHARS, MAX_ID_CHARS

BEARER = "bearer"
# one server-sent event (OpenAPI 3.1: a text/event-stream schema describes each event); `data` is
# a chunk object as JSON, an error body, or the closing [DONE]
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Out):
    message: str
    type: str
    code: str | None
    param: str | None


class ErrorResponse(_Out):
    """Every error, in OpenAI's shape; ``code`` is the loft error's stable name."""

    error: ErrorDetail


class Usage(_Out):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Out):
    index: int = Field(ge=0)
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class CompletionChoice(_Out):
    index: int = Field(ge=0)
    text: str
    logprobs: None
    finish_reason: Literal["stop", "length"]


class _Envelope(_Out):
    id: str
    created: int
    model: str = Field(description="the resolved name:version (or the base model) that answered")
    system_fingerprint: str
    usage: Usage


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class TextCompletion(_Envelope):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class FeedbackRequest(BaseModel):
    """A rating of one response this server gave the same key: ``score`` or ``thumbs``."""

    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS, pattern=r"\S")
    score: float | None = Field(None, ge=0.0, le=1.0)
    thumbs: Literal["up", "down"] | None = None
    comment: str | None = Field(None, max_length=MAX_COMMENT_CHARS)


class FeedbackAccepted(_Out):
    object: Literal["feedback"]
    id: str
    score: float = Field(ge=0.0, le=1.0)


class ModelEntry(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    loft: dict[str, Any]


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelEntry]


class Health(_Out):
    status: Literal["ok"]


class Readiness(_Out):
    status: Literal["ready", "draining", "starting"]
    base_model: str | None = None


class ServerStatus(_Out):
    object: Literal["loft.status"]
    loft_version: str
    state: Literal["ready", "draining"]
    base_model: dict[str, Any]
    resident: list[dict[str, Any]]
    adapters: list[dict[str, Any]]
    in_flight: int
    queue_depth: int
    view: str


_WHY = {
    400: "invalid request (names the field in `param`), or over a server limit",
    401: "missing, malformed, unknown, revoked or expired API key",
    403: "the key may not use this model or endpoint",
    404: "no such model, version or response",
    409: "the adapter failed its integrity or compatibility check",
    413: "request body over max_body_bytes",
    422: "a registered adapter that cannot be served",
    429: "over the key's request rate (see Retry-After)",
    500: "an adapter that could not be loaded (the server's log says why)",
    503: "at the concurrency limit or shutting down (see Retry-After)",
}


# a response's id is what /v1/feedback rates (the stateful fuzzing phase follows this link)
RATE_IT = {
    "RateIt": {
        "operationId": "feedback",
        "requestBody": {"id": "$response.body#/id", "thumbs": "up"},
        "description": "rate this response",
    }
}


def responses(
    ok: type[BaseModel] | None, *errors: int, stream: bool = False, text: bool = False,
    links: dict[str, Any] | None = None,
) -> dict[int | str, dict[str, Any]]:  # fmt: skip
    """The ``responses=`` of a route: 200 with ``ok``'s body (plus an event stream when
    ``stream``, or a plain-text body when ``text``) and the error body for each status."""
    out: dict[int | str, dict[str, Any]] = {}
    success: dict[str, Any] = {"description": "success"}
    if links:
        success["links"] = links
    if ok is not None:
        success["model"] = ok
    content: dict[str, Any] = {}
    if stream:
        content["text/event-stream"] = {"schema": SSE_EVENT}
    if text:
        content["text/plain"] = {"schema": {"type": "string"}}
    if content:
        success["content"] = content
    out[200] = success
    for status in errors:
        out[status] = {"model": ErrorResponse, "description": _WHY[status]}
    return out


def body(model: type[BaseModel], *, auth: bool) -> dict[str, Any]:
    """``openapi_extra`` for a route that parses ``model`` from its raw body itself."""
    extra: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    }
    if auth:
        extra["security"] = [{BEARER: []}]
    return extra


def secured(auth: bool) -> dict[str, Any] | None:
    """``openapi_extra`` for a route that needs an API key when the server has keys."""
    return {"security": [{BEARER: []}]} if auth else None


def describe(app: FastAPI, bodies: list[type[BaseModel]], *, auth: bool) -> None:
    """Make ``app.openapi()`` include the request-body ``bodies`` and the bearer scheme."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        from loft import __version__

        doc = get_openapi(
            title=app.title, version=__version__, routes=app.routes, description=__doc__
        )
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in bodies:
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(js.pop("$defs", {}))
            schemas[model.__name__] = js
        if auth:
            doc["components"]["securitySchemes"] = {
                BEARER: {"type": "http", "scheme": "bearer", "description": "a `loft keys` key"}
            }
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
