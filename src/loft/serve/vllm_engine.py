"""The vLLM engine (GPU): dynamic LoRA, same API layer and access checks.

vLLM batches and schedules; loft still owns which version a request means (aliases), integrity
(every file's sha256 verified before vLLM sees the folder), base-model compatibility and leases,
through the same ``AdapterCache`` the torch engine uses.

An adapter vLLM cannot serve (DoRA, trained biases, ``modules_to_save``, a rank above
``max_lora_rank``: ``loft.registry.compat``) is refused with a 400 before vLLM sees it; configured
ones refuse the start. vLLM loads a ``LoRARequest`` lazily inside its engine step, where a failed
load takes the engine down for every client (vLLM #10546, #11727). An adapter that passes is handed
to vLLM with ``add_lora`` on the serving event loop before its first request, so a load vLLM still
refuses fails that request alone.

Sizing (``vllm_engine_args``): ``max_loras``, the adapters one batch may mix (vLLM preallocates a
GPU slot at ``max_lora_rank`` for each, out of the KV cache), is ``max_resident_adapters`` bounded
by ``max_batch_size``; ``max_cpu_loras`` keeps every resident adapter in host memory;
``max_lora_rank`` is the smallest rank vLLM supports that covers the configured adapters, or the
configured one snapped up to such a rank. It refuses at start, before loading anything, where vLLM
or a CUDA GPU is absent.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError, HardwareError, LoftError
from loft.core.specs import ServeConfig
from loft.registry.compat import VLLM_LORA_RANKS, vllm_problems
from loft.serve.adapters import AdapterCache, base_target, cache_for
from loft.serve.types import Delta, SamplingParams, Target

# What the torch engine serves of what vLLM refuses (its multi-LoRA layers take DoRA, any rank and
# per-module rank/alpha, on any Linear layer, the output head included).
_TORCH_SERVES = {"use_dora", "r", "rank_pattern", "alpha_pattern", "target_modules", "encryption"}


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
    """The smallest rank vLLM supports that covers every adapter, or the configured rank snapped
    up to a rank vLLM supports (it accepts only ``VLLM_LORA_RANKS``)."""
    need = max([r for r in ranks if r] or [16])
    if configured is not None and configured < need:
        raise ConfigError(
            f"max_lora_rank {configured} is below the largest adapter rank {need}.",
            hint=f"Set max_lora_rank to at least {need}, or leave it unset.",
        )
    want = need if configured is None else configured
    for r in VLLM_LORA_RANKS:
        if r >= want:
            return r
    what = "adapter rank" if configured is None else "max_lora_rank"
    raise ConfigError(
        f"{what} {want} is above what vLLM supports ({VLLM_LORA_RANKS[-1]}).",
        hint="Serve such adapters with engine: torch (--engine torch).",
    )


def vllm_engine_args(config: ServeConfig, ranks: list[int], *, model_path: str) -> dict[str, Any]:
    """vLLM's ``AsyncEngineArgs`` for ``config``, given the configured adapters' LoRA ranks."""
    return {
        "model": model_path,
        "tokenizer": model_path,
        "dtype": config.dtype,
        "enable_lora": True,
        # a GPU slot per adapter a batch may mix, preallocated at max_lora_rank out of the KV
        # cache; a batch of max_batch_size sequences never mixes more adapters than that
        "max_loras": min(config.max_resident_adapters, config.max_batch_size),
        "max_cpu_loras": config.max_resident_adapters,
        "max_lora_rank": lora_rank_for(ranks, config.max_lora_rank),
        "max_num_seqs": config.max_batch_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "max_model_len": config.max_prompt_tokens + config.max_tokens_limit,
    }


def sizing_line(config: ServeConfig, args: dict[str, Any]) -> str:
    """How vLLM's LoRA memory was sized, for the server's startup output."""
    line = (
        f"vLLM LoRA: {args['max_loras']} adapters per batch on the GPU (max_loras), "
        f"{args['max_cpu_loras']} resident, max_lora_rank {args['max_lora_rank']}"
    )
    if config.max_lora_rank is not None and config.max_lora_rank != args["max_lora_rank"]:
        line += f" (configured {config.max_lora_rank}, snapped up to a rank vLLM supports)"
    return line


def _keep(slot: int) -> None:
    """vLLM evicts adapters from its own LRU; loft only forgets the slot."""


class VllmEngine:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.engine: Any = None
        self.tokenizer: Any = None
        self.base: Target | None = None  # type: ignore[assignment]
        self.cache: AdapterCache | None = None
        self.sizing: str | None = None  # what `loft serve` prints about vLLM's LoRA sizing
        self._max_rank: int | None = None
        self._ids: dict[str, int] = {}
        self._next_id = itertools.count(1)
        self._added: set[str] = set()  # refs vLLM holds through add_lora since their last load
        self._adding: dict[str, asyncio.Future[None]] = {}  # add_lora calls under way (loop only)
        self._running = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        check_vllm_available()
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        refs, args = self._prepare()
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**args))
        try:
            self.cache.preload(refs)  # type: ignore[union-attr]
        except BaseException:
            self.shutdown()
            raise

    def _prepare(self) -> tuple[list[str], dict[str, Any]]:
        """Everything before vLLM loads: tokenizer, base, adapter cache and vLLM's arguments; a
        configured adapter vLLM cannot serve is refused here, before anything is loaded."""
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
        refs = list(dict.fromkeys([*self.config.pinned, *self.config.adapters]))
        for ref in refs:
            self._refuse_unservable(ref, self.cache.folder_of(ref))
        # the configured adapters' ranks size the LoRA kernels (preload verifies them)
        ranks = [self.cache.rank_of(r) or 0 for r in refs]
        args = vllm_engine_args(self.config, ranks, model_path=str(info.path))
        self._max_rank = args["max_lora_rank"]
        self.sizing = sizing_line(self.config, args)
        return refs, args

    def _load_slot(self, slot: int, target: Target) -> None:
        """Before a request first uses ``target`` (a worker thread; at start, synchronously):
        refuse what vLLM cannot serve. ``acquire`` then hands it to vLLM with ``add_lora``."""
        assert target.path is not None and self._max_rank is not None, "engine not prepared"
        self._refuse_unservable(target.ref, target.path)
        if target.rank and target.rank > self._max_rank:
            raise ConfigError(
                f"{target.ref} has LoRA rank {target.rank}, above this server's max_lora_rank "
                f"{self._max_rank}.",
                hint=f"Restart with max_lora_rank: {lora_rank_for([target.rank], None)} or list "
                "the adapter under adapters: so the rank is derived at start.",
            )
        with self._lock:
            self._ids.setdefault(target.ref, next(self._next_id))
            self._added.discard(target.ref)  # (re)loaded: add it to vLLM again before use

    @staticmethod
    def _refuse_unservable(ref: str, folder: Path) -> None:
        problems = vllm_problems(folder)
        if not problems:
            return
        if all(p.key in _TORCH_SERVES for p in problems):
            hint = "The torch engine serves it: engine: torch in the serve config (--engine torch)."
        else:
            hint = "Neither engine serves it as it is; retrain without those options."
        raise ConfigError(
            f"{ref} cannot be served by the vLLM engine: " + "; ".join(map(str, problems)) + ".",
            hint=hint,
        )

    def is_base_name(self, model: str) -> bool:
        return self.cache is not None and self.cache.is_base_name(model)

    def resident(self) -> list[str]:
        return self.cache.resident() if self.cache else []

    def resident_details(self) -> list[dict[str, Any]]:
        return self.cache.details() if self.cache else []

    def queue_depth(self) -> int:
        return self._running

    def acquire(
        self, model: str, route_key: str | None = None
    ) -> AbstractAsyncContextManager[Target]:
        assert self.cache is not None, "engine not started"
        return self._acquire(model, route_key)

    @asynccontextmanager
    async def _acquire(self, model: str, route_key: str | None) -> AsyncIterator[Target]:
        async with self.cache.acquire(model, route_key) as target:  # type: ignore[union-attr]
            if not target.is_base:
                await self._add_lora(target)
            yield target

    async def _add_lora(self, target: Target) -> None:
        """Hand ``target`` to vLLM with ``add_lora`` once per load, on the serving event loop (the
        loop vLLM's client lives on), one call per adapter however many requests wait for it."""
        ref = target.ref
        with self._lock:
            if ref in self._added:
                return
        task = self._adding.get(ref)
        if task is None:
            task = self._adding[ref] = asyncio.ensure_future(self._add(target))

            def done(t: asyncio.Future[None]) -> None:
                if self._adding.get(ref) is t:
                    del self._adding[ref]
                if not t.cancelled():
                    t.exception()  # retrieved: waiters that went away leave no warning

            task.add_done_callback(done)
        try:
            await asyncio.shield(task)  # a client that goes away does not cancel others' load
        except LoftError as e:  # each waiter its own error (the app tags it with a request id)
            cls = ConfigError if isinstance(e, ConfigError) else LoftError
            raise cls(e.message, hint=e.hint) from e

    async def _add(self, target: Target) -> None:
        try:
            await self.engine.add_lora(self._lora_request(target))
        except Exception as e:
            if getattr(self.engine, "errored", False):
                raise LoftError(f"the vLLM engine has stopped: {e}") from e
            raise ConfigError(
                f"vLLM could not load {target.ref}: {e}",
                hint="The torch engine may serve it: engine: torch (--engine torch).",
            ) from e
        with self._lock:
            self._added.add(target.ref)

    def _lora_request(self, target: Target) -> Any:
        from vllm.lora.request import LoRARequest

        with self._lock:
            lora_id = self._ids[target.ref]
        return LoRARequest(target.ref, lora_id, str(target.path))

    async def generate(
        self,
        target: Target,
        prompt_ids: list[int],
        params: SamplingParams,
        cancel: threading.Event,
    ) -> AsyncIterator[Delta]:
        from vllm import SamplingParams as VllmSampling
        from vllm.inputs import TokensPrompt

        lora = None if target.is_base else self._lora_request(target)
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
