"""The loss, computed where it matters.

The stock path projects every position through the LM head (hidden x vocab, 49k for SmolLM2) and
then masks most of them away. With assistant-only labels most positions are prompt, so we run the
decoder, keep the hidden states whose *next* token is labelled, and project only those. The loss is
returned as a sum with its token count so gradient accumulation can normalise over the whole
optimizer step (micro-batch 4 x accumulation 2 equals 8 x 1 exactly).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from loft.data.packing import IGNORE_INDEX
from loft.train.attention import BOUNDS_KEY, NAME


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def loss_sum(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and how many there were."""
    lm = _causal_lm(model)
    decoder = lm.get_decoder()
    head = lm.get_output_embeddings()
    extra: dict[str, Any] = {}
    cu = batch.get("cu_seq_lens")
    if cu is not None and lm.config._attn_implementation == NAME:
        longest = batch.get("max_length")
        if longest is None:
            longest = int((cu[1:] - cu[:-1]).max())
        extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest}
        extra["max_length_k"] = longest
        if (bounds := batch.get("seq_bounds")) is not None:
            extra[BOUNDS_KEY] = bounds
    out = decoder(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        **extra,
    )
    hidden = out.last_hidden_state[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    logits = head(hidden[keep]).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets[keep], reduction="sum"), n
