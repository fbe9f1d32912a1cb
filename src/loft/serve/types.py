"""The contract between the API layer (``app``) and an engine (``engine`` torch, ``vllm_engine``).

The API layer authenticates, checks the key's allow-list against the *name* a request asks for
(before anything is resolved, so a 403 never reveals whether an adapter exists), renders the
prompt, then asks the engine to ``acquire`` the target and ``generate`` from it. Engines own
adapter residency (LRU, pinning) and batching; both engines share everything above this file.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length"]
Arm = Literal["champion", "candidate"]  # the side of a traffic split a request was routed to


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` field resolved to: the base model or one registry version."""

    ref: str  # "name:3" for an adapter, the base model's name for the base
    name: str  # registry name, or the base model's name
    version: int | None  # None for the base model
    sha256: str  # weights fingerprint (combined sha256 of the version's weight files)
    is_base: bool
    path: Path | None = None
    chat_template: str | None = None  # the adapter's own template when it has one
    rank: int | None = None  # LoRA rank (vLLM sizes max_lora_rank from it)
    route: Arm | None = None  # the split's arm this request took; None when no split applied


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Delta:
    """A piece of one choice's output. The last one has ``finish_reason`` set."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # running total for this choice


class Engine(Protocol):
    """What ``loft.serve.app`` needs from an engine."""

    base: Target  # the base model as a Target
    tokenizer: Any  # the base model's tokenizer (HF), for prompts and token counts

    def start(self) -> None:
        """Load the base model and pre-load configured adapters. Blocking; raises LoftError."""

    def is_base_name(self, model: str) -> bool:
        """True when ``model`` names the base model (its configured or canonical name)."""

    def acquire(
        self, model: str, route_key: str | None = None
    ) -> AbstractAsyncContextManager[Target]:
        """Resolve ``model`` (``name`` follows the default alias, ``name@alias``, ``name:N``, or the
        base name), load the adapter if it is not resident (verified, idempotent under concurrent
        calls) and keep it resident until the block exits. A bare name with a traffic split goes
        to the arm ``route_key`` is on (sticky; None: no split applied) and the target says which
        (``route``). NotFoundError / IntegrityError / ConfigError (wrong base model, or an adapter
        this engine cannot serve) propagate."""

    def generate(
        self,
        target: Target,
        prompt_ids: list[int],
        params: SamplingParams,
        cancel: threading.Event,
    ) -> AsyncIterator[Delta]:
        """Stream one choice. Setting ``cancel`` stops it at the next token (client went away) and
        ends the stream without a final delta. The engine sets ``cancel`` itself only when the
        consumer stops iterating before the last delta."""

    def resident(self) -> list[str]:
        """Refs (``name:N``) of adapters currently resident, most recently used last."""

    def resident_details(self) -> list[dict[str, Any]]:
        """Each resident adapter, most recently used last: ``ref``, ``sha256``, ``pinned`` and
        ``in_use`` (requests holding it)."""

    def queue_depth(self) -> int:
        """Sequences waiting for or in a batch."""

    def shutdown(self) -> None:
        """Stop the batcher after the current batch; idempotent."""
