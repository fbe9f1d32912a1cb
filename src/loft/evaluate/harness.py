"""The generation harness: batched greedy generation over chat prompts, scored against references.

Prompts are rendered with the tokenizer's own chat template, sorted by length into left-padded
batches (less padding, same greedy result), generated until end-of-turn, returned in input order.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from loft.core.errors import DataError, NotFoundError
from loft.evaluate.scorers import get_scorer, json_field_accuracy

Conversation = list[dict[str, str]]


@dataclass
class GenerationStats:
    """Filled in by ``generate``: how much was generated and how fast."""

    prompts: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Sample:
    prompt: str
    pred: str
    ref: str


@dataclass
class EvalResult:
    """Mean ``score`` of ``metric`` over ``n`` records, per-field accuracy for JSON answers."""

    metric: str
    score: float
    n: int
    field_accuracy: dict[str, float] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids: list[int] = []
    gen_eos = model.generation_config.eos_token_id if model.generation_config else None
    for tid in (gen_eos if isinstance(gen_eos, list) else [gen_eos], [tokenizer.eos_token_id]):
        ids.extend(t for t in tid if t is not None and t not in ids)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    if not ids:
        raise ValueError("the tokenizer and model define no end-of-sequence token to stop at")
    return ids


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation]
) -> list[str]:
    """Each conversation rendered by the tokenizer's chat template, ending in the assistant cue."""
    return [
        tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        for conv in conversations
    ]


def say(text: str, enabled: bool = True) -> None:
    """One status line on stderr (what a slow command is doing now), unless disabled."""
    if enabled:
        Console(stderr=True, highlight=False).print(text, soft_wrap=True)


def progress_bar(label: str, enabled: bool) -> Progress:
    """A transient bar on stderr for a slow evaluation step (disabled: prints nothing)."""
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )


def _count_new(row: list[int], eos: set[int]) -> int:
    """Tokens generated in one row, up to and including the first end-of-sequence token."""
    for i, t in enumerate(row):
        if t in eos:
            return i + 1
    return len(row)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
    autocast_bf16: bool = False,
    stats: GenerationStats | None = None,
) -> list[str]:
    """Greedy completions for ``conversations``, one string per conversation, in input order.

    Rows are left-padded by hand (the tokenizer's ``padding_side`` is never touched) with
    ``tokenizer.pad_token_id`` and masked out; generation stops at end-of-turn. ``autocast_bf16``
    runs the matmuls in bfloat16 (faster on CPUs with native bf16); ``stats`` collects counts.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = _eos_ids(model, tokenizer)
    eos_set = set(eos)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    encoded: list[list[int]] = [
        tokenizer(text, add_special_tokens=False)["input_ids"]
        for text in render_prompts(tokenizer, conversations)
    ]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad_id
    )
    device = model.device
    outputs: list[str] = [""] * len(encoded)
    stats = stats if stats is not None else GenerationStats()
    was_training = model.training
    model.eval()
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if autocast_bf16
        else contextlib.nullcontext()
    )
    start = time.perf_counter()
    try:
        with progress_bar("generating", progress) as bar, torch.inference_mode(), autocast:
            task = bar.add_task("generate", total=len(encoded))
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    n = len(encoded[i])
                    ids[row, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
                    mask[row, width - n :] = 1
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=config,
                )
                new = out[:, width:].tolist()
                for row, i in enumerate(idx):
                    n_new = _count_new(new[row], eos_set)  # the rest is padding
                    outputs[i] = tokenizer.decode(new[row][:n_new], skip_special_tokens=True)
                    stats.new_tokens += n_new
                    stats.prompt_tokens += len(encoded[i])
                stats.prompts += len(idx)
                bar.advance(task, len(idx))
    finally:
        stats.seconds += time.perf_counter() - start
        model.train(was_training)
    return outputs


def split_record(record: dict[str, Any], index: int = 0) -> tuple[Conversation, str]:
    """A chat record's prompt (every message before the last assistant turn) and its reference."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"record {index}: expected a chat record with a non-empty 'messages' list",
            hint='Each line should look like {"messages": [{"role": "user", ...}, '
            '{"role": "assistant", ...}]}.',
        )
    last = max(
        (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
        default=None,
    )
    if last is None or last == 0:
        raise DataError(
            f"record {index}: needs an assistant message (the reference) after at least one prompt "
            "message",
            hint="The last assistant message is the expected answer; the messages before it are "
            "the prompt.",
        )
    return messages[:last], str(messages[last].get("content", ""))


def evaluate_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    *,
    metric: str = "json_exact_match",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
    autocast_bf16: bool = False,
    n_samples: int = 3,
) -> EvalResult:
    """Generate for each record's prompt and score against its last assistant message."""
    scorer = get_scorer(metric)
    pairs = [split_record(r, i) for i, r in enumerate(records)]
    prompts = [p for p, _ in pairs]
    refs = [ref for _, ref in pairs]
    stats = GenerationStats()
    preds = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        autocast_bf16=autocast_bf16,
        stats=stats,
    )
    scores = [scorer(p, r) for p, r in zip(preds, refs, strict=True)]
    fields: dict[str, float] = {}
    if metric.startswith("json"):
        per_field = [json_field_accuracy(p, r) for p, r in zip(preds, refs, strict=True)]
        keys = list(dict.fromkeys(k for d in per_field for k in d))
        for k in keys:
            vals = [d[k] for d in per_field if k in d]
            fields[k] = sum(vals) / len(vals)
    samples = [
        Sample(prompt=str(prompts[i][-1].get("content", "")), pred=preds[i], ref=refs[i])
        for i in range(min(n_samples, len(records)))
    ]
    return EvalResult(
        metric=metric,
        score=sum(scores) / len(scores) if scores else 0.0,
        n=len(records),
        field_accuracy=fields,
        samples=samples,
        predictions=preds,
        scores=scores,
        tokens_per_s=stats.tokens_per_s,
        seconds=stats.seconds,
    )


def load_jsonl_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file of records; blank lines are skipped, bad lines reported together."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"evaluation file not found: {path}", hint="Check the path.")
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"  {path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                kind = type(obj).__name__
                problems.append(f"  {path}:{lineno}: expected a JSON object, got {kind}")
                continue
            records.append(obj)
    if problems:
        raise DataError(
            f"{path}: {len(problems)} bad line(s):\n" + "\n".join(problems[:20]),
            problems=problems,
            hint="Fix or remove the lines above; each line must be one JSON object.",
        )
    return records
