"""The vLLM engine (GPU): dynamic LoRA via ``LoRARequest``, same API layer and access checks.

vLLM batches and schedules; loft still owns which version a request means (aliases), integrity
(every file's sha256 verified before vLLM sees the folder), base-model compatibility and leases,
through the same ``AdapterCache`` the torch engine uses. ``max_loras`` is the number of resident
adapters and ``max_lora_rank`` is derived from the registered adapters unless configured.
It refuses at start, before loading anything, where vLLM or a CUDA GPU is absent.
"""

from __future__ import annotations

import importlib.util
import itertools
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from loft.core.errors import ConfigError, HardwareError
from loft.core.specs import ServeConfig
from loft.serve.adapters import AdapterCache, base_target, cache_for
from loft.serve.types import Delta, SamplingParams, Target

# vLLM compiles LoRA kernels for these ranks only.
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def check_vllm_available() -> None:
    """HardwareError unless vLLM is importable and torch sees a CUDA GPU (nothing is loaded)."""
    if importlib.util.find_spec("vllm") is None:
        raise HardwareError(
            "serve engine 'vllm' was selected but vLLM is not installed.",
            hint="On a CUDA machine: pip install 'loft[vllm]'. Or use engine: torch (the default; "
            "runs on CPU and GPU).",
        )
    import torch

    if not torch.cuda.is_available():
        raise HardwareError(
            f"serve engine 'vllm' needs a CUDA GPU, but torch {torch.__version__} sees none.",
            hint="Use engine: torch on this machine (--engine torch).",
        )


def lora_rank_for(ranks: list[int], configured: int | None) -> int:
    """The smallest rank vLLM supports that covers every adapter (or the configured one)."""
    need = max([r for r in ranks if r] or [16])
    if configured is not None:
        if configured < need:
            raise ConfigError(
                f"max_lora_rank {configured} is below the largest adapter rank {need}.",
                hint=f"Set max_lora_rank to at least {need}, or leave it unset.",
            )
        return configured
    for r in VLLM_RANKS:
        if r >= need:
            return r
    raise ConfigError(f"adapter rank {need} is above what vLLM supports ({VLLM_RANKS[-1]}).")


def _keep(slot: int) -> None:
    """vLLM evicts adapters from its own LRU; loft only forgets the slot."""


class VllmEngine:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.engine: Any = None
        self.tokenizer: Any = None
        self.base: Target | None = None  # type: ignore[assignment]
        self.cache: AdapterCache | None = None
        self._ids: dict[str, int] = {}
        self._next_id = itertools.count(1)
        self._running = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        check_vllm_available()
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from loft.models import load_tokenizer, resolve_model

        info = resolve_model(self.config.base_model)
        self.tokenizer = load_tokenizer(info)
        self.base = base_target(info)
        self.cache = cache_for(
            self.config,
            self.base,
            load_slot=self._load_slot,
            unload_slot=_keep,  # vLLM evicts from its own LRU
        )
        # the configured adapters' ranks size the LoRA kernels (preload below verifies them)
        refs = list(dict.fromkeys([*self.config.pinned, *self.config.adapters]))
        ranks = [self.cache.rank_of(r) or 0 for r in refs]
        dtype = "auto" if self.config.dtype == "auto" else self.config.dtype
        args = AsyncEngineArgs(
            model=str(info.path),
            tokenizer=str(info.path),
            dtype=dtype,
            enable_lora=True,
            max_loras=self.config.max_resident_adapters,
            max_cpu_loras=self.config.max_resident_adapters,
            max_lora_rank=lora_rank_for(ranks, self.config.max_lora_rank),
            max_num_seqs=self.config.max_batch_size,
            gpu_memory_utilization=self.config.gpu_memory_utilization,
            max_model_len=self.config.max_prompt_tokens + self.config.max_tokens_limit,
        )
        self.engine = AsyncLLMEngine.from_engine_args(args)
        self._max_rank = args.max_lora_rank
        self.cache.preload(refs)

    def _load_slot(self, slot: int, target: Target) -> None:
        if target.rank and target.rank > self._max_rank:
            raise ConfigError(
                f"{target.ref} has LoRA rank {target.rank}, above this server's max_lora_rank "
                f"{self._max_rank}.",
                hint=f"Restart with max_lora_rank: {lora_rank_for([target.rank], None)} or list "
                "the adapter under adapters: so the rank is derived at start.",
            )
        with self._lock:
            self._ids.setdefault(target.ref, next(self._next_id))

    def is_base_name(self, model: str) -> bool:
        return self.cache is not None and self.cache.is_base_name(model)

    def resident(self) -> list[str]:
        return self.cache.resident() if self.cache else []

    def resident_details(self) -> list[dict[str, Any]]:
        return self.cache.details() if self.cache else []

    def queue_depth(self) -> int:
        return self._running

    def acquire(self, model: str) -> AbstractAsyncContextManager[Target]:
        assert self.cache is not None, "engine not started"
        return self.cache.acquire(model)

    async def generate(
        self,
        target: Target,
        prompt_ids: list[int],
        params: SamplingParams,
        cancel: threading.Event,
    ) -> AsyncIterator[Delta]:
        from vllm import SamplingParams as VllmSampling
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        lora = None
        if not target.is_base:
            lora = LoRARequest(target.ref, self._ids[target.ref], str(target.path))
        sampling = VllmSampling(
            n=1,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=params.stop or None,
            seed=params.seed,
        )
        request_id = uuid.uuid4().hex
        sent_text, sent_tokens = 0, 0
        finished = False
        self._running += 1
        try:
            stream = self.engine.generate(
                TokensPrompt(prompt_token_ids=list(prompt_ids)),
                sampling,
                request_id,
                lora_request=lora,
            )
            async for out in stream:
                if cancel.is_set():
                    return  # finally aborts the vLLM request
                choice = out.outputs[0]
                finish = (
                    choice.finish_reason if choice.finish_reason in ("stop", "length") else None
                )
                if choice.finish_reason is not None and finish is None:
                    finish = "stop"
                text, tokens = choice.text[sent_text:], list(choice.token_ids[sent_tokens:])
                sent_text, sent_tokens = len(choice.text), len(choice.token_ids)
                if text or finish:
                    yield Delta(
                        text=text,
                        token_ids=tokens,
                        finish_reason=finish,
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=sent_tokens,
                    )
                if finish:
                    finished = True
                    return
        finally:
            self._running -= 1
            if not finished:  # client went away or the consumer stopped: free the sequence
                cancel.set()
                await self.engine.abort(request_id)

    def shutdown(self) -> None:
        if self.engine is not None and hasattr(self.engine, "shutdown"):
            self.engine.shutdown()
