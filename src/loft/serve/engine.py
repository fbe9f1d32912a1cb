"""The torch engine: one base model, resident adapters in slots, a dynamic batcher, a decode loop.

Requests for any mix of adapters (and the base model) share one forward pass per token
(``multilora``). A single worker thread owns the model: it waits for the first queued sequence,
then at most ``batch_wait_ms`` for more (up to ``max_batch_size``), prefills them together
(left-padded, explicit position ids) and decodes with a KV cache. Finished or cancelled rows leave
the batch at once (their cache rows are dropped), so one long request does not slow the rest.
Adapter loads take the same model lock as a decode step, so they slot in between steps.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from loft.core.errors import ConfigError, HardwareError, LoftError
from loft.core.specs import ServeConfig
from loft.serve.adapters import AdapterCache, base_target, cache_for
from loft.serve.types import Delta, Engine, SamplingParams, Target


def make_engine(config: ServeConfig) -> Engine:
    """The engine ``config.engine`` names; vllm refuses at start where it cannot run."""
    if config.engine == "vllm":
        from loft.serve.vllm_engine import VllmEngine

        return VllmEngine(config)
    return TorchEngine(config)


@dataclass
class _Seq:
    prompt_ids: list[int]
    slot: int
    params: SamplingParams
    cancel: threading.Event
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Delta | BaseException | None]  # None: cancelled, no more output
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the decoded completion already sent
    sent_tokens: int = 0  # generated tokens already sent (special tokens decode to no text)
    generator: Any = None  # torch.Generator for seeded sampling

    def send(self, item: Delta | BaseException | None) -> None:
        """Hand ``item`` to the request's event loop; a loop that has closed (its client is
        gone) cancels the sequence instead of killing the worker that serves everyone."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # "Event loop is closed"
            self.cancel.set()


class TorchEngine:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.model: Any = None
        self.tokenizer: Any = None
        self.base: Target | None = None  # type: ignore[assignment]
        self.cache: AdapterCache | None = None
        self._pending: queue.Queue[_Seq] = queue.Queue()
        self._model_lock = threading.Lock()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._active: list[_Seq] = []  # sequences in the running batch

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        import torch

        from loft.models import load_causal_lm, load_tokenizer, resolve_model
        from loft.serve.multilora import MultiLora

        device = self._device(torch)
        dtype = self._dtype(torch, device)
        info = resolve_model(self.config.base_model)
        self.tokenizer = load_tokenizer(info)
        self.model = load_causal_lm(info, dtype=dtype, device=device).eval()
        self.device = torch.device(device)
        self.multilora = MultiLora(self.model, self.config.max_resident_adapters)
        self.base = base_target(info)
        self._eos = _eos_ids(self.model, self.tokenizer)
        self._max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.cache = cache_for(
            self.config, self.base, load_slot=self._load_slot, unload_slot=self._unload_slot
        )
        # joining rows pads caches on the left; sliding-window layers keep a fixed-size window
        self._can_join = not any(getattr(x, "is_sliding", False) for x in self._new_cache().layers)
        self.cache.preload(list(dict.fromkeys([*self.config.pinned, *self.config.adapters])))
        self._worker = threading.Thread(target=self._run, name="loft-batcher", daemon=True)
        self._worker.start()

    def _device(self, torch: Any) -> str:
        want = self.config.device
        if want == "cuda" and not torch.cuda.is_available():
            raise HardwareError(
                f"serve config asks for device 'cuda' but torch {torch.__version__} sees no GPU.",
                hint="Use device: cpu (or auto).",
            )
        if want == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return want

    def _dtype(self, torch: Any, device: str) -> Any:
        if self.config.dtype == "auto":  # bf16 only where native: emulated on T4/V100 (< sm80)
            if device == "cuda":
                native = torch.cuda.get_device_capability()[0] >= 8
                return torch.bfloat16 if native else torch.float16
            return torch.float32
        return getattr(torch, self.config.dtype)

    def shutdown(self) -> None:
        self._stop.set()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=30)

    # -- queries ------------------------------------------------------------------------------

    def is_base_name(self, model: str) -> bool:
        return self.cache is not None and self.cache.is_base_name(model)

    def resident(self) -> list[str]:
        return self.cache.resident() if self.cache else []

    def resident_details(self) -> list[dict[str, Any]]:
        return self.cache.details() if self.cache else []

    def queue_depth(self) -> int:
        return self._pending.qsize() + len(self._active)

    # -- adapters -----------------------------------------------------------------------------

    def _load_slot(self, slot: int, target: Target) -> None:
        from loft.serve.multilora import read_adapter

        assert target.path is not None
        weights = read_adapter(target.path, label=target.ref)  # read outside the model lock
        with self._model_lock:
            self.multilora.load(slot, weights, label=target.ref)

    def _unload_slot(self, slot: int) -> None:
        with self._model_lock:
            self.multilora.unload(slot)

    def acquire(
        self, model: str, route_key: str | None = None
    ) -> AbstractAsyncContextManager[Target]:
        assert self.cache is not None, "engine not started"
        return self.cache.acquire(model, route_key)

    # -- generation ---------------------------------------------------------------------------

    async def generate(
        self,
        target: Target,
        prompt_ids: list[int],
        params: SamplingParams,
        cancel: threading.Event,
    ) -> AsyncIterator[Delta]:
        if self._stop.is_set() or self._worker is None:
            raise LoftError("the engine is not running")
        if not prompt_ids:
            raise ConfigError("the prompt is empty (0 tokens).", hint="Send some text.")
        slot = 0 if target.is_base else self.cache.slot_of(target.ref)  # type: ignore[union-attr]
        seq = _Seq(
            prompt_ids=list(prompt_ids),
            slot=slot,
            params=params,
            cancel=cancel,
            loop=asyncio.get_running_loop(),
            out=asyncio.Queue(),
        )
        self._pending.put(seq)
        finished = False
        try:
            while True:
                item = await seq.out.get()
                if item is None:  # cancelled: the worker dropped the row
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer stopped early (client gone): free the row
                cancel.set()

    # -- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._pending.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.config.batch_wait_ms / 1000
            while len(batch) < self.config.max_batch_size:
                left = deadline - time.monotonic()
                try:
                    nxt = (
                        self._pending.get(timeout=left) if left > 0 else self._pending.get_nowait()
                    )
                    batch.append(nxt)
                except queue.Empty:
                    break
            batch = self._drop_cancelled(batch)
            if not batch:
                continue
            self._active = list(batch)
            try:
                self._decode(batch)
            except BaseException as e:  # report to every waiting request, keep serving
                err = e if isinstance(e, LoftError) else LoftError(f"generation failed: {e!r}")
                for s in self._active:
                    s.send(err)
            finally:
                self._active = []

    @staticmethod
    def _drop_cancelled(seqs: list[_Seq]) -> list[_Seq]:
        for s in seqs:
            if s.cancel.is_set():
                s.send(None)
        return [s for s in seqs if not s.cancel.is_set()]

    def _admit(self, n_live: int) -> list[_Seq]:
        """Sequences queued since the batch started, up to max_batch_size in all (continuous
        batching: a newcomer joins at the next token instead of waiting for the batch to end)."""
        out: list[_Seq] = []
        while n_live + len(out) < self.config.max_batch_size:
            try:
                out.append(self._pending.get_nowait())
            except queue.Empty:
                break
        return self._drop_cancelled(out)

    def _decode(self, batch: list[_Seq]) -> None:
        import torch

        with torch.inference_mode():
            cur = self._start(batch)
            while True:
                new = self._admit(len(cur.live)) if self._can_join else []
                if new:
                    self._active = cur.live + new  # who to tell if the prefill fails
                    joined = self._start(new)
                    cur = cur.join(joined) if cur.live else joined
                self._active = cur.live  # finished rows already got their last delta
                if not cur.live:
                    return
                cur.step()
                logits = self._forward(cur.live, cur.tokens[:, None], cur.mask, cur.pos, cur.cache)
                cur.select(self._advance(cur.live, self._sample(cur.live, logits)))
                cur.tokens = cur.next_tokens

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _start(self, seqs: list[_Seq]) -> _Batch:
        """Prefill ``seqs`` together (left-padded), sample and emit their first tokens."""
        import torch

        dev = self.device
        for s in seqs:
            if s.params.seed is not None:
                s.generator = torch.Generator(device=dev).manual_seed(s.params.seed)
        width = max(len(s.prompt_ids) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
            mask[i, width - len(s.prompt_ids) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        logits = self._forward(seqs, ids, mask, positions, cache)
        batch = _Batch(list(seqs), cache, mask, positions[:, -1:], None)
        batch.select(self._advance(seqs, self._sample(seqs, logits)))
        batch.tokens = batch.next_tokens
        return batch

    def _forward(self, live, ids, mask, positions, cache):  # noqa: ANN001
        with self._model_lock:
            self.multilora.set_rows([s.slot for s in live], self.device)
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :].float()

    def _sample(self, live: list[_Seq], logits: Any) -> Any:
        import torch

        tokens = logits.argmax(dim=-1)
        for i, s in enumerate(live):
            p = s.params
            if p.temperature <= 0:
                continue
            row = logits[i] / p.temperature
            if p.top_p < 1.0:  # keep the smallest set of tokens whose mass reaches top_p
                sorted_logits, order = torch.sort(row, descending=True)
                probs = torch.softmax(sorted_logits, dim=-1)
                drop = probs.cumsum(-1) - probs >= p.top_p
                sorted_logits[drop] = float("-inf")
                row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
            probs = torch.softmax(row, dim=-1)
            tokens[i] = torch.multinomial(probs, 1, generator=s.generator)[0]
        return tokens

    def _advance(self, live: list[_Seq], tokens: Any) -> tuple[list[int], Any]:
        """Append each row's token, emit its text, finish it if done; (rows still running, the
        tokens they feed next)."""
        keep = []
        for i, (s, tok) in enumerate(zip(live, tokens.tolist(), strict=True)):
            if s.cancel.is_set():
                s.send(None)
                continue
            finish = None
            if tok in self._eos:
                finish = "stop"
            else:
                s.generated.append(tok)
            text = self.tokenizer.decode(s.generated, skip_special_tokens=True)
            cut = _find_stop(text, s.params.stop, s.emitted)
            if cut is not None:
                text, finish = text[:cut], "stop"
            n = len(s.generated)
            total = len(s.prompt_ids) + n
            if finish is None and (
                n >= s.params.max_tokens or (self._max_positions and total >= self._max_positions)
            ):
                finish = "length"
            ready = len(text) if finish else _safe_end(text, s.params.stop)
            chunk = text[s.emitted : ready] if ready > s.emitted else ""
            if chunk or finish:
                s.emitted = max(s.emitted, ready)
                new_tokens, s.sent_tokens = s.generated[s.sent_tokens :], n
                s.send(
                    Delta(
                        text=chunk,
                        token_ids=new_tokens,
                        finish_reason=finish,
                        prompt_tokens=len(s.prompt_ids),
                        completion_tokens=n,
                    )
                )
            if finish is None:
                keep.append(i)
        return keep, tokens


@dataclass
class _Batch:
    """The running batch: its sequences, KV cache, attention mask and each row's last position.

    Rows are left-padded. Finished rows are dropped at once, newcomers are prefilled on their own
    and joined (the shorter side padded on the left), and padding columns every row shares are
    trimmed, so the cache is never longer than its longest live sequence.
    """

    live: list[_Seq]
    cache: Any
    mask: Any  # [rows, cache length] 1 = real token
    pos: Any  # [rows, 1] position of each row's last token
    tokens: Any  # [rows] the token each row feeds next
    next_tokens: Any = None

    def select(self, keep_and_tokens: tuple[list[int], Any]) -> None:
        import torch

        keep, tokens = keep_and_tokens
        if len(keep) < len(self.live):
            index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
            self.live = [self.live[i] for i in keep]
            if keep:
                self.cache.batch_select_indices(index)
                self.mask, self.pos, tokens = self.mask[index], self.pos[index], tokens[index]
                self._trim()
        self.next_tokens = tokens

    def _trim(self) -> None:
        lead = int((self.mask.cumsum(dim=1) == 0).all(dim=0).sum())
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]

    def step(self) -> None:
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.live), 1))], dim=1)
        self.pos = self.pos + 1

    def join(self, other: _Batch) -> _Batch:
        import torch
        from torch.nn.functional import pad

        if not other.live:
            return self
        a, b = self.mask.shape[1], other.mask.shape[1]
        width = max(a, b)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            for attr in ("keys", "values"):
                x, y = getattr(mine, attr), getattr(theirs, attr)
                x, y = pad(x, (0, 0, width - a, 0)), pad(y, (0, 0, width - b, 0))
                setattr(mine, attr, torch.cat([x, y], dim=0))
        self.mask = torch.cat([pad(self.mask, (width - a, 0)), pad(other.mask, (width - b, 0))])
        self.pos = torch.cat([self.pos, other.pos])
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.live = self.live + other.live
        return self


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index where the first stop string begins, searching from just before ``start``."""
    best = None
    for stop in stops:
        at = text.find(stop, max(0, start - len(stop) + 1))
        if at != -1 and (best is None or at < best):
            best = at
    return best


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be sent: hold back an incomplete character and any tail that could
    still grow into a stop string."""
    end = len(text) - 1 if text.endswith("\ufffd") else len(text)
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), held, -1):
            if text[:end].endswith(stop[:k]):
                held = k
                break
    return end - held
