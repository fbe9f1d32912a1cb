"""The OpenAI-compatible HTTP API over an ``Engine`` (see ``types.py`` for the contract).

Every generation request passes, in order: body size limit (413), API key (401), the key's rate
(429), the concurrency limit (503), body validation (400), the key's allow-list checked against
the *name* asked for (403, the same message whether or not the adapter exists), the server's
limits on max_tokens, n and prompt length (400, as OpenAI answers), then ``engine.acquire``
(404/409) and generation. One exception handler turns any ``LoftError`` into an OpenAI-style
error body with the status from ``http_status_for``.

A bare adapter name with a traffic split (``loft.registry.splits``) goes to the champion or the
candidate by the request's route key (sticky, see ``route_key``); the response says which in
``X-Loft-Route``, beside ``X-Loft-Adapter``, and so does its audit line (``route``).
``POST /v1/feedback`` rates a response this server gave the same key (see ``feedback.py``).

Operator endpoints: ``/metrics`` (Prometheus) and ``/v1/loft/status`` (what is loaded, which
version each adapter name and alias routes to). With keys on, ``/metrics`` needs a key with the
``metrics`` scope (no key: 401, another key: 403, naming no model); ``/v1/loft/status`` needs any
valid key and shows a key without that scope only the models on its allow-list.
``operator.create_metrics_app`` serves ``/metrics`` alone, without a key, for a separate listener
(``metrics_port``) whose address is its protection. ``/health`` and ``/ready`` stay open for
load balancers. Under ``--no-auth`` (``keys=None``) every endpoint is open.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from loft.core.errors import (
    ConfigError,
    LoftError,
    OverloadedError,
    PermissionDeniedError,
    RequestTooLargeError,
    http_status_for,
)
from loft.core.specs import ServeConfig
from loft.serve import streams
from loft.serve.audit import AuditLog
from loft.serve.feedback import Rating, ResponseIndex, Served
from loft.serve.keys import KeyRecord, KeyStore, RateLimiter
from loft.serve.metrics import Metrics
from loft.serve.openapi import (
    RATE_IT,
    ChatCompletion,
    FeedbackAccepted,
    FeedbackRequest,
    Health,
    ModelList,
    Readiness,
    ServerStatus,
    TextCompletion,
    body,
    describe,
    responses,
    secured,
)
from loft.serve.operator import metrics_response, server_status, visible_models
from loft.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    InvalidRequestError,
    error_body,
    error_type_for,
    parse_body,
    render_prompt,
    sampling_params,
)
from loft.serve.streams import CancelGroup, SSEResponse, sse
from loft.serve.types import Delta, Engine, SamplingParams, Target

log = logging.getLogger("loft.serve")

CLIENT_CLOSED = 499  # audit/metrics status for a client that went away mid-request
ROUTE_KEY_HEADER = "X-Loft-Route-Key"


@dataclass
class ServerState:
    config: ServeConfig
    engine: Engine
    keys: KeyStore | None
    audit: AuditLog
    metrics: Metrics
    limiter: RateLimiter = field(default_factory=RateLimiter)
    responses: ResponseIndex = field(default_factory=ResponseIndex)  # for /v1/feedback
    in_flight: int = 0
    ready: bool = True  # create_app is called after engine.start()
    draining: bool = False
    started_at: float = field(default_factory=time.time)


def begin_drain(app: FastAPI) -> None:
    """Flip /ready to 503 and refuse new generation requests; in-flight ones carry on."""
    app.state.loft.draining = True


def _state(request: Request) -> ServerState:
    return request.app.state.loft


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:24]}"


@dataclass
class _Ctx:
    """One generation request's bookkeeping; ``finish`` releases and records it exactly once."""

    st: ServerState
    endpoint: str
    request_id: str = field(default_factory=new_request_id)
    t0: float = field(default_factory=time.perf_counter)
    key: str = "-"
    key_id: str = "-"
    model: str | None = None
    stream: bool = False
    target: Target | None = None
    slot: bool = False
    stack: AsyncExitStack = field(default_factory=AsyncExitStack)
    cancel: CancelGroup = field(default_factory=CancelGroup)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    n: int | None = None
    completion: str | None = None
    first_token_at: float | None = None
    done: bool = False

    def saw_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            if self.target is not None:
                self.st.metrics.observe_first_token(self.target.ref, self.first_token_at - self.t0)

    def take(self, i: int, d: Delta, texts: list[str], tokens: list[int]) -> None:
        """Account one delta of choice ``i``: its text, its running token count, first token."""
        if d.text or d.token_ids:
            self.saw_token()
        texts[i] += d.text
        tokens[i] = d.completion_tokens or tokens[i]
        self.completion_tokens = sum(tokens)

    async def finish(self, *, status: int, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.cancel.set()  # harmless when generation already ended
        if self.slot:
            self.slot = False
            self.st.in_flight -= 1
        latency = time.perf_counter() - self.t0
        err_type = None
        if error is not None:
            err_type = error_type_for(status) if status != CLIENT_CLOSED else "client_closed"
        ref = self.target.ref if self.target else None
        route = self.target.route if self.target else None
        if status == 200 and ref is not None:
            served = Served(self.key, ref, route, owner=self.key_id)
            self.st.responses.remember(self.request_id, served)
        try:
            self.st.audit.write(
                request_id=self.request_id,
                key=self.key,
                endpoint=self.endpoint,
                model=self.model,
                resolved=ref,
                route=route,
                sha256=self.target.sha256 if self.target else None,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                latency_ms=round(latency * 1000, 1),
                status=status,
                error=err_type,
                stream=self.stream,
                n=self.n,
                prompt=self.prompt,
                messages=self.messages,
                completion=self.completion,
            )
        except OSError:
            log.exception("could not write the audit log")
        self.st.metrics.observe_request(
            ref,
            status,
            latency,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            error_type=err_type,
        )
        await self.stack.aclose()  # last: releases the adapter


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = RequestTooLargeError(
        f"request body is larger than this server's limit of {limit} bytes (max_body_bytes)."
    )
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _authenticate(st: ServerState, request: Request) -> KeyRecord | None:
    if st.keys is None:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        token = ""
    return st.keys.authenticate(token.strip() or None)


def route_key(request: Request, user: str | None, record: KeyRecord | None) -> str:
    """Who a request comes from, for a sticky traffic split: the ``X-Loft-Route-Key`` header,
    else the body's ``user`` (OpenAI's end-user id), else the API key's name, else (no auth,
    nothing given) a fresh random value, so the split is a random draw per request."""
    for given in (request.headers.get(ROUTE_KEY_HEADER), user):
        if given and given.strip():
            return given.strip()
    if record is not None:
        return record.name
    return uuid.uuid4().hex


def _enter_slot(st: ServerState, ctx: _Ctx) -> None:
    if st.draining:
        raise OverloadedError("the server is shutting down.", retry_after=5.0)
    if st.in_flight >= st.config.max_concurrent_requests:
        raise OverloadedError(
            f"the server is at its limit of {st.config.max_concurrent_requests} concurrent "
            "requests (max_concurrent_requests); retry shortly.",
            retry_after=1.0,
        )
    st.in_flight += 1
    ctx.slot = True


def _check_access(st: ServerState, record: KeyRecord | None, model: str) -> None:
    is_base = st.engine.is_base_name(model)
    if is_base:
        name = model
    else:
        from loft.registry import parse_ref

        try:
            name = parse_ref(model)[0]
        except ConfigError as e:
            raise InvalidRequestError(e.message, param="model", hint=e.hint) from None
    if record is not None and not record.allows(name, is_base=is_base):
        # the base model's name is public (/ready shows it), so its hint may name the flag
        how = "created with --base" if is_base else "whose --adapters list includes it"
        raise PermissionDeniedError(
            f"API key {record.name!r} may not use model {model!r}.",
            hint=f"Ask for a key {how} (`loft keys create`).",
        )


def error_response(err: BaseException, request_id: str | None = None) -> JSONResponse:
    """The OpenAI-style error response for ``err`` (status from the one error table)."""
    status, body, headers = error_body(err)
    if request_id:
        headers["X-Request-Id"] = request_id
    return JSONResponse(body, status_code=status, headers=headers)


def _headers(ctx: _Ctx, target: Target) -> dict[str, str]:
    headers = {
        "X-Loft-Adapter": target.ref,
        "X-Loft-Adapter-Sha256": target.sha256,
        "X-Request-Id": ctx.request_id,
    }
    if target.route is not None:
        headers["X-Loft-Route"] = target.route
    return headers


def _usage(prompt: int, completion: int) -> dict[str, int]:
    total = prompt + completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def _envelope(ctx: _Ctx, target: Target, obj: str, created: int) -> dict[str, Any]:
    return {
        "id": ctx.request_id.replace("req-", "chatcmpl-" if "chat" in obj else "cmpl-"),
        "object": obj,
        "created": created,
        "model": target.ref,
        "system_fingerprint": f"loft-{target.sha256[:16]}",
    }


async def _complete(
    request: Request, ctx: _Ctx, kind: str, target: Target, prompt_ids: list[int],
    params: list[SamplingParams],
) -> JSONResponse | None:  # fmt: skip
    """The whole response, or None when the client went away (generation was cancelled)."""
    st = ctx.st
    n = len(params)
    texts, finish = [""] * n, ["length"] * n
    tokens = [0] * n
    watcher = asyncio.create_task(streams.watch_disconnect(request, ctx.cancel))
    try:
        async for i, d in streams.choices(st.engine, target, prompt_ids, params, ctx.cancel):
            ctx.take(i, d, texts, tokens)
            if d.finish_reason:
                finish[i] = d.finish_reason
    finally:
        watcher.cancel()
    if ctx.cancel.is_set() and await request.is_disconnected():
        return None
    ctx.completion_tokens = sum(tokens)
    ctx.completion = texts[0] if n == 1 else "\n\n".join(texts)
    created = int(time.time())
    if kind == "chat":
        body = _envelope(ctx, target, "chat.completion", created)
        body["choices"] = [
            {"index": i, "message": {"role": "assistant", "content": texts[i]},
             "logprobs": None, "finish_reason": finish[i]}
            for i in range(n)
        ]  # fmt: skip
    else:
        body = _envelope(ctx, target, "text_completion", created)
        body["choices"] = [
            {"index": i, "text": texts[i], "logprobs": None, "finish_reason": finish[i]}
            for i in range(n)
        ]
    body["usage"] = _usage(ctx.prompt_tokens, ctx.completion_tokens)
    return JSONResponse(body, headers=_headers(ctx, target))


def _stream(
    ctx: _Ctx, kind: str, target: Target, prompt_ids: list[int], params: list[SamplingParams],
    include_usage: bool,
) -> SSEResponse:  # fmt: skip
    st = ctx.st
    n = len(params)
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    base = _envelope(ctx, target, obj, int(time.time()))
    outcome: dict[str, Any] = {"status": CLIENT_CLOSED, "error": asyncio.CancelledError()}
    texts, tokens = [""] * n, [0] * n

    def chunk(i: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        doc = {**base, "choices": [choice]}
        if include_usage:
            doc["usage"] = None
        return sse(doc)

    async def events() -> AsyncIterator[str]:
        try:
            if kind == "chat":
                for i in range(n):
                    yield chunk(i, None, None, role=True)
            async for i, d in streams.choices(st.engine, target, prompt_ids, params, ctx.cancel):
                ctx.take(i, d, texts, tokens)
                if d.text and (d.finish_reason is None or kind == "chat"):
                    yield chunk(i, d.text, None)
                if d.finish_reason:
                    text = d.text if kind != "chat" else None
                    yield chunk(i, text, d.finish_reason)
            if include_usage:
                yield sse({**base, "choices": [], "usage": _usage(ctx.prompt_tokens, sum(tokens))})
            yield sse("[DONE]")
            outcome.update(status=200, error=None)
        except Exception as e:  # after the headers went out: report in-band, then stop
            if not isinstance(e, LoftError):
                log.exception("request %s failed while streaming", ctx.request_id)
            outcome.update(status=http_status_for(e), error=e)
            yield sse(error_response(e).body.decode())
        finally:
            ctx.completion = "\n\n".join(texts) if n > 1 else texts[0]

    async def on_close() -> None:
        await ctx.finish(status=outcome["status"], error=outcome["error"])

    return SSEResponse(events(), on_close, _headers(ctx, target))


async def _generation(request: Request, kind: Literal["chat", "completion"]) -> Response:
    st = _state(request)
    ctx = _Ctx(st, request.url.path)
    try:
        raw = await _read_body(request, st.config.max_body_bytes)
        record = _authenticate(st, request)
        if record is not None:
            ctx.key, ctx.key_id = record.name, record.id
            st.limiter.check(record)
        _enter_slot(st, ctx)
        req = parse_body(raw, kind)
        ctx.model, ctx.stream, ctx.n = req.model, req.stream, req.n
        if kind == "chat":
            ctx.messages = req.chat_messages()
        _check_access(st, record, req.model)
        params = sampling_params(st.config, req)
        routed = st.engine.acquire(req.model, route_key(request, req.user, record))
        target = await ctx.stack.enter_async_context(routed)
        ctx.target = target
        text, prompt_ids = render_prompt(st.engine.tokenizer, target, req)
        ctx.prompt, ctx.prompt_tokens = text, len(prompt_ids)
        if len(prompt_ids) > st.config.max_prompt_tokens:
            raise InvalidRequestError(
                f"the prompt is {len(prompt_ids)} tokens, over this server's limit of "
                f"{st.config.max_prompt_tokens} (max_prompt_tokens).",
                param="messages" if kind == "chat" else "prompt",
                hint="Shorten it.",
            )
        choices = [
            SamplingParams(**{**vars(params), "seed": None if req.seed is None else req.seed + i})
            for i in range(req.n)
        ]
        if req.stream:  # from here on the response's on_close finishes ctx
            return _stream(ctx, kind, target, prompt_ids, choices, req.include_usage())
        response = await _complete(request, ctx, kind, target, prompt_ids, choices)
        if response is None:
            await ctx.finish(status=CLIENT_CLOSED, error=asyncio.CancelledError())
            return Response(status_code=CLIENT_CLOSED)
        await ctx.finish(status=200)
        return response
    except asyncio.CancelledError as e:
        await ctx.finish(status=CLIENT_CLOSED, error=e)
        raise
    except Exception as e:
        await ctx.finish(status=http_status_for(e) if isinstance(e, LoftError) else 500, error=e)
        if isinstance(e, LoftError):
            e.request_id = ctx.request_id  # type: ignore[attr-defined]
        raise


def create_app(
    config: ServeConfig,
    engine: Engine,
    keys: KeyStore | None,
    *,
    audit: AuditLog,
    metrics: Metrics,
) -> FastAPI:
    """The API over a started ``engine``; ``keys=None`` serves without authentication."""
    app = FastAPI(title="loft serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.loft = ServerState(config, engine, keys, audit, metrics)

    @app.exception_handler(LoftError)
    async def _loft_error(request: Request, exc: LoftError) -> JSONResponse:
        return error_response(exc, getattr(exc, "request_id", None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        body = {"error": {"message": str(exc.detail), "type": error_type_for(status),
                          "code": None, "param": None}}  # fmt: skip
        return JSONResponse(body, status_code=status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return error_response(exc)

    auth = keys is not None
    describe(app, [ChatCompletionRequest, CompletionRequest, FeedbackRequest], auth=auth)
    generation_errors = (400, 401, 403, 404, 409, 413, 422, 429, 503)

    @app.post(
        "/v1/chat/completions",
        openapi_extra=body(ChatCompletionRequest, auth=auth),
        responses=responses(ChatCompletion, *generation_errors, stream=True, links=RATE_IT),
    )
    async def chat_completions(request: Request) -> Response:
        return await _generation(request, "chat")

    @app.post(
        "/v1/completions",
        openapi_extra=body(CompletionRequest, auth=auth),
        responses=responses(TextCompletion, *generation_errors, stream=True, links=RATE_IT),
    )
    async def completions(request: Request) -> Response:
        return await _generation(request, "completion")

    @app.post(
        "/v1/feedback",
        operation_id="feedback",
        openapi_extra=body(FeedbackRequest, auth=auth),
        responses=responses(FeedbackAccepted, 400, 401, 403, 404, 413, 429),
    )
    async def feedback(request: Request) -> JSONResponse:
        return await _feedback(request)

    @app.get("/v1/models", openapi_extra=secured(auth), responses=responses(ModelList, 401))
    async def list_models(request: Request) -> JSONResponse:
        st = _state(request)
        record = _authenticate(st, request)
        return JSONResponse({"object": "list", "data": await visible_models(st, record)})

    @app.get("/health", responses=responses(Health))
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get(
        "/ready",
        responses={
            **responses(Readiness),
            503: {"model": Readiness, "description": "draining or starting"},
        },
    )
    async def ready(request: Request) -> JSONResponse:
        st = _state(request)
        if st.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not st.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ready", "base_model": st.engine.base.name})

    @app.get(
        "/metrics", openapi_extra=secured(auth), responses=responses(None, 401, 403, text=True)
    )
    async def metrics_endpoint(request: Request) -> Response:
        st = _state(request)
        record = _authenticate(st, request)
        if record is not None and not record.metrics:
            raise PermissionDeniedError(
                f"API key {record.name!r} may not read /metrics.",
                hint="Scrape with a key created with `loft keys create --metrics`, or from the "
                "metrics_port listener.",
            )
        return metrics_response(st)

    @app.get(
        "/v1/loft/status",
        openapi_extra=secured(auth),
        responses=responses(ServerStatus, 401, 429),
    )
    async def status_endpoint(request: Request) -> JSONResponse:
        st = _state(request)
        record = _authenticate(st, request)
        if record is not None:
            st.limiter.check(record)
        return JSONResponse(await server_status(st, record))

    return app


async def _feedback(request: Request) -> JSONResponse:
    st = _state(request)
    rating = Rating(st.audit, st.metrics, st.responses, new_request_id())
    try:
        raw = await _read_body(request, st.config.max_body_bytes)
        record = _authenticate(st, request)
        if record is not None:
            rating.key, rating.owner = record.name, record.id
            st.limiter.check(record)
        body = rating.accept(raw)
    except LoftError as e:
        rating.refused(e)
        e.request_id = rating.request_id  # type: ignore[attr-defined]
        raise
    return JSONResponse(body, headers={"X-Request-Id": rating.request_id})


__all__ = [
    "ServerState",
    "begin_drain",
    "create_app",
    "error_response",
    "error_type_for",
]
