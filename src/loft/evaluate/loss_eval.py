"""Held-out loss and perplexity: the training loss (assistant tokens only), measured, not trained.

Records are tokenized exactly as training tokenizes them (``tokenize_record``: chat records with
assistant-only labels, ``text`` records on every token), packed ``batch_size`` at a time into one
padding-free row, and scored with the trainer's own ``loss_sum``. The result is the token-weighted
mean over every labelled token in the file, so it does not depend on ``batch_size``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from loft.core.errors import DataError
from loft.data.packing import pack_batch
from loft.data.template import tokenize_record
from loft.train.loss import loss_sum


def _tokenize(
    records: list[dict[str, Any]], tokenizer: Any, max_seq_len: int
) -> list[dict[str, Any]]:
    examples: list[dict[str, Any]] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not ("messages" in rec or "text" in rec):
            raise DataError(
                f"record {i}: expected a chat record with 'messages' (or a 'text' record)",
                hint='Each record should look like {"messages": [{"role": "user", ...}, '
                '{"role": "assistant", ...}]}.',
            )
        ex = tokenize_record(rec, tokenizer, max_seq_len=max_seq_len)
        if ex["input_ids"]:
            examples.append(ex)
    return examples


def eval_loss(
    model: Any,
    tokenizer: Any,
    records: list[dict[str, Any]],
    *,
    max_seq_len: int = 1024,
    batch_size: int = 8,
) -> dict[str, float | int]:
    """``{"eval_loss", "perplexity", "tokens"}`` over ``records`` (perplexity = exp(eval_loss))."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    examples = _tokenize(records, tokenizer, max_seq_len)
    total = 0.0
    tokens = 0
    was_training = model.training
    model.eval()
    device = model.device
    try:
        with torch.inference_mode():
            for b in range(0, len(examples), batch_size):
                batch = pack_batch(examples[b : b + batch_size])
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                loss, n = loss_sum(model, batch)
                total += float(loss)
                tokens += n
    finally:
        model.train(was_training)
    if tokens == 0:
        raise DataError(
            f"none of the {len(records)} record(s) has a labelled (assistant) token to score "
            f"within max_seq_len={max_seq_len}",
            hint="Use records that end in an assistant reply, or raise max_seq_len.",
        )
    mean = total / tokens
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": tokens}
