"""Per-example attention for packed rows (the varlen idea of flash-attn, on any device).

transformers handles a packed row on SDPA by building one block-diagonal L x L mask; with a mask,
SDPA on CPU takes its math path, which materialises the L x L attention weights per layer for
backward (for 8 packed chat examples of ~110 tokens: ~90 MB per layer, ~2.7 GB for SmolLM2's 30
layers) and computes attention for every pair of examples only to mask it away. Here each example
gets its own causal SDPA call with no mask, so the fused (flash) kernel runs and memory is per
example. Registered with transformers' AttentionInterface; the trainer selects it when packing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "loft_packed"


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [B, H, L, D], key/value [B, Hkv, L, D] -> output [B, L, H, D].

    With ``cu_seq_lens_q`` (cumulative example lengths of a B=1 packed row) attention is causal
    within each example only. Without it the row is one causal sequence; a padding mask is not
    supported here (the trainer uses SDPA for padded batches).
    """
    if attention_mask is not None:
        raise ValueError(f"{NAME} attention takes no mask; use 'sdpa' for padded batches")
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=p, scale=scaling, is_causal=True, enable_gqa=gqa
        )
    else:
        bounds = cu.tolist()
        parts = [
            F.scaled_dot_product_attention(
                query[:, :, s:e],
                key[:, :, s:e],
                value[:, :, s:e],
                dropout_p=p,
                scale=scaling,
                is_causal=True,
                enable_gqa=gqa,
            )
            for s, e in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        out = torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    return NAME
