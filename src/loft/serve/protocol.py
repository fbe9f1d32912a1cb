"""OpenAI request bodies for ``/v1/chat/completions`` and ``/v1/completions``.

Unknown fields are ignored, as OpenAI does, so newer clients keep working; fields that ask for
something loft does not do (tools, logprobs, token-id prompts, ...) are refused with a 400 that
names them rather than silently ignored. Every validation problem becomes an
``InvalidRequestError`` whose ``param`` names the offending field (``messages[0].content``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loft.core.errors import ConfigError, LoftError, http_status_for
from loft.core.specs import ServeConfig
from loft.serve.types import SamplingParams, Target

MAX_STOP = 4
MIN_TEMPERATURE = 1e-5  # below it sampling is greedy (as vLLM does)
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}

# field -> value that means "not asked for"; anything else is refused as unsupported
_UNSUPPORTED_CHAT: dict[str, Any] = {
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "logprobs": None,
    "top_logprobs": None,
    "logit_bias": None,
    "audio": None,
    "prediction": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}
_UNSUPPORTED_COMPLETION: dict[str, Any] = {
    "logprobs": None,
    "logit_bias": None,
    "suffix": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}


class InvalidRequestError(ConfigError):
    """A request body that is not valid JSON or not a valid request (HTTP 400 via ConfigError)."""

    def __init__(self, message: str, *, param: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.param = param


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are supported, got {len(v)}")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        items = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in items if s]

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "support-bot@champion",
                    "messages": [{"role": "user", "content": "Where is my order?"}],
                    "max_tokens": 64,
                    "temperature": 0,
                }
            ]
        }
    )
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages for a chat template: ``developer`` is sent as ``system``, parts joined."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class CompletionRequest(_Sampling):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "support-bot:3", "prompt": "Order 1234 is", "max_tokens": 16}]
        }
    )
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def _param(loc: tuple[Any, ...]) -> str | None:
    """``('messages', 0, 'content', 'str')`` -> ``messages[0].content`` (union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (
            part in {"str", "int", "float", "bool", "none"} or "[" in part or "-" in part
        ):
            continue  # pydantic names the union member it tried, e.g. 'list[TextPart]'
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _refuse_unsupported(doc: dict[str, Any], unsupported: dict[str, Any], endpoint: str) -> None:
    for key, neutral in unsupported.items():
        value = doc.get(key)
        if value is not None and value != neutral and value is not False:
            raise InvalidRequestError(
                f"'{key}' is not supported by this server ({endpoint}); "
                "remove it from the request.",
                param=key,
            )


def _check_completion_shape(doc: dict[str, Any]) -> None:
    prompt = doc.get("prompt")
    if isinstance(prompt, list):
        if (
            prompt
            and all(isinstance(p, int) for p in prompt)
            or any(isinstance(p, list) for p in prompt)
        ):
            raise InvalidRequestError(
                "prompts given as token ids are not supported; send the prompt as a string.",
                param="prompt",
            )
        if len(prompt) != 1:
            raise InvalidRequestError(
                f"exactly one prompt per request is supported, got a list of {len(prompt)}; "
                "send one request per prompt.",
                param="prompt",
            )
    if doc.get("echo") is True:
        raise InvalidRequestError("'echo' is not supported; leave it false.", param="echo")
    if isinstance(doc.get("best_of"), int) and doc["best_of"] > 1:
        raise InvalidRequestError("'best_of' is not supported; use 'n'.", param="best_of")


def _check_chat_shape(doc: dict[str, Any]) -> None:
    messages = doc.get("messages")
    if not isinstance(messages, list):
        return
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue
        if m.get("role") == "tool" or m.get("tool_calls"):
            raise InvalidRequestError(
                "tool messages and tool calls are not supported.", param=f"messages[{i}]"
            )
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    raise InvalidRequestError(
                        f"content parts of type {part.get('type')!r} are not supported; "
                        "only 'text' parts are.",
                        param=f"messages[{i}].content[{j}].type",
                    )


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object; InvalidRequestError (400) otherwise."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"request body must be a JSON object, got {type(doc).__name__}")
    try:  # JSON's \ud800-style escapes can spell lone surrogates, which are not text
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"request body contains an unpaired UTF-16 surrogate ({e.object[e.start]!r}); "
            "strings must be valid Unicode.",
        ) from None
    return doc


def parse_body(raw: bytes, kind: Literal["chat", "completion"]) -> Any:
    """Parse and validate a request body; InvalidRequestError (400) names the first bad field."""
    doc = json_object(raw)
    if kind == "chat":
        _refuse_unsupported(doc, _UNSUPPORTED_CHAT, "/v1/chat/completions")
        _check_chat_shape(doc)
        model: type[_Sampling] = ChatCompletionRequest
    else:
        _refuse_unsupported(doc, _UNSUPPORTED_COMPLETION, "/v1/completions")
        _check_completion_shape(doc)
        model = CompletionRequest
    if doc.get("response_format") not in (None, {"type": "text"}):
        raise InvalidRequestError(
            "'response_format' other than {'type': 'text'} is not supported.",
            param="response_format",
        )
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        param = _param(tuple(first["loc"]))
        if first["type"] == "missing":
            msg = f"'{param}' is required"
        else:
            detail = first["msg"].removeprefix("Value error, ")
            got = repr(first.get("input"))
            got = got if len(got) <= 80 else got[:77] + "..."
            msg = f"invalid '{param}': {detail} (got {got})"
        n = len(e.errors())
        more = f" (and {n - 1} more problem{'s' if n > 2 else ''})" if n > 1 else ""
        raise InvalidRequestError(msg + more, param=param) from None


def error_type_for(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error")


def _code(err: LoftError) -> str:
    """``PermissionDeniedError`` -> ``permission_denied``: a stable machine-readable code."""
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(err).__name__).lower()
    return name.removesuffix("_error") or "error"


def _sentence(text: str) -> str:
    """``'missing API key'`` -> ``'missing API key.'``, so a hint after it reads as its own."""
    text = text.rstrip()
    return text if text.endswith((".", "!", "?")) else f"{text}."


def error_message(err: LoftError) -> str:
    """The error's message and hint as one line of separate sentences."""
    return err.message if not err.hint else f"{_sentence(err.message)} {err.hint.strip()}"


def error_body(err: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, OpenAI-style error body, headers) for ``err``; status from the one error table."""
    if isinstance(err, LoftError):
        status = http_status_for(err)
        message = error_message(err)
        code: str | None = _code(err)
    else:
        status, message, code = 500, "internal server error; see the server log", "internal"
    body = {
        "error": {
            "message": message,
            "type": error_type_for(status),
            "code": code,
            "param": getattr(err, "param", None),
        }
    }
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="loft"'
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None and status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return status, body, headers


def sampling_params(
    cfg: ServeConfig, req: ChatCompletionRequest | CompletionRequest
) -> SamplingParams:
    """The engine's sampling settings; InvalidRequestError (400, as OpenAI answers) over a limit
    of the server, naming the field."""
    max_tokens = req.requested_max_tokens() or cfg.default_max_tokens
    if max_tokens > cfg.max_tokens_limit:
        field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else None
        field = field or "max_tokens"
        raise InvalidRequestError(
            f"{field} {max_tokens} is over this server's limit of {cfg.max_tokens_limit} "
            "(max_tokens_limit).",
            param=field,
            hint=f"Ask for at most {cfg.max_tokens_limit} tokens.",
        )
    if req.n > cfg.max_n:
        raise InvalidRequestError(
            f"n={req.n} is over this server's limit of {cfg.max_n} (max_n).", param="n"
        )
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0.0 or temperature < MIN_TEMPERATURE:
        # greedy: the limit of sampling as either goes to 0 (and logits / 1e-78 overflow to inf)
        temperature, top_p = 0.0, 1.0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=req.stop_list(),
        seed=req.seed,
    )


def render_prompt(
    tok: Any, target: Target, req: ChatCompletionRequest | CompletionRequest
) -> tuple[str, list[int]]:
    """(prompt text, token ids): chat via the template (the adapter's own if it has one)."""
    if isinstance(req, ChatCompletionRequest):
        try:
            text = tok.apply_chat_template(
                req.chat_messages(),
                chat_template=target.chat_template or None,
                add_generation_prompt=True,
                tokenize=False,
            )
        except Exception as e:  # the template's own error (no template, bad role order, ...)
            raise InvalidRequestError(
                f"the chat template of {target.ref} could not render these messages: {e}",
                param="messages",
                hint="Use /v1/completions with a plain prompt for models without a template.",
            ) from None
    else:
        text = req.prompt_text()
        if not text:
            raise InvalidRequestError("the prompt is empty.", param="prompt")
    return text, list(tok.encode(text, add_special_tokens=False))
